#!/usr/bin/env bash
# The dense f32 transformer and the GGUF quantized-matmul paths (Dequant, DequantF16, Native, each
# with f16 and reference f32 attention) on the GPU against the exact (gguf-py dequantized, f32)
# references: runs the `flux_parity_gguf_device_paths` test of pawfect-models on CUDA for each
# fixture set. The test measures and prints every check before asserting any; this writes every
# measured error with its bound to $OUT/gguf_parity_gpu.json (merge it into bench/results.json:
# `python3 bench/merge_results.py gguf_parity_gpu <that json>`).
#
# Build here (no GPU needed), then carry the binary to the GPU machine:
#   export PATH=/work/cuda13/cuda/bin:$PATH CUDA_HOME=/work/cuda13/cuda CUDA_COMPUTE_CAP=90
#   cargo test -p pawfect-models --features cuda --test flux_parity --no-run --target-dir /work/cuda-target
#   strip -o .gpu/flux_parity <the flux_parity-* executable it prints>; gzip -9 .gpu/flux_parity
# Fixture sets: tests/fixtures (committed) and any regenerated with other seeds
#   (tools/make_fixtures.py flux|gguf --seed S --out DIR/flux|DIR/gguf).
#
#   bench/gguf_parity_gpu.sh BIN DIR...
set -euo pipefail
BIN=${1:?test binary}; shift
OUT=${OUT:-/tmp/gguf-parity-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
status=0
: > "$OUT/gguf_parity_gpu.log"
for d in "$@"; do
  d=$(realpath "$d")
  echo "== $d" >> "$OUT/gguf_parity_gpu.log"
  if PAWFECT_FIXTURES="$d" PAWFECT_TEST_DEVICE=cuda "$BIN" flux_parity_gguf_device_paths --nocapture \
      --test-threads=1 >> "$OUT/gguf_parity_gpu.log" 2>&1; then
    echo "== pass" >> "$OUT/gguf_parity_gpu.log"
  else
    echo "== FAIL" >> "$OUT/gguf_parity_gpu.log"; status=1
  fi
done
python3 - "$OUT/gguf_parity_gpu.log" "$gpu" > "$OUT/gguf_parity_gpu.json" <<'PY'
import json, re, sys, datetime
log, gpu = sys.argv[1], sys.argv[2]
runs, cur = [], None
for line in open(log):
    if line.startswith("== /"):
        cur = {"fixtures": line[3:].strip(), "checks": []}
        runs.append(cur)
    elif line.startswith("== ") and cur is not None:
        cur["verdict"] = line[3:].strip()
    elif cur is not None:
        # measured lines only ("NAME: rel err E (bound B)"), not the failure summary that repeats them
        m = re.fullmatch(r"(.*): rel err ([0-9.e+-]+|NaN) \(bound ([0-9.e+-]+)\)", line.strip())
        a = re.fullmatch(r"f16 attention bound on .*: ([0-9.e+-]+)", line.strip())
        if m:
            cur["checks"].append({"check": m[1], "rel_l2": float(m[2]), "bound": float(m[3]),
                                  "within": float(m[2]) <= float(m[3])})
        elif a:
            cur["f16_attention_bound"] = float(a[1])
json.dump({"gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "bench/gguf_parity_gpu.sh BIN " + " ".join(r["fixtures"] for r in runs),
           "runs": runs}, sys.stdout, indent=1)
PY
cat "$OUT/gguf_parity_gpu.json"
exit $status
