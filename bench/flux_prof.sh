#!/usr/bin/env bash
# Where a full-size FLUX Fill transformer step spends its time: `flux_step --profile` (region timer,
# device sync around each region) at 1024² and 512² on random fp16 weights, plus the plain step time
# and the relative error against diffusers fp16 (bench/flux_prof.py). See bench/RESULTS.md (## FLUX).
#
# Build here as for bench/flux_gpu.sh (CUDA_COMPUTE_CAP=90, --example flux_step), then put in $GPU_DIR
# (default .gpu/fluxprof): flux_step.gz (stripped, gzipped; optionally flux_step_base.gz, a second
# build timed the same way for a before/after), this script, flux_prof.py, flux_gpu.py and the
# diffusers + importlib_metadata wheels under whl/. On the GPU machine, from the repo root:
#   bash .gpu/fluxprof/flux_prof.sh        # results in $OUT (or /tmp/fluxprof-out)
set -euo pipefail
GPU_DIR=${GPU_DIR:-.gpu/fluxprof}
OUT=${OUT:-/tmp/fluxprof-out}
WORK=${WORK:-/tmp/fluxprof-work}
ITERS=${ITERS:-3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU_DIR"/whl/*.whl
export PYTHONPATH=/tmp/site
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
[ -f "$WORK/transformer/config.json" ] || python3 "$GPU_DIR/flux_prof.py" reference --work "$WORK" | tee "$OUT/diffusers.json"
for b in flux_step flux_step_base; do
  [ -f "$GPU_DIR/$b.gz" ] || continue
  gunzip -c "$GPU_DIR/$b.gz" > "/tmp/$b" && chmod +x "/tmp/$b"
  "/tmp/$b" --weights "$WORK/transformer" --dtype f16 --time-dtype f16 --iters "$ITERS" --profile \
    --inputs "$WORK/inputs.safetensors,$WORK/inputs_512.safetensors" \
    --out "$WORK/${b}_1024.safetensors,$WORK/${b}_512.safetensors" | tee "$OUT/$b.jsonl"
  for s in 1024 512; do
    python3 "$GPU_DIR/flux_prof.py" compare --work "$WORK" --rust "$WORK/${b}_$s.safetensors" --size "$s"
  done | tee "$OUT/${b}_compare.jsonl"
done
