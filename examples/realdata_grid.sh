#!/usr/bin/env bash
# The runs behind docs/results.md, one corpus per invocation (run from the repository root):
#   bash examples/realdata_grid.sh wordnet [full|small]     # or: glyphs
# full (default): 20,000 WordNet synsets / every one of the 18,831 training characters;
# small: the first 5,000 synsets / 4,000 characters (the page's scale-down table).
# The published comparison (softmax, CosFace) with seeds 0, 1, 2; ArcFace, SphereFace and simpler A-Softmax
# with seed 0; ArcFace with seeds 1 and 2; NormFace (no margin) with seed 0. Result records go to docs/results/realdata[-small]/, checkpoints to runs/.
# Each run uses one thread (the two corpora can run side by side on a 2-core machine); --resume continues
# an interrupted run from its last epoch.
set -euo pipefail
corpus=${1:?usage: realdata_grid.sh wordnet|glyphs [full|small]}
scale=${2:-full}
case "$corpus-$scale" in
  wordnet-full)  sizes=(--max-classes 20000 --eval-classes 5000 --epochs 10) ;;
  glyphs-full)   sizes=(--epochs 6) ;;
  wordnet-small) sizes=(--max-classes 5000 --eval-classes 2000 --epochs 8) ;;
  glyphs-small)  sizes=(--max-classes 4000 --eval-classes 1000 --epochs 4) ;;
  *) echo "unknown corpus/scale $corpus $scale" >&2; exit 2 ;;
esac
out=docs/results/realdata; [ "$scale" = small ] && out=docs/results/realdata-small
mkdir -p "$out" runs
run() {  # margin seed
  local stem="$corpus-$1-s$2"
  [ -f "$out/$stem.json" ] && { echo "have $stem"; return; }
  python -m "examples.train_$corpus" --margin "$1" --seed "$2" "${sizes[@]}" --threads 1 \
    --checkpoint "runs/$scale-$stem.pt" --resume --out "$out/$stem.json"
}
for s in 0 1 2; do for m in softmax cosface; do run "$m" "$s"; done; done
for m in arcface sphereface simpler; do run "$m" 0; done
for s in 1 2; do run arcface "$s"; done
run normface 0
