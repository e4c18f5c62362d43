#!/usr/bin/env bash
# The runs behind docs/results.md, one corpus per invocation (run from the repository root):
#   bash examples/realdata_grid.sh wordnet     # or: glyphs
# Headline margins (softmax, CosFace, ArcFace) with seeds 0, 1, 2; SphereFace, simpler A-Softmax and
# NormFace (no margin) with seed 0. Result records go to docs/results/realdata/, checkpoints to runs/.
# Each run uses one thread (two corpora can run side by side on a 2-core machine).
set -euo pipefail
corpus=${1:?usage: realdata_grid.sh wordnet|glyphs}
case "$corpus" in
  wordnet) sizes=(--max-classes 5000 --eval-classes 2000 --epochs 8) ;;
  glyphs)  sizes=(--max-classes 4000 --eval-classes 1000 --epochs 4) ;;
  *) echo "unknown corpus $corpus" >&2; exit 2 ;;
esac
out=docs/results/realdata
mkdir -p "$out" runs
run() {  # margin seed
  local stem="$corpus-$1-s$2"
  [ -f "$out/$stem.json" ] && { echo "have $stem"; return; }
  python -m "examples.train_$corpus" --margin "$1" --seed "$2" "${sizes[@]}" --threads 1 \
    --checkpoint "runs/$stem.pt" --resume --out "$out/$stem.json"
}
for m in softmax cosface arcface sphereface simpler; do run "$m" 0; done
for s in 1 2; do for m in softmax cosface arcface; do run "$m" "$s"; done; done
run normface 0
