#!/usr/bin/env bash
# Builds the release binaries the container images ship, with exactly the commands the
# Dockerfiles run (operator/Dockerfile and worker/Dockerfile call this script):
#   operator  pawfect-operator, statically linked (musl), for a distroless/static image
#   worker    pawfect-worker with --features cuda for one GPU architecture, CUDA_COMPUTE_CAP
#             (default 75: NVIDIA T4); needs the CUDA 13.0 toolkit (nvcc) on PATH
# Usage: scripts/build-release-binaries.sh [operator] [worker]      (no argument: both)
# The stripped binaries land in $OUT_DIR (default target/dist).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-target/dist}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

case "$(uname -m)" in
  x86_64 | amd64) ARCH=x86_64 ;;
  aarch64 | arm64) ARCH=aarch64 ;;
  *) echo "unsupported architecture $(uname -m)" >&2; exit 1 ;;
esac

finish() { # finish SRC NAME: strip and install into OUT_DIR
  mkdir -p "$OUT_DIR"
  install -m 0755 "$1" "$OUT_DIR/$2"
  if command -v strip >/dev/null 2>&1; then strip "$OUT_DIR/$2"; fi
  echo "built $OUT_DIR/$2"
}

build_operator() {
  local target=${OPERATOR_TARGET:-$ARCH-unknown-linux-musl}
  if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$target"; then
    echo "the Rust target $target is missing: rustup target add $target" >&2
    exit 1
  fi
  cargo build --release --locked --target "$target" -p pawfect-operator --bin pawfect-operator
  finish "$TARGET_DIR/$target/release/pawfect-operator" pawfect-operator
}

build_worker() {
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-75}
  if ! command -v nvcc >/dev/null 2>&1; then
    echo "nvcc (CUDA 13.0 toolkit) is not on PATH: the worker image is built with --features cuda" >&2
    exit 1
  fi
  cargo build --release --locked --features cuda -p pawfect-worker --bin pawfect-worker
  finish "$TARGET_DIR/release/pawfect-worker" pawfect-worker
}

[ $# -gt 0 ] || set -- operator worker
for what in "$@"; do
  case "$what" in
    operator) build_operator ;;
    worker) build_worker ;;
    *) echo "unknown binary $what (operator or worker)" >&2; exit 2 ;;
  esac
done
