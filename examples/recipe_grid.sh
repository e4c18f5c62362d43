#!/usr/bin/env bash
# The runs behind the "Training parity" and "ArcFace with margin warm-up" sections of docs/results.md,
# at the scale-down sizes (the first 5,000 synsets / 4,000 characters), seeds 0, 1, 2, one thread each:
#   bash examples/recipe_grid.sh            # run from the repository root; --resume continues interrupted runs
# * float32, the default path (backend auto: the native CPU kernels) against the naive head that materializes
#   the B x C logits (backend reference), ArcFace m=0.5 s=30 -> docs/results/parity-float32/
# * ArcFace m=0.5 s=30 with margin warm-up (mo.MarginScheduler: m held at 0 for the first 10% of the steps,
#   raised exponentially to 0.5 by 30%) -> docs/results/realdata-recipe/
set -euo pipefail
declare -A sizes=([wordnet]="--max-classes 5000 --eval-classes 2000 --epochs 8"
                  [glyphs]="--max-classes 4000 --eval-classes 1000 --epochs 4")
run() {  # out-dir corpus seed extra-args...
  local out=$1 corpus=$2 seed=$3; shift 3
  local stem="$corpus-arcface-s$seed"
  [ -f "$out/$stem.json" ] && { echo "have $out/$stem"; return; }
  mkdir -p "$out" runs
  # shellcheck disable=SC2086
  python -m "examples.train_$corpus" --margin arcface --seed "$seed" ${sizes[$corpus]} --threads 1 \
    --checkpoint "runs/$(basename "$out")-$stem.pt" --resume --out "$out/$stem.json" "$@"
}
for seed in 0 1 2; do
  for corpus in wordnet glyphs; do
    run docs/results/realdata-recipe "$corpus" "$seed" --margin-warmup 0.1 0.3
    run docs/results/parity-float32/auto "$corpus" "$seed" --backend auto
    run docs/results/parity-float32/reference "$corpus" "$seed" --backend reference
  done
done
