#!/usr/bin/env bash
# Florence-2-base-sized random weights on one GPU: candle (pawfect-worker caption) next to
# transformers, f16, 64 new tokens, beam 3 and greedy. Run on the GPU machine from the repo root:
#
#   bench/florence2_gpu.sh [BIN] [RESULTS_DIR] [TOKENIZER]
#
# BIN: a `--features cuda` release build of pawfect-worker (default .gpu/florence/pawfect-worker);
# RESULTS_DIR: where the JSON results and report.txt go (default $OUT/florence2 or /tmp/florence2-results);
# TOKENIZER: any valid tokenizer.json (default: the tiny Florence-2 fixture's).
# The random checkpoint (~460 MB) and the test image are written to /tmp/florence2-bench.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${1:-.gpu/florence/pawfect-worker}
RES=${2:-${OUT:-/tmp}/florence2}
TOK=${3:-tests/fixtures/florence2/native/tokenizer.json}
WORK=/tmp/florence2-bench
REPEAT=${REPEAT:-5}
mkdir -p "$RES" "$WORK"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$RES/gpu.txt"
python3 "$HERE/florence2_gpu.py" make --out "$WORK/model" --tokenizer "$TOK" --image "$WORK/image.png" || exit 1
for beams in 3 1; do
  "$BIN" caption --models "$WORK/model" --image "$WORK/image.png" --device cuda --dtype f16 \
    --beams "$beams" --max-new-tokens 64 --repeat "$REPEAT" --json > "$RES/candle_beam$beams.json" \
    2> "$RES/candle_beam$beams.err" || echo "candle beam $beams failed: $(tail -3 "$RES/candle_beam$beams.err")"
done
python3 "$HERE/florence2_gpu.py" time --model "$WORK/model" --image "$WORK/image.png" --json "$RES/transformers.json"
python3 "$HERE/florence2_gpu.py" report --dir "$RES" | tee "$RES/report.txt"
