#!/usr/bin/env bash
# Copies the generated CRDs (crds/*.yaml) into the Helm chart, wrapped in the `crds.install`
# guard. Run after `cargo run -p pawfect-api --bin crdgen -- --out-dir crds`; the chart tests
# fail until the copies equal crds/*.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
out=charts/pawfect-inpaint/templates/crds
mkdir -p "$out"
for crd in crds/*.yaml; do
  {
    echo '{{- if .Values.crds.install }}'
    cat "$crd"
    echo '{{- end }}'
  } >"$out/$(basename "$crd")"
done
ls "$out"
