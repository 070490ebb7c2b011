#!/bin/bash
# GPU check of the worker service on the tiny fixture models: the staged `pawfect-worker inpaint`
# (mask cleanup, crop, Florence-2 caption, FLUX Fill, stitch) on examples/photo twice (cold and
# warm process), and `serve --device cuda` exporting its GPU memory and model load time.
#
# Build and stage (here):
#   export PATH=/work/cuda13/cuda/bin:$PATH CUDA_HOME=/work/cuda13/cuda CUDA_COMPUTE_CAP=90
#   CARGO_TARGET_DIR=/work/target-cuda cargo build --release --features cuda -p pawfect-worker --bin pawfect-worker
#   mkdir -p .gpu/service && cp <that binary> .gpu/service/pawfect-worker && strip .gpu/service/pawfect-worker
#   gzip -9 .gpu/service/pawfect-worker && cp bench/worker_gpu.sh examples/photo/*.{jpg,png} .gpu/service/
# Run (GPU machine, repo root): OUT=/tmp/out bash .gpu/service/worker_gpu.sh
set -u
D=.gpu/service
gunzip -c $D/pawfect-worker.gz > /tmp/pw && chmod +x /tmp/pw
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
for i in 1 2; do
  /tmp/pw inpaint --models tests/fixtures/flux/pipeline --florence tests/fixtures/florence2/native \
    --device cuda --steps 4 --image $D/dog-on-lawn.jpg --mask $D/leash-mask.png \
    --out "$OUT/dog-cuda-$i.png" --json > "$OUT/inpaint-$i.json" 2> "$OUT/inpaint-$i.log"
  echo "inpaint run $i rc=$?"
done
mkdir -p /tmp/models
ln -sf "$PWD/tests/fixtures/flux/pipeline" /tmp/models/FLUX.1-Fill-dev
ln -sf "$PWD/tests/fixtures/flux/gguf/flux1-fill-dev-Q8_0.gguf" /tmp/models/flux1-fill-dev-Q8_0.gguf
ln -sf "$PWD/tests/fixtures/florence2/native" /tmp/models/Florence-2-base
# No Redis here: the worker loads its models, serves /metrics and retries the queue.
PAWFECT_REDIS_URL=redis://127.0.0.1:1/ PAWFECT_MODEL_VARIANT=q8_0 /tmp/pw serve --models /tmp/models \
  --device cuda --worker-name gpu-1 --http-addr 127.0.0.1:18080 --log-format json 2> "$OUT/serve.log" &
pid=$!
python3 - <<PY
import time, urllib.request
for _ in range(120):
    try:
        body = urllib.request.urlopen("http://127.0.0.1:18080/metrics", timeout=2).read().decode()
        if "pawfect_worker_models_loaded{" in body:
            open("$OUT/metrics.txt", "w").write(body)
            break
    except Exception:
        pass
    time.sleep(0.5)
PY
kill -TERM $pid; wait $pid; echo "serve rc=$? (0: clean exit on SIGTERM)"
grep -E "gpu_memory|models_loaded|model_load" "$OUT/metrics.txt"
cat "$OUT/inpaint-1.json" "$OUT/inpaint-2.json"
