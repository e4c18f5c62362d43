#!/usr/bin/env bash
# The sentence-transformers runs of docs/results.md (examples/train_st_wordnet.py), at the headline WordNet sizes
# (20,000 training synsets, 5,000 held-out, 10 epochs), one thread each:   bash examples/st_wordnet_grid.sh
# softmax, CosFace and ArcFace with seeds 0, 1, 2; NormFace, SphereFace and the simpler A-Softmax with seed 0.
# Records go to docs/results/st-wordnet/, checkpoints and final models to runs/st-wordnet-*; --resume continues.
set -euo pipefail
out=docs/results/st-wordnet
mkdir -p "$out" runs
run() {  # margin seed
  local stem="wordnet-$1-s$2"
  [ -f "$out/$stem.json" ] && { echo "have $stem"; return; }
  python -m examples.train_st_wordnet --margin "$1" --seed "$2" --max-classes 20000 --eval-classes 5000 \
    --epochs 10 --threads 1 --output-dir "runs/st-$stem" --resume --out "$out/$stem.json"
}
for s in 0 1 2; do for m in softmax cosface arcface; do run "$m" "$s"; done; done
for m in normface sphereface simpler; do run "$m" 0; done
