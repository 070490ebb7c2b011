#!/usr/bin/env bash
# Full-size FLUX Fill transformer step on the GPU machine: diffusers (fp16/bf16/fp32) vs the Rust
# transformer (f16) on the same random weights and inputs at 1024x1024. See bench/RESULTS.md (## FLUX).
#
# Build here (CUDA 13 toolchain, sm_90 for the H100):
#   export PATH=/work/cuda13/cuda/bin:$PATH CUDA_HOME=/work/cuda13/cuda CUDA_COMPUTE_CAP=90
#   CARGO_TARGET_DIR=/work/target-cuda cargo build --release --features cuda -p pawfect-worker --example flux_step
# then put in $GPU_DIR (default .gpu/flux): flux_step (stripped), this script, flux_gpu.py, and the
# diffusers + importlib_metadata wheels under whl/. On the GPU machine, from the repo root:
#   bash .gpu/flux/flux_gpu.sh            # results in $OUT (or /tmp/flux-out)
set -euo pipefail
GPU_DIR=${GPU_DIR:-.gpu/flux}
OUT=${OUT:-/tmp/flux-out}
WORK=${WORK:-/tmp/flux-work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU_DIR"/whl/*.whl
export PYTHONPATH=/tmp/site
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 "$GPU_DIR/flux_gpu.py" reference --work "$WORK" | tee "$OUT/diffusers.json"
"$GPU_DIR/flux_step" --weights "$WORK/transformer" --inputs "$WORK/inputs.safetensors" \
  --out "$WORK/rust_out.safetensors" --dtype f16 --time-dtype f16 --iters 3 | tee "$OUT/rust.json"
python3 "$GPU_DIR/flux_gpu.py" compare --work "$WORK" --rust "$WORK/rust_out.safetensors" | tee "$OUT/compare.json"
"$GPU_DIR/flux_step" --linear-bench | tee "$OUT/linears.jsonl"
