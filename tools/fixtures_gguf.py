"""GGUF dequantization fixtures: raw GGML blocks of every type the loader accepts, with gguf-py's f32 dequantization.

    python tools/make_fixtures.py gguf --seed 0 --out tests/fixtures/gguf

The exact reference for a GGML block format is ggml's own dequantizer; gguf-py's NumPy port
(`gguf.quants.dequantize`) computes it in f32 in the same order. `models/tests/gguf_dequant.rs` dequantizes every
tensor here with the project's loader and requires the same f32 bits.

For each type T it writes two tensors:
- `T.gauss`: Gaussian rows (scales 0, 1e-4 … 10, one row with an outlier) quantized to T, by gguf-py for the types it
  can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16; F16/F32 by plain casts) and by the project's quantizer (candle's,
  through the `flux_gguf_quantize` example of pawfect-models) for the K-types, which gguf-py can only read. The tiny
  rows give subnormal f16 block scales.
- `T.bytes`: random block bytes with the f16 scale fields replaced by random finite f16 values (normal, subnormal,
  both signs, zero): every bit pattern of the packed quants and the 6-bit K scales, which real weights rarely reach.

Files: `dequant.gguf` (the raw blocks, read by the tests through the loader), `dequant_ref.safetensors`
(gguf-py's f32 dequantization, same names), `manifest.json`.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW = 512  # elements per row of the `gauss` tensors (2 K-blocks, 16 blocks of 32)
BYTES_ROWS, BYTES_ROW = 4, 1024  # `bytes` tensors: 16 K-blocks / 128 blocks of 32

# byte offsets of the f16 scale fields inside one block (ggml-common.h)
F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],  # scales[16] qs[64] d dmin
    "Q3_K": [108],  # hmask[32] qs[64] scales[12] d
    "Q4_K": [0, 2],  # d dmin scales[12] qs[128]
    "Q5_K": [0, 2],  # d dmin scales[12] qh[32] qs[128]
    "Q6_K": [208],  # ql[128] qh[64] scales[16] d
}
PY_QUANT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
PLAIN = ("F32", "F16", "BF16")
TYPES = PLAIN + PY_QUANT + K_TYPES


def quantizer_cmd(src: str, dst: str, names: str) -> list:
    """The project's quantizer: copies `src`, quantizing the tensors of the `NAME TYPE` lines of `names`."""
    return ["cargo", "run", "--quiet", "-p", "pawfect-models", "--example", "flux_gguf_quantize", "--",
            src, dst, "q8_0", names]


def _random_f16(rng, n: int) -> np.ndarray:
    """Finite f16 values over the whole exponent range: subnormals, normals up to 2^15, both signs, some zeros."""
    mag = np.exp2(rng.uniform(-24, 15.9, n)).astype(np.float16)
    sign = np.where(rng.random(n) < 0.5, -1, 1).astype(np.float16)
    v = mag * sign
    v[rng.random(n) < 0.03] = 0
    assert np.isfinite(v).all()
    return v


def _random_plain(rng, t: str, n: int) -> np.ndarray:
    """Random finite bit patterns of a plain float type (subnormals, ±0 included)."""
    if t == "F32":
        bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
        bits[(bits & 0x7F800000) == 0x7F800000] &= 0xBFFFFFFF  # no inf/nan: clear the top exponent bit
        return bits.view(np.float32)
    if t == "F16":
        bits = rng.integers(0, 2**16, n, dtype=np.uint32).astype(np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF
        return bits.view(np.float16)
    bits = rng.integers(0, 2**16, n, dtype=np.uint32).astype(np.uint16)  # BF16
    bits[(bits & 0x7F80) == 0x7F80] &= 0xBFFF
    return bits


def _gauss_rows(rng) -> np.ndarray:
    scales = [0.0, 1e-4, 1e-2, 0.1, 1.0, 10.0]
    rows = np.stack([rng.normal(0, 1, ROW) * s for s in scales]).astype(np.float32)
    rows[2, 37] = 5.0  # an outlier: one block's scale set by a single value
    return rows


def main(seed: int, out: str) -> None:
    import gguf
    from gguf import GGMLQuantizationType as QT
    from gguf.constants import GGML_QUANT_SIZES
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed + 1_000_003)
    out = os.path.abspath(out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    tmp = os.path.join(out, "_tmp")
    os.makedirs(tmp)

    raw = {}  # name -> (type name, array as handed to GGUFWriter)
    gauss = _gauss_rows(rng)

    # -- types gguf-py writes --------------------------------------------------------------------------------
    for t in PLAIN:
        if t == "F32":
            raw[f"{t}.gauss"] = (t, gauss.copy())
        elif t == "F16":
            raw[f"{t}.gauss"] = (t, gauss.astype(np.float16))
        else:
            raw[f"{t}.gauss"] = (t, gguf.quants.quantize(gauss, QT.BF16))
        vals = _random_plain(rng, t, BYTES_ROWS * BYTES_ROW).reshape(BYTES_ROWS, BYTES_ROW)
        if t == "BF16":  # raw bytes for GGUFWriter
            vals = vals.view(np.uint8).reshape(BYTES_ROWS, 2 * BYTES_ROW)
        raw[f"{t}.bytes"] = (t, vals)
    for t in PY_QUANT:
        raw[f"{t}.gauss"] = (t, gguf.quants.quantize(gauss, QT[t]))

    # -- K-types: the project's quantizer --------------------------------------------------------------------
    src, dst, names = (os.path.join(tmp, f) for f in ("src.gguf", "dst.gguf", "names.txt"))
    w = gguf.GGUFWriter(src, arch="fixture")
    for t in K_TYPES:
        w.add_tensor(f"{t}.gauss", gauss)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(names, "w") as f:
        f.write("".join(f"{t}.gauss {t.lower()}\n" for t in K_TYPES))
    subprocess.run(quantizer_cmd(src, dst, names), check=True, cwd=REPO)
    for t in gguf.GGUFReader(dst).tensors:
        ty = QT(t.tensor_type).name
        assert t.name == f"{ty}.gauss", (t.name, ty)
        raw[t.name] = (ty, np.array(t.data))

    # -- random block bytes -------------------------------------------------------------------------------------
    for t in PY_QUANT + K_TYPES:
        block, size = GGML_QUANT_SIZES[QT[t]]
        n_blocks = BYTES_ROWS * BYTES_ROW // block
        b = rng.integers(0, 256, (n_blocks, size), dtype=np.uint16).astype(np.uint8)
        for off in F16_FIELDS[t]:
            b[:, off:off + 2] = _random_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
        raw[f"{t}.bytes"] = (t, b.reshape(BYTES_ROWS, BYTES_ROW // block * size))

    # -- write, read back, dequantize ---------------------------------------------------------------------------
    path = os.path.join(out, "dequant.gguf")
    w = gguf.GGUFWriter(path, arch="fixture")
    w.add_uint32("fixture.seed", seed)
    for name in sorted(raw):
        t, arr = raw[name]
        if t in ("F32", "F16"):
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=QT[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = {}
    for t in gguf.GGUFReader(path).tensors:
        ty = QT(t.tensor_type).name
        assert ty == raw[t.name][0], (t.name, ty)
        d = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        assert d.dtype == np.float32 and np.isfinite(d).all(), t.name
        ref[t.name] = np.ascontiguousarray(d)
    assert sorted(ref) == sorted(raw)
    save_file(ref, os.path.join(out, "dequant_ref.safetensors"))
    shutil.rmtree(tmp)
    manifest = {
        "seed": seed,
        "types": list(TYPES),
        "tensors": {n: {"type": raw[n][0], "shape": list(ref[n].shape)} for n in sorted(ref)},
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"gguf fixtures: {len(ref)} tensors of {len(TYPES)} types, {total / 1e6:.2f} MB in {out}", file=sys.stderr)
