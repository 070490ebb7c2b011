#!/usr/bin/env bash
# Whole FLUX Fill pipeline at full size (random weights, 1024x1024, $STEPS steps, fp16) on the GPU machine:
# diffusers' FluxFillPipeline vs the Rust pipeline (`flux_step --pipeline`, i.e. `FluxFill::inpaint_traced`,
# the code path of `pawfect-worker inpaint`) on the same folder, image, mask and noise; then the image
# difference split by component (text encoders, condition, transformer loop, VAE decode).
# $GPU_DIR (default .gpu/flux) holds flux_step.gz (CUDA_COMPUTE_CAP=90 release build of
# `--example flux_step`, stripped, gzipped), flux_gpu_pipeline.py, tok/{tokenizer,tokenizer_2,scheduler}
# (from tests/fixtures/flux/pipeline) and whl/ (diffusers + importlib_metadata wheels).
# Peak GPU memory of the Rust process: nvidia-smi memory.used sampled every 100 ms (includes the
# CUDA context).
set -euo pipefail
GPU_DIR=${GPU_DIR:-.gpu/flux}
OUT=${OUT:-/tmp/flux-out}
WORK=${WORK:-/tmp/flux-pipe}
STEPS=${STEPS:-20}
RUNS=${RUNS:-2}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU_DIR"/whl/*.whl
export PYTHONPATH=/tmp/site LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
[ -x /tmp/flux_step ] || { gunzip -c "$GPU_DIR/flux_step.gz" > /tmp/flux_step && chmod +x /tmp/flux_step; }
PROMPT="weathered wooden deck boards, seamless continuation, no objects"
python3 "$GPU_DIR/flux_gpu_pipeline.py" build --work "$WORK" --tokenizers "$GPU_DIR/tok" --steps "$STEPS" | tee "$OUT/diffusers_pipeline.json"
(while :; do echo "$(date +%s%3N) $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)"; sleep 0.1; done) > "$WORK/mem.txt" &
SMI=$!
/tmp/flux_step --pipeline "$WORK/pipeline" --dtype f16 --vae-dtype f16 --clip-dtype f16 --time-dtype f16 \
  --image "$WORK/image.png" --mask "$WORK/mask.png" --noise "$WORK/noise.safetensors" --steps "$STEPS" \
  --runs "$RUNS" --prompt "$PROMPT" --out "$WORK/rust_trace.safetensors" \
  --diffusers "$WORK/diffusers_trace.safetensors" 2>&1 | tee "$OUT/rust_pipeline.log"
kill "$SMI" || true
DONE=$(grep -o '"runs_done_unix_ms":[0-9]*' "$OUT/rust_pipeline.log" | cut -d: -f2)
# Peak over the timed runs only (the component split afterwards loads an extra f32 VAE).
echo "{\"rust_peak_gpu_mem_mib_runs\": $(awk -v d="$DONE" '$1 <= d {print $2}' "$WORK/mem.txt" | sort -n | tail -1), \"rust_peak_gpu_mem_mib_all\": $(awk '{print $2}' "$WORK/mem.txt" | sort -n | tail -1)}" | tee -a "$OUT/rust_pipeline.log"
python3 "$GPU_DIR/flux_gpu_pipeline.py" compare --work "$WORK" --rust-trace "$WORK/rust_trace.safetensors" ${T5_F32:+--t5-f32} | tee "$OUT/pipeline_compare.json"
