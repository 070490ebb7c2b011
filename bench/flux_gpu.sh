#!/usr/bin/env bash
# Full-size FLUX Fill transformer step on the GPU machine: diffusers (fp16/bf16/fp32) vs the Rust
# transformer (f16) on the same random weights, at 1024x1024 (and 768, 512: fp16 only). Also, when
# present: the CUDA_COMPUTE_CAP=75 (T4) build at 512 (PTX JIT), an nsys kernel summary of one
# 1024 step, and the tiny fixture's transformer on the GPU (dense and GGUF, f32 and f16) against the
# fixture's diffusers outputs. See bench/RESULTS.md (## FLUX).
#
# Build here (CUDA 13 toolchain; 90 for the H100, 75 for the T4 build):
#   export PATH=/work/cuda13/cuda/bin:$PATH CUDA_HOME=/work/cuda13/cuda
#   CUDA_COMPUTE_CAP=90 CARGO_TARGET_DIR=/work/target-cuda cargo build --release --features cuda -p pawfect-models --example flux_step
#   CUDA_COMPUTE_CAP=75 CARGO_TARGET_DIR=/work/target-cuda75 cargo build --release --features cuda -p pawfect-models --example flux_step
# then put in $GPU_DIR (default .gpu/flux): flux_step.gz (and flux_step75.gz; stripped, gzipped),
# this script, flux_gpu.py, and the diffusers + importlib_metadata wheels under whl/. On the GPU
# machine, from the repo root (tests/fixtures/flux must be there for the tiny checks):
#   bash .gpu/flux/flux_gpu.sh            # results in $OUT (or /tmp/flux-out)
set -euo pipefail
GPU_DIR=${GPU_DIR:-.gpu/flux}
OUT=${OUT:-/tmp/flux-out}
WORK=${WORK:-/tmp/flux-work}
ITERS=${ITERS:-5}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU_DIR"/whl/*.whl
export PYTHONPATH=/tmp/site
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
for b in flux_step flux_step75; do
  [ -f "$GPU_DIR/$b.gz" ] && gunzip -c "$GPU_DIR/$b.gz" > "/tmp/$b" && chmod +x "/tmp/$b"
done
STEP=/tmp/flux_step
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# Tiny fixture on the GPU: transformer output vs the fixture's diffusers output (f32 reference).
F=tests/fixtures/flux
if [ -d "$F" ]; then
  python3 "$GPU_DIR/flux_gpu.py" tiny --work "$WORK" --fixtures "$F"
  tiny() { local tag=$1; shift
    echo -n "{\"case\":\"$tag\",\"result\":" ; "$STEP" --weights "$F/pipeline/transformer" --inputs "$WORK/tiny_inputs.safetensors" \
      --out "$WORK/tiny_out.safetensors" --time-dtype f32 --iters 0 "$@" | tr -d '\n'; echo "}"; }
  {
    for att in f16 reference; do
      tiny "dense f32, f32-attention $att" --dtype f32 --f32-attention $att --ref "$F/ref/transformer_out.safetensors"
      for q in Q8_0:q8_0 Q5_K:q5_k; do
        tiny "gguf ${q%%:*} f32 dequant, f32-attention $att" --dtype f32 --quant dequant --f32-attention $att \
          --gguf "$F/gguf/flux1-fill-dev-${q%%:*}.gguf" --ref "$F/ref/gguf_transformer_out.safetensors:${q##*:}"
      done
    done
    tiny "dense f16" --dtype f16 --ref "$F/ref/transformer_out.safetensors"
    tiny "gguf Q8_0 f16 auto (dequant-f16)" --dtype f16 --gguf "$F/gguf/flux1-fill-dev-Q8_0.gguf" \
      --ref "$F/ref/gguf_transformer_out.safetensors:q8_0"
    tiny "gguf Q5_K f16 auto (dequant-f16)" --dtype f16 --gguf "$F/gguf/flux1-fill-dev-Q5_K.gguf" \
      --ref "$F/ref/gguf_transformer_out.safetensors:q5_k"
  } | tee "$OUT/tiny.jsonl"
fi

python3 "$GPU_DIR/flux_gpu.py" reference --work "$WORK" --sizes 1024,768,512 | tee "$OUT/diffusers.json"
(while :; do echo "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)"; sleep 0.1; done) > "$WORK/mem.txt" &
SMI=$!
"$STEP" --weights "$WORK/transformer" --dtype f16 --time-dtype f16 --iters "$ITERS" \
  --inputs "$WORK/inputs.safetensors,$WORK/inputs_768.safetensors,$WORK/inputs_512.safetensors" \
  --out "$WORK/rust_out.safetensors,$WORK/rust_out_768.safetensors,$WORK/rust_out_512.safetensors" | tee "$OUT/rust.json"
kill "$SMI" || true
echo "{\"rust_peak_gpu_mem_mib\": $(sort -n "$WORK/mem.txt" | tail -1)}" | tee -a "$OUT/rust.json"
for s in 1024 768 512; do
  r="$WORK/rust_out_$s.safetensors"; [ "$s" = 1024 ] && r="$WORK/rust_out.safetensors"
  python3 "$GPU_DIR/flux_gpu.py" compare --work "$WORK" --rust "$r" --size "$s"
done | tee "$OUT/compare.jsonl"

if [ -x /tmp/flux_step75 ]; then
  /tmp/flux_step75 --weights "$WORK/transformer" --dtype f16 --time-dtype f16 --iters 3 \
    --inputs "$WORK/inputs_512.safetensors" --out "$WORK/rust75_512.safetensors" | tee "$OUT/rust75.json"
  python3 "$GPU_DIR/flux_gpu.py" compare --work "$WORK" --rust "$WORK/rust75_512.safetensors" --size 512 | tee -a "$OUT/rust75.json"
fi

NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1 || true)
if [ -n "$NSYS" ] && [ "${PROFILE:-1}" = 1 ]; then
  timeout 240 "$NSYS" profile --trace cuda --force-overwrite true -o "$WORK/prof" "$STEP" --weights "$WORK/transformer" \
    --dtype f16 --time-dtype f16 --iters 1 --inputs "$WORK/inputs.safetensors" --out "$WORK/rust_prof.safetensors" > /dev/null
  "$NSYS" stats --report cuda_gpu_kern_sum --format csv "$WORK/prof.nsys-rep" > "$OUT/kern_sum.csv" 2>/dev/null || true
else
  echo "no nsys" > "$OUT/kern_sum.csv"
fi
