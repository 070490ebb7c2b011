#!/usr/bin/env bash
# GPU checks and micro-benchmarks of pawfect-kernels.
#
#   gpu-check.sh build [DEST]   on a build machine with the CUDA toolkit (no GPU needed): builds
#                               kernel-check and kernel-bench for CUDA_COMPUTE_CAP=90 (H100) and
#                               for 75 (T4), strips and xz-compresses them into DEST together with
#                               this script (default: .gpu/kernels in the repository root).
#   gpu-check.sh run [DIR]      on a CUDA machine: unpacks DIR/*.xz and runs
#                                 kernel-check (cap 90 build)  all fused ops vs the f32 reference
#                                 kernel-check (cap 75 build)  the same f16 ops from compute_75 PTX
#                                                              (JIT-compiled by the driver)
#                                 kernel-bench (cap 90 build)  FLUX 1024² / 512² shapes vs plain candle
#                                 kernel-bench (cap 75 build)  the same, f16 only
#                               Logs go to $OUT (or DIR/logs). Exit code 1 if a check fails.
#
# Environment for build: CUDA_HOME (default /work/cuda13/cuda), TARGET_90 / TARGET_75 (cargo target
# dirs, default /work/target-cuda and /work/target-cuda75). For run: LD_LIBRARY_PATH must reach the
# CUDA runtime libraries (default /usr/local/cuda/lib64 is added).
set -euo pipefail

cmd=${1:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

case "$cmd" in
build)
  root=$(cd "$here/../.." && pwd)
  dest=${2:-$root/.gpu/kernels}
  export CUDA_HOME=${CUDA_HOME:-/work/cuda13/cuda}
  export PATH=$CUDA_HOME/bin:$PATH
  mkdir -p "$dest"
  for cap in 90 75; do
    if [ "$cap" = 90 ]; then target=${TARGET_90:-/work/target-cuda}; else target=${TARGET_75:-/work/target-cuda75}; fi
    (cd "$root" && CUDA_COMPUTE_CAP=$cap CARGO_TARGET_DIR=$target \
      cargo build --release --features cuda -p pawfect-kernels --bin kernel-check --bin kernel-bench)
    for bin in kernel-check kernel-bench; do
      strip -o "$dest/$bin-$cap" "$target/release/$bin"
      xz -T2 -6 -f "$dest/$bin-$cap"
    done
  done
  cp "$here/gpu-check.sh" "$dest/"
  ls -la "$dest"
  ;;
run)
  dir=${2:-$here}
  logs=${OUT:-$dir/logs}
  mkdir -p "$logs"
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  work=$(mktemp -d)
  for f in "$dir"/*.xz; do xz -dc "$f" > "$work/$(basename "${f%.xz}")"; done
  chmod +x "$work"/*
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
  status=0
  "$work/kernel-check-90" 2>&1 | tee "$logs/check-90.txt" || status=1
  "$work/kernel-check-75" 2>&1 | tee "$logs/check-75.txt" || status=1
  "$work/kernel-bench-90" 2>&1 | tee "$logs/bench-90.txt" || status=1
  "$work/kernel-bench-75" --reps 10 2>&1 | tee "$logs/bench-75.txt" || status=1
  echo "== summary"
  grep -h "kernel-check:" "$logs"/check-*.txt || true
  grep -h "FAIL" "$logs"/check-*.txt || true
  exit $status
  ;;
*)
  sed -n '2,20p' "$0"
  exit 2
  ;;
esac
