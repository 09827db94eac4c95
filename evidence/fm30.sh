#!/usr/bin/env bash
# The evidence behind the README's "Measured on the embedded default" tables (DELTA's defaults, RIFLE):
# EfficientNet-Lite0 (embedded ImageNet weights) on Fashion-MNIST-30 at 96 px, the paper's budget of
# 40 epochs (lr / 10 after two thirds), alpha by 5-fold cross-validation on the training split, then 5
# seeds paired by seed. Everything is resumable: finished runs are reused (their config.yaml,
# summary.json and metrics.jsonl are committed), interrupted ones continue (--resume). Run it again
# until it prints "all done"; each stage prints its table when complete.
#
#   evidence/fm30.sh [stage...]     stages: search-l2-sp rifle search-delta compare beyond relative
#                                   (default: all, in that order: RIFLE's table needs only L2-SP's alpha;
#                                   the relative term, an alternative to the default, comes last)
#
# Two processes share the machine's cores (OMP_NUM_THREADS=1 each): search stages run two workers
# on one study (or a queue of studies); compare stages run the same comparison twice on one folder,
# each process training the runs the other is not (both write the same table).
set -euo pipefail
cd "$(dirname "$0")/.."
DELTATL=${DELTATL:-.venv/bin/deltatl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=evidence/fm30
COMMON=(--epochs 40 --val-per-class 20 --test-per-class 300 --attention-cache evidence/attention-cache --quiet --resume
        --no-channels-last --no-l2sp-fused)  # as every run before these became the defaults: one computation per table
RELATIVE=(--delta-source-bn batch --delta-reduction relative)
SEEDS=5

# search METHOD OUT [flags...]: two workers on one study; prints the chosen alpha's table
search() {
  local method=$1 out=$2; shift 2
  "$DELTATL" search --method "$method" --folds 5 "${COMMON[@]}" "$@" --out "$out" >/dev/null &
  local other=$!
  "$DELTATL" search --method "$method" --folds 5 "${COMMON[@]}" "$@" --out "$out" >/dev/null
  wait "$other"
  cat "$out/search.md"
}

# search_worker METHOD OUT [flags...]: one worker of a search, leaving it once nothing is left to start
# (the study's last worker runs the refit and writes search.md), free for the next search of its queue
search_worker() {
  local method=$1 out=$2; shift 2
  "$DELTATL" search --method "$method" --folds 5 "${COMMON[@]}" "$@" --out "$out" --leave-when-idle >/dev/null
}

two_workers() {  # run the queue of searches in function $1 on two processes at once
  "$1" & local other=$!
  "$1"
  wait "$other"
}

chosen() {  # the alpha a finished search chose
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["chosen"]["alpha"])' "$1/search.json"
}

# compare OUT "methods" [flags...]: two processes share the comparison's runs; one prints the table
compare() {
  local out=$1 methods=$2; shift 2
  # shellcheck disable=SC2086  (word splitting of the method list is intended)
  "$DELTATL" compare --methods $methods --seeds "$SEEDS" "${COMMON[@]}" "$@" --out "$out" >/dev/null &
  local other=$!
  # shellcheck disable=SC2086
  "$DELTATL" compare --methods $methods --seeds "$SEEDS" "${COMMON[@]}" "$@" --out "$out"
  wait "$other"
}

stage_search-l2-sp() {  # alpha by 5-fold CV
  search l2-sp "$OUT/search/l2-sp" --alpha-grid 0.0001 0.001 0.01 0.1
}

stage_search-delta() {  # alpha by 5-fold CV, deltatl's defaults (DELTA: the authors' term, source on running statistics)
  search delta-noatt "$OUT/search/delta-noatt" --alpha-grid 0.0001 0.001 0.01
  search delta "$OUT/search/delta" --alpha-grid 0.0001 0.001 0.01
}

stage_compare() {
  compare "$OUT/compare" "l2 l2-fe l2-sp delta-noatt delta" \
    --alpha-grid "l2-sp=$(chosen $OUT/search/l2-sp)" "delta-noatt=$(chosen $OUT/search/delta-noatt)" \
    "delta=$(chosen $OUT/search/delta)"
}

relative_searches() {
  search_worker delta-noatt "$OUT/search/delta-noatt-relative" "${RELATIVE[@]}" --alpha-grid 0.01 0.1 1 3
  search_worker delta "$OUT/search/delta-relative" "${RELATIVE[@]}" --alpha-grid 0.01 0.1 1 3
}

stage_relative() {  # the alternative DELTA term (relative, source on batch statistics): its own CV, same baselines
  two_workers relative_searches
  cat "$OUT"/search/{delta-noatt,delta}-relative/search.md
  compare "$OUT/compare" "l2 l2-fe l2-sp delta-noatt delta" "${RELATIVE[@]}" \
    --alpha-grid "l2-sp=$(chosen $OUT/search/l2-sp)" "delta-noatt=$(chosen $OUT/search/delta-noatt-relative)" \
    "delta=$(chosen $OUT/search/delta-relative)"
}

stage_rifle() {  # RIFLE on its authors' recipe: 40 epochs, cosine learning rate, K = 1 and 3
  # DELTA at its default alpha for this model (deltatl.config.default_alpha), L2-SP at its CV alpha
  compare "$OUT/rifle" "l2 l2+rifle1 l2+rifle3 l2-sp l2-sp+rifle3 delta delta+rifle3" --schedule cosine \
    --alpha-grid "l2-sp=$(chosen $OUT/search/l2-sp)"
}

beyond_searches() {
  # BSS and LwF chose the smallest weight of their first grids (0.0001 0.001 0.01, 0.1 1 4): each grid
  # gets one more decade on that side, as a study of its own in the same folder (finished runs reused)
  search_worker bss "$OUT/search/bss" --alpha-grid 0.00001 0.0001 0.001 0.01 --study-name deltatl-search-extended
  search_worker lwf "$OUT/search/lwf" --alpha-grid 0.01 0.1 1 4 --study-name deltatl-search-extended
  # Co-Tuning's grid reaches down to 0.1 from the start: LwF, the other source-classifier term, did best
  # with its smallest weight
  search_worker co-tuning "$OUT/search/co-tuning" --alpha-grid 0.1 0.5 2.3 5
}

stage_beyond() {  # the methods beyond the papers (issue: BSS, LwF, Co-Tuning, StochNorm, LP-FT, WiSE-FT)
  # each weight by 5-fold CV around its authors' default, then one table with the papers' methods
  two_workers beyond_searches
  cat "$OUT"/search/{bss,lwf,co-tuning}/search.md
  # wise-ft interpolates lp-ft's runs, wise-ft+delta lp-ft+delta's; delta's runs are stage compare's;
  # the compositions with delta take its alpha, bss joins at its authors' weight; the table is
  # results-beyond.md (results.md stays stage compare's)
  local delta; delta=$(chosen $OUT/search/delta)
  compare "$OUT/compare" "l2 l2-fe lp-ft wise-ft stochnorm lp-ft+delta wise-ft+delta bss lwf co-tuning delta delta+bss" \
    --table beyond --alpha-grid "bss=$(chosen $OUT/search/bss)" "lwf=$(chosen $OUT/search/lwf)" \
    "co-tuning=$(chosen $OUT/search/co-tuning)" "delta=$delta" "delta+bss=$delta" "lp-ft+delta=$delta" \
    "wise-ft+delta=$delta"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(search-l2-sp rifle search-delta compare beyond relative)
for stage in "${stages[@]}"; do
  echo "== $stage"
  "stage_$stage"
done
echo "all done"
