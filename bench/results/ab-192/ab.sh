#!/bin/bash
# How the files beside this were made (2026-12-03): the pipeline bench at 192 images on the code
# before the processor work (3952250, a `git worktree add "$OLD" 3952250`) and on this tree,
# alternately, three times each, old first in rounds 1 and 3 and new first in round 2. Each
# tree's own bench script runs with that tree as the working directory, so the Ray workers
# import that tree's `pipeline`.
set -euo pipefail
NEW=$(git rev-parse --show-toplevel)
OLD=${OLD:?a worktree of 3952250}
PY=${PY:-$NEW/.venv/bin/python}
OUT=${OUT:-$NEW/bench/results/ab-192}
for i in 1 2 3; do
  if [ $((i % 2)) -eq 1 ]; then order="old new"; else order="new old"; fi
  for v in $order; do
    if [ "$v" = old ]; then dir=$OLD; else dir=$NEW; fi
    (cd "$dir" && "$PY" bench/pipeline_bench.py --images 192 --out "$OUT/$v-$i.json")
  done
done
