#!/usr/bin/env bash
# Regenerates the FLUX and GGUF fixtures for several seeds, each into its own temporary directory, and runs the
# parity tests against every set (PAWFECT_FIXTURES=<dir>), so that no bound is sized to the committed seed.
# Prints one table: a row per seed, a column per measured error, and the verdict of the tests.
#
#   tools/check_fixture_seeds.sh            # seeds 0 1 2 3
#   tools/check_fixture_seeds.sh 5 6 7
#
# PYTHON: the interpreter with tools/requirements.txt installed (default: the venv below, else python3).
#   python3 -m venv ~/.cache/pawfect-inpaint/fixtures-venv
#   ~/.cache/pawfect-inpaint/fixtures-venv/bin/pip install -r tools/requirements.txt
# KEEP=1 keeps the generated directories (their paths are printed).
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2 3)
venv_py="$HOME/.cache/pawfect-inpaint/fixtures-venv/bin/python"
PYTHON="${PYTHON:-$([ -x "$venv_py" ] && echo "$venv_py" || echo python3)}"
"$PYTHON" -c "import diffusers, gguf, torch, transformers" 2>/dev/null || {
  echo "$PYTHON lacks the reference stack: install tools/requirements.txt (see the top of this script)" >&2
  exit 2
}

# Build the tests once (and the quantizer example the generators run).
cargo build -q -p pawfect-models --example flux_gguf_quantize
cargo test -q -p pawfect-models --test flux_parity --test gguf_dequant --no-run 2>/dev/null

work="$(mktemp -d "${TMPDIR:-/tmp}/pawfect-seeds.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT

# "label|pattern printed by the tests (before ': rel err')"
cols=(
  "dense|transformer (BFL file)"
  "Q8_0 exact|gguf q8_0 (dequant, f32) vs exact f32 reference"
  "Q5_K exact|gguf q5_k (dequant, f32) vs exact f32 reference"
  "Q8_0 diffusers|gguf q8_0 (dequant, f32) vs diffusers' f16-dequantizing GGUF model"
  "Q5_K diffusers|gguf q5_k (dequant, f32) vs diffusers' f16-dequantizing GGUF model"
  "Q8_0 f16|gguf q8_0 DequantF16 on Cpu vs exact reference"
  "Q5_K f16|gguf q5_k DequantF16 on Cpu vs exact reference"
  "Q8_0 native|gguf q8_0 Native on Cpu vs exact reference"
  "Q5_K native|gguf q5_k Native on Cpu vs exact reference"
  "2-step latents|latents after 2 steps"
)

rows=()
status=0
for s in "${seeds[@]}"; do
  d="$work/seed$s"
  mkdir -p "$d"
  echo "seed $s: generating into $d" >&2
  "$PYTHON" tools/make_fixtures.py flux --seed "$s" --out "$d/flux" >"$d/gen.log" 2>&1 &&
    "$PYTHON" tools/make_fixtures.py gguf --seed "$s" --out "$d/gguf" >>"$d/gen.log" 2>&1 ||
    { echo "seed $s: fixture generation failed, see $d/gen.log" >&2; KEEP=1; trap - EXIT; status=1; continue; }
  echo "seed $s: running the parity tests" >&2
  if PAWFECT_FIXTURES="$d" cargo test -q -p pawfect-models --test flux_parity --test gguf_dequant \
      -- --nocapture --test-threads=1 >"$d/test.log" 2>&1; then
    verdict="pass"
  else
    verdict="FAIL"; status=1; KEEP=1; trap - EXIT
  fi
  passed=$(grep -Eo '[0-9]+ passed' "$d/test.log" | awk '{n += $1} END {print n + 0}')
  failed=$(grep -Eo '[0-9]+ failed' "$d/test.log" | awk '{n += $1} END {print n + 0}')
  row="| $s"
  for c in "${cols[@]}"; do
    pat="${c#*|}"
    v=$(grep -F "$pat: rel err" "$d/test.log" | head -1 | sed -E 's/.*rel err ([^ ]+).*/\1/')
    row+=" | ${v:--}"
  done
  dq_all=$(grep -cE 'elements, [0-9]+ differ' "$d/test.log" || true)
  dq_same=$(grep -c ' 0 differ (max 0 ulp)' "$d/test.log" || true)
  row+=" | $dq_same/$dq_all | $verdict ($passed passed, $failed failed) |"
  rows+=("$row")
done

header="| seed"
sep="|---"
for c in "${cols[@]}"; do header+=" | ${c%%|*}"; sep+="|---"; done
echo
echo "$header | dequant bit-exact | tests |"
echo "$sep|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "bounds: dense / exact 1e-4; diffusers Q8_0 √31·u16 = 2.72e-3, Q5_K √4·4·u16 = 3.91e-3;" \
  "f16 Q8_0 √31·3·u16 = 8.17e-3, Q5_K √4·3·u16 = 2.93e-3; native Q8_0 √31·4/(127√12) = 5.07e-2," \
  "Q5_K √4·4/(127√12) = 1.82e-2; 2-step latents 1e-3 (u16 = 2⁻¹¹)"
[ "${KEEP:-0}" = 1 ] && echo "fixtures kept in $work" >&2
exit $status
