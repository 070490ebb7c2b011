#!/usr/bin/env bash
# Florence-2-base-sized random weights on one GPU: candle (pawfect-worker caption) next to
# transformers, f16, 64 new tokens, beam 3 and greedy. Run on the GPU machine from the repo root:
#
#   bench/florence2_gpu.sh [BIN] [OUTDIR] [TOKENIZER]
#
# BIN: a `--features cuda` release build of pawfect-worker (default .gpu/florence/pawfect-worker);
# TOKENIZER: any valid tokenizer.json (default: the tiny Florence-2 fixture's).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${1:-.gpu/florence/pawfect-worker}
DIR=${2:-${OUT:-/tmp}/florence2-bench}
TOK=${3:-tests/fixtures/florence2/native/tokenizer.json}
mkdir -p "$DIR"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 "$HERE/florence2_gpu.py" make --out "$DIR/model" --tokenizer "$TOK" --image "$DIR/image.png"
for beams in 3 1; do
  "$BIN" caption --models "$DIR/model" --image "$DIR/image.png" --device cuda --dtype f16 \
    --beams "$beams" --max-new-tokens 64 --repeat 6 --json > "$DIR/candle_beam$beams.json"
done
python3 "$HERE/florence2_gpu.py" time --model "$DIR/model" --image "$DIR/image.png" --json "$DIR/transformers.json"
python3 "$HERE/florence2_gpu.py" report --dir "$DIR" | tee "$DIR/report.txt"
