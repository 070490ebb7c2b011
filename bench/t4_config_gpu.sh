#!/usr/bin/env bash
# The default T4 worker configuration at real size, with random weights: peak GPU memory and stage
# timings of `pawfect-worker inpaint --models DIR --model-variant q5_k_m` (Q5_K FLUX.1-Fill-dev
# transformer GGUF, Q5_K_M T5-XXL encoder GGUF, CLIP-L and VAE from the diffusers folder, Florence-2-base,
# all on one GPU, f16 compute) on the GPU machine.
#
# Builds (on the GPU machine, $WORK): the GGUFs with `flux_random_gguf` (CPU, all cores), the diffusers
# folder without transformer and T5 weights (bench/t4_config_gpu.py folder), a Florence-2-base-sized
# checkpoint (bench/florence2_gpu.py make), and a models DIR with the entries `fetch-models --variant
# q5_k_m` makes (relative links into DIR/hub/<repo>/snapshots/<sha>). Then `fetch-models --check`, and
# `inpaint` twice (two processes: the second finds the files in the page cache) while nvidia-smi's
# memory.used is sampled every 100 ms (it includes the CUDA context). When a run peaks above $LIMIT_MIB
# (default 15000, what a 16 GB T4 leaves usable), the knobs are tried: --vae-tile 512, then also
# --t5-device cpu. EXTRA=1 runs them regardless; CONFIGS="NAME FLAGS..." lines run those instead.
# Every log, JSON and the memory samples end up in $OUT/all.tar.gz.
#
# Build and stage (here, repo root):
#   export PATH=/work/cuda13/cuda/bin:$PATH CUDA_HOME=/work/cuda13/cuda CUDA_COMPUTE_CAP=90
#   CARGO_TARGET_DIR=/work/target-cuda cargo build --release --features cuda -p pawfect-worker \
#     --bin pawfect-worker -p pawfect-models --example flux_random_gguf
#   G=.gpu/t4fit; mkdir -p $G; for b in release/pawfect-worker release/examples/flux_random_gguf; do
#     strip -o $G/$(basename $b) /work/target-cuda/$b && gzip -f9 $G/$(basename $b); done
#   cp bench/t4_config_gpu.{sh,py} bench/florence2_gpu.py .gpu/flux/whl/*.whl examples/photo/{dog-on-lawn.jpg,leash-mask.png} $G/
# Run (GPU machine, repo root): OUT=/tmp/out bash .gpu/t4fit/t4_config_gpu.sh
set -uo pipefail
G=${GPU_DIR:-.gpu/t4fit}
OUT=${OUT:-/tmp/t4fit-out}
WORK=${WORK:-/tmp/t4fit}
LIMIT_MIB=${LIMIT_MIB:-15000}
STEPS=${STEPS:-20}
mkdir -p "$OUT" "$WORK"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} PYTHONUNBUFFERED=1
for b in pawfect-worker flux_random_gguf; do
  [ -x "$WORK/$b" ] || { gunzip -c "$G/$b.gz" > "$WORK/$b" && chmod +x "$WORK/$b"; }
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
nproc | sed 's/^/cpus: /' | tee -a "$OUT/gpu.txt"
now() { date +%s%3N; }

M=$WORK/models
SNAP=0000000000000000000000000000000000000000
FLUX_SNAP=$M/hub/models--black-forest-labs--FLUX.1-Fill-dev/snapshots/$SNAP
GGUF_SNAP=$M/hub/models--YarvixPA--FLUX.1-Fill-dev-gguf/snapshots/$SNAP
T5_SNAP=$M/hub/models--city96--t5-v1_1-xxl-encoder-gguf/snapshots/$SNAP
FLO_SNAP=$M/hub/models--microsoft--Florence-2-base/snapshots/$SNAP
mkdir -p "$FLUX_SNAP" "$GGUF_SNAP" "$T5_SNAP" "$FLO_SNAP"

# -- build the inputs: GGUFs on the CPU, the small models on the GPU meanwhile ----------------------
t=$(now)
if [ ! -s "$GGUF_SNAP/flux1-fill-dev-Q5_K_S.gguf" ]; then
  (python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$G"/*.whl \
     && PYTHONPATH=/tmp/site python3 "$G/t4_config_gpu.py" folder --out "$FLUX_SNAP" \
          --tokenizers tests/fixtures/flux/pipeline \
     && python3 "$G/florence2_gpu.py" make --out "$FLO_SNAP" \
          --tokenizer tests/fixtures/florence2/native/tokenizer.json --image "$WORK/florence.png") \
    > "$OUT/build_small.log" 2>&1 &
  SMALL=$!
  "$WORK/flux_random_gguf" flux "$GGUF_SNAP/flux1-fill-dev-Q5_K_S.gguf" 2>&1 | tail -2 | tee "$OUT/gguf_flux.txt"
  "$WORK/flux_random_gguf" t5 "$T5_SNAP/t5-v1_1-xxl-encoder-Q5_K_M.gguf" 2>&1 | tail -2 | tee "$OUT/gguf_t5.txt"
  wait $SMALL || { echo "building the small models failed:"; tail -20 "$OUT/build_small.log"; exit 1; }
fi
echo "inputs built in $(( ($(now) - t) / 1000 )) s"
ln -sfn "hub/models--black-forest-labs--FLUX.1-Fill-dev/snapshots/$SNAP" "$M/FLUX.1-Fill-dev"
ln -sfn "hub/models--YarvixPA--FLUX.1-Fill-dev-gguf/snapshots/$SNAP/flux1-fill-dev-Q5_K_S.gguf" "$M/flux1-fill-dev-Q5_K_S.gguf"
ln -sfn "hub/models--city96--t5-v1_1-xxl-encoder-gguf/snapshots/$SNAP/t5-v1_1-xxl-encoder-Q5_K_M.gguf" "$M/t5-v1_1-xxl-encoder-Q5_K_M.gguf"
ln -sfn "hub/models--microsoft--Florence-2-base/snapshots/$SNAP" "$M/Florence-2-base"
ls -l "$M" | tee "$OUT/models_dir.txt"
du -shL "$M"/* | tee -a "$OUT/models_dir.txt"

"$WORK/pawfect-worker" fetch-models --check --models "$M" --variant q5_k_m > "$OUT/check.txt" 2>&1
echo "fetch-models --check rc=$?"; cat "$OUT/check.txt"

# -- the runs ------------------------------------------------------------------------------------
(while :; do echo "$(now) $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)"; sleep 0.1; done) \
  > "$WORK/mem.txt" &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT
TIMEV=""; [ -x /usr/bin/time ] && TIMEV="/usr/bin/time -v"
run() {  # run NAME [extra flags...]
  local name=$1; shift
  sleep 1
  local s; s=$(now)
  $TIMEV "$WORK/pawfect-worker" inpaint --models "$M" --model-variant q5_k_m --device cuda \
    --steps "$STEPS" --image "$G/dog-on-lawn.jpg" --mask "$G/leash-mask.png" --out "$OUT/$name.png" --json "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$? e; e=$(now)
  sleep 0.3
  python3 "$G/t4_config_gpu.py" memory --samples "$WORK/mem.txt" --log "$OUT/$name.log" --start "$s" --end "$e" \
    --summary "$OUT/$name.json" > "$OUT/$name.mem.json"
  echo "== $name ($*) rc=$rc wall=$(( (e - s) / 1000 )) s"
  grep -E "Maximum resident" "$OUT/$name.log"
  cat "$OUT/$name.json" "$OUT/$name.mem.json"
  [ $rc -eq 0 ] || tail -15 "$OUT/$name.log"
  PEAK=$(python3 -c "import json;print(json.load(open('$OUT/$name.mem.json'))['peak_mib'] or 0)")
}
if [ -n "${CONFIGS:-}" ]; then
  # CONFIGS: lines of `NAME FLAGS...` (e.g. "tile256 --vae-tile 256"), run in order.
  while read -r name flags; do
    [ -n "$name" ] && run "$name" $flags < /dev/null
  done <<< "$CONFIGS"
else
  run default-1
  P1=$PEAK
  run default-2
  P2=$PEAK
  if [ "${EXTRA:-0}" = 1 ] || [ "$P1" -gt "$LIMIT_MIB" ] || [ "$P2" -gt "$LIMIT_MIB" ]; then
    run vae-tile-512 --vae-tile 512
    if [ "${EXTRA:-0}" = 1 ] || [ "$PEAK" -gt "$LIMIT_MIB" ]; then
      run vae-tile-512-t5-cpu --vae-tile 512 --t5-device cpu
    fi
  fi
fi
kill $SMI 2>/dev/null
# Everything in one archive (the device tool returns a limited number of files).
cp "$WORK/mem.txt" "$OUT/mem.txt"
tar -C "$OUT" -czf /tmp/t4fit-all.tar.gz --exclude='*.png' . && mv /tmp/t4fit-all.tar.gz "$OUT/all.tar.gz"
