#!/usr/bin/env bash
# Whole FLUX Fill pipeline at full size (random weights, 1024x1024, 4 steps, fp16) on the GPU machine:
# diffusers' FluxFillPipeline vs `pawfect-worker inpaint` on the same folder, image, mask and noise.
# $GPU_DIR (default .gpu/flux) holds pawfect-worker.gz (CUDA_COMPUTE_CAP=90 release build, stripped,
# gzipped to fit the 64 MiB transfer), flux_gpu_pipeline.py, tok/{tokenizer,tokenizer_2,scheduler}
# (from tests/fixtures/flux/pipeline) and whl/ (diffusers + importlib_metadata wheels).
set -euo pipefail
GPU_DIR=${GPU_DIR:-.gpu/flux}
OUT=${OUT:-/tmp/flux-out}
WORK=${WORK:-/tmp/flux-pipe}
STEPS=${STEPS:-4}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU_DIR"/whl/*.whl
export PYTHONPATH=/tmp/site LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
gunzip -c "$GPU_DIR/pawfect-worker.gz" > /tmp/pawfect-worker && chmod +x /tmp/pawfect-worker
python3 "$GPU_DIR/flux_gpu_pipeline.py" build --work "$WORK" --tokenizers "$GPU_DIR/tok" --steps "$STEPS" | tee "$OUT/diffusers_pipeline.json"
/tmp/pawfect-worker inpaint --device cuda --dtype f16 --vae-dtype f16 --clip-dtype f16 --time-dtype f16 \
  --models "$WORK/pipeline" --image "$WORK/image.png" --mask "$WORK/mask.png" --noise "$WORK/noise.safetensors" \
  --steps "$STEPS" --prompt "weathered wooden deck boards, seamless continuation, no objects" \
  --out "$WORK/rust.png" 2>&1 | tee "$OUT/rust_pipeline.log"
python3 "$GPU_DIR/flux_gpu_pipeline.py" compare --work "$WORK" --rust "$WORK/rust.png" | tee "$OUT/pipeline_compare.json"
cp "$WORK/rust.png" "$WORK/expected.png" "$OUT/"
