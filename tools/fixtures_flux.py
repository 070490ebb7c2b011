"""Tiny random-weight FLUX.1-Fill-dev pipeline and the reference tensors the Rust parity tests compare against.

    python tools/make_fixtures.py flux --seed 0 --out tests/fixtures/flux

The pipeline keeps the real structure (16 latent channels, VAE scale factor 8, transformer 384 in / 64 out
with guidance embeddings, CLIP text tower pooled output, T5 v1.1 encoder with gated GELU, dynamic-shift
flow-matching schedule) at tiny widths, written with `save_pretrained` in the diffusers layout, sharded like
the Hub checkpoint. Tokenizers are built here from a small corpus by deterministic code (BPE merges for CLIP, a
Unigram model for T5) and saved in the formats the Hub repo uses (CLIP: vocab.json + merges.txt, T5:
tokenizer.json), so that a seed reproduces every file byte for byte. All weights are rounded to f16 and stored as f16; the
references are computed in f32 from the saved files.

Besides the diffusers folder it writes the same transformer as a BFL single file (`bfl/`) and as city96-style
GGUF files (Q8_0 written by gguf-py; Q5_K quantized by candle through the `flux_gguf_quantize` example,
because gguf-py cannot quantize K types), each with two references for the same inputs: the transformer on
gguf-py's exact f32 dequantization of the file (`ref/gguf_exact_transformer_out`), and diffusers' own GGUF model
(`ref/gguf_transformer_out`), whose f16 dequantization rounds the weights (see `_gguf_exact`). The manifest
records digests of gguf-py's dequantization of every quantized tensor (`gguf_dequant_digest`) and the size of
diffusers' weight rounding.

Any seed gives a valid fixture set (`tools/check_fixture_seeds.sh` runs the parity tests on several); the
committed one is seed 0.

Every file read by the tests is listed in `manifest.json`.
"""

import inspect
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------------------
# sizes
HEIGHT, WIDTH = 64, 96  # image, multiple of 16, deliberately not square
T5_LEN = 512  # max_sequence_length (the production value)
STEPS = 2
GUIDANCE = 30.0
PROMPT = "weathered wooden deck boards, seamless continuation, no objects"

TRANSFORMER_CFG = dict(
    patch_size=1,
    in_channels=384,
    out_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)
HIDDEN = TRANSFORMER_CFG["attention_head_dim"] * TRANSFORMER_CFG["num_attention_heads"]

VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 32, 32],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=8,
    sample_size=32,  # tiles of 32 px / 4 latents when tiling is on
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

SCHEDULER_CFG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)

CORPUS = [
    "a photo of a dog on a wooden deck",
    "weathered wooden deck boards, seamless continuation, no objects",
    "green grass lawn, seamless continuation, no objects",
    "grey concrete pavement with small cracks",
    "a cat sitting on a red brick wall",
    "sandy beach with footprints and shells",
    "fluffy white carpet, soft texture",
    "asphalt road with painted lines",
    "dry autumn leaves on a forest floor",
    "a brown leash lying on the kitchen tiles",
    "snow covered path between pine trees",
    "polished marble floor tiles, reflections",
    "gravel driveway, small pebbles, daylight",
    "it's a dog's life: they're running, we'll see, I'd say, you've got it, I'm here",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 ...!?,;:()[]{}-_/\\\"'#@&%*+=<>|~^$",
]


# ---------------------------------------------------------------------------------------------------------------
def _f16_round_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights with a scale that keeps activations O(1), rounded to f16-representable values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            elif name.endswith("weight") or name.endswith("scale"):  # norm gains
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:  # biases
                v = 0.05 * torch.randn(p.shape, generator=gen)
            p.copy_(v.half().float())


# The tokenizers are built here by deterministic code rather than by the `tokenizers` trainers: those break ties
# through hash-map order (random per process), so two runs with the same seed gave different merges / vocab order.
def _bytes_to_unicode() -> list:
    """GPT-2 / CLIP byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe_merges(words: dict, n_merges: int) -> list:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: the smallest pair)."""
    merges = []
    for _ in range(n_merges):
        pairs = {}
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] = pairs.get(p, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    return merges


def _train_clip_tokenizer(out_dir: str) -> None:
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = {}
    for text in CORPUS * 4:
        for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            w = tuple(piece[:-1]) + (piece[-1] + "</w>",)
            words[w] = words.get(w, 0) + 1
    merges = _bpe_merges(words, 280)
    # As in openai/clip-vit-large-patch14: every byte alone and as a word end, the merges, then the two specials
    # with the largest ids (pooling relies on <|endoftext|> being the largest id).
    alphabet = _bytes_to_unicode()
    ordered = alphabet + [c + "</w>" for c in alphabet]
    seen = set(ordered)
    for a, b in merges:
        if a + b not in seen:
            ordered.append(a + b)
            seen.add(a + b)
    ordered += ["<|startoftext|>", "<|endoftext|>"]
    new_vocab = {t: i for i, t in enumerate(ordered)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(new_vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def _train_t5_tokenizer():
    """A Unigram model over the corpus' substrings (up to 6 characters, seen at least twice), scored by log
    frequency: the structure of T5's SentencePiece tokenizer, built deterministically."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    pre = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    counts = {}
    for text in CORPUS * 4:
        for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            for i in range(len(piece)):
                for j in range(i + 1, min(len(piece), i + 6) + 1):
                    counts[piece[i:j]] = counts.get(piece[i:j], 0) + 1
    chars = sorted(t for t in counts if len(t) == 1)
    multi = sorted((t for t in counts if len(t) > 1 and counts[t] >= 2), key=lambda t: (-counts[t] * len(t), t))
    pieces = chars + multi[: 200 - 3 - len(chars)]
    total = sum(counts[t] for t in pieces)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(t, math.log(counts[t] / total)) for t in sorted(pieces, key=lambda t: (-counts[t], t))]
    tok = Tokenizer(Unigram(vocab, unk_id=2))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return tok


def _save(t: torch.Tensor, path: str) -> None:
    save_file({"data": t.detach().contiguous().float()}, path)


# ---------------------------------------------------------------------------------------------------------------
# diffusers <-> BFL names (the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers)
def transformer_to_bfl(sd: dict) -> dict:
    out = {}
    used = set()

    def g(k):
        used.add(k)
        return sd[k]
    pairs = {
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "txt_in": "context_embedder",
        "img_in": "x_embedder",
        "final_layer.linear": "proj_out",
    }
    for b, d in pairs.items():
        for s in ("weight", "bias"):
            out[f"{b}.{s}"] = g(f"{d}.{s}")
    for s in ("weight", "bias"):
        scale, shift = g(f"norm_out.linear.{s}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale], dim=0)
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{q}img_mod.lin.{s}"] = g(f"{p}norm1.linear.{s}")
            out[f"{q}txt_mod.lin.{s}"] = g(f"{p}norm1_context.linear.{s}")
            out[f"{q}img_attn.qkv.{s}"] = torch.cat([g(f"{p}attn.to_{x}.{s}") for x in "qkv"])
            out[f"{q}txt_attn.qkv.{s}"] = torch.cat([g(f"{p}attn.add_{x}_proj.{s}") for x in "qkv"])
            out[f"{q}img_attn.proj.{s}"] = g(f"{p}attn.to_out.0.{s}")
            out[f"{q}txt_attn.proj.{s}"] = g(f"{p}attn.to_add_out.{s}")
            out[f"{q}img_mlp.0.{s}"] = g(f"{p}ff.net.0.proj.{s}")
            out[f"{q}img_mlp.2.{s}"] = g(f"{p}ff.net.2.{s}")
            out[f"{q}txt_mlp.0.{s}"] = g(f"{p}ff_context.net.0.proj.{s}")
            out[f"{q}txt_mlp.2.{s}"] = g(f"{p}ff_context.net.2.{s}")
        out[f"{q}img_attn.norm.query_norm.scale"] = g(f"{p}attn.norm_q.weight")
        out[f"{q}img_attn.norm.key_norm.scale"] = g(f"{p}attn.norm_k.weight")
        out[f"{q}txt_attn.norm.query_norm.scale"] = g(f"{p}attn.norm_added_q.weight")
        out[f"{q}txt_attn.norm.key_norm.scale"] = g(f"{p}attn.norm_added_k.weight")
    for i in range(n_single):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{q}modulation.lin.{s}"] = g(f"{p}norm.linear.{s}")
            out[f"{q}linear1.{s}"] = torch.cat([g(f"{p}attn.to_{x}.{s}") for x in "qkv"] + [g(f"{p}proj_mlp.{s}")])
            out[f"{q}linear2.{s}"] = g(f"{p}proj_out.{s}")
        out[f"{q}norm.query_norm.scale"] = g(f"{p}attn.norm_q.weight")
        out[f"{q}norm.key_norm.scale"] = g(f"{p}attn.norm_k.weight")
    assert used == set(sd), sorted(set(sd) - used)
    return {k: v.contiguous() for k, v in out.items()}


def vae_to_bfl(sd: dict, n_blocks: int) -> dict:
    """diffusers AutoencoderKL names -> BFL `ae.safetensors` (LDM) names."""
    out = {}
    for k, v in sd.items():
        n = k
        for side in ("encoder", "decoder"):
            n = n.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
            n = n.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            n = n.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
            if f"{side}.mid_block.attentions.0." in n:
                n = n.replace(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")
                n = n.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                n = n.replace("to_v.", "v.").replace("to_out.0.", "proj_out.")
                if v.ndim == 2:
                    v = v[:, :, None, None]
        if n.startswith("encoder.down_blocks."):
            parts = n.split(".")
            i = parts[2]
            if parts[3] == "resnets":
                n = f"encoder.down.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:  # downsamplers.0.conv
                n = f"encoder.down.{i}.downsample." + ".".join(parts[5:])
        if n.startswith("decoder.up_blocks."):
            parts = n.split(".")
            i = n_blocks - 1 - int(parts[2])
            if parts[3] == "resnets":
                n = f"decoder.up.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:
                n = f"decoder.up.{i}.upsample." + ".".join(parts[5:])
        n = n.replace("conv_shortcut", "nin_shortcut")
        out[n] = v.contiguous()
    return out


def _patched_flux_converter(hidden: int):
    """diffusers' BFL->diffusers converter hard-codes the 12B width (inner_dim = 3072); the same code with ours."""
    from diffusers.loaders import single_file_model, single_file_utils

    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    src = src.replace("inner_dim = 3072", f"inner_dim = {hidden}")
    ns = dict(single_file_utils.__dict__)
    exec(src, ns)
    fn = ns["convert_flux_transformer_checkpoint_to_diffusers"]
    single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"] = fn


# city96 (ComfyUI-GGUF convert.py + lcpp.patch): these stay F32, 1-D tensors stay F32, rows not a multiple of the
# block size fall back to F16.
GGUF_KEEP_F32 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")


def _gguf_plan(bfl: dict, block: int):
    """name -> 'F32' | 'F16' | 'Q' for every tensor."""
    plan = {}
    for k, v in bfl.items():
        if v.ndim == 1 or any(k.startswith(p) for p in GGUF_KEEP_F32):
            plan[k] = "F32"
        elif v.shape[-1] % block != 0:
            plan[k] = "F16"
        else:
            plan[k] = "Q"
    return plan


def _write_gguf(bfl: dict, path: str, plan: dict, qtype) -> None:
    import gguf

    w = gguf.GGUFWriter(path, arch="flux")
    for k, v in bfl.items():
        arr = v.float().numpy()
        kind = plan[k]
        if kind == "F32":
            w.add_tensor(k, arr.astype(np.float32))
        elif kind == "F16":
            w.add_tensor(k, arr.astype(np.float16))
        elif qtype is None:  # source file for the candle quantizer: quantized later
            w.add_tensor(k, arr.astype(np.float32))
        else:
            q = gguf.quants.quantize(arr.astype(np.float32), qtype)
            w.add_tensor(k, q, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _digest(v: np.ndarray) -> str:
    """Sum of the f32 bit patterns times (2i+1), mod 2^64 (models/tests/gguf_dequant.rs computes the same)."""
    bits = np.ascontiguousarray(v, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    mult = np.arange(bits.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
        return f"{int(np.sum(bits * mult, dtype=np.uint64)):016x}"


def _gguf_exact(path: str):
    """gguf-py's f32 dequantization of every tensor of a GGUF file (name -> torch f32), the weight-level
    comparison of diffusers' dequantize_gguf_tensor with it, and a digest of each quantized tensor."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_functions, dequantize_gguf_tensor

    exact, digests = {}, {}
    worst = {"max_abs_over_abs": 0.0, "max_rel_l2": 0.0, "tensors": 0, "dtype": None, "f32_variant_equal": True}
    for t in gguf.GGUFReader(path).tensors:
        data = np.array(t.data)
        w = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32, copy=False)
        exact[t.name] = torch.from_numpy(np.ascontiguousarray(w))
        qt = gguf.GGMLQuantizationType(t.tensor_type)
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            continue
        digests[t.name] = _digest(w)
        raw = torch.from_numpy(data.copy())
        d = dequantize_gguf_tensor(GGUFParameter(raw, quant_type=qt))
        worst["dtype"] = str(d.dtype)
        d = d.float().numpy().reshape(w.shape)
        e = np.abs(d - w)
        nz = w != 0
        worst["max_abs_over_abs"] = max(worst["max_abs_over_abs"], float((e[nz] / np.abs(w[nz])).max()))
        worst["max_rel_l2"] = max(worst["max_rel_l2"], float(np.linalg.norm(d - w) / np.linalg.norm(w)))
        worst["tensors"] += 1
        # The same diffusers block dequantizer asked for float32 gives gguf-py's values: the f16 evaluation is
        # the only difference.
        block, size = gguf.constants.GGML_QUANT_SIZES[qt]
        blocks = raw.view(torch.uint8).reshape(-1, size)
        d32 = dequantize_functions[qt](blocks, block, size, dtype=torch.float32).reshape(w.shape).numpy()
        worst["f32_variant_equal"] &= bool(np.array_equal(d32.view(np.uint32), w.view(np.uint32)))
    return exact, worst, digests


# ---------------------------------------------------------------------------------------------------------------
FBC_STEPS = 8


def _first_block_cache(pipe, call: dict, ref: str) -> dict:
    """Runs the pipeline with diffusers' First-Block Cache at a threshold that skips steps.

    Records the relative change diffusers measured at each step and its decision (a wrapper around
    FBCHeadBlockHook._should_compute_remaining_blocks that recomputes the same expression), so the
    parity test can check that the same steps are skipped for the same reasons. The threshold is
    chosen from this seed's own changes: the smallest midpoint between two of the dense run's
    changes whose cached run skips at least one step, computes at least one step after a skip, and
    keeps every observed change at least 1 % away from the threshold (f32 reductions in two
    implementations differ by ~1e-6 relative, so no decision sits on a rounding edge).
    """
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks import first_block_cache as fbc

    log = []
    orig = fbc.FBCHeadBlockHook._should_compute_remaining_blocks

    def logged(self, r):
        prev = self.state_manager.get_state().head_block_residual
        d = None if prev is None else ((r - prev).abs().mean() / prev.abs().mean()).item()
        decision = orig(self, r)
        log.append((d, bool(decision)))
        return decision

    fbc.FBCHeadBlockHook._should_compute_remaining_blocks = logged
    tr = pipe.transformer
    tr_forward = tr.forward

    def in_context(*a, **k):  # FluxFillPipeline does not open a cache context itself (FluxPipeline does)
        with tr.cache_context("cond"):
            return tr_forward(*a, **k)

    def run(threshold: float):
        log.clear()
        tr.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        tr.forward = in_context
        try:
            lat = pipe(**{**call, "num_inference_steps": FBC_STEPS}, output_type="latent").images
        finally:
            del tr.forward
            tr.disable_cache()
        return lat, list(log)

    try:
        _, dense_log = run(0.0)
        assert all(c for _, c in dense_log), "threshold 0 skipped a step"
        changes = sorted(d for d, _ in dense_log if d is not None)
        for lo, hi in zip(changes, changes[1:]):
            threshold = (lo + hi) / 2
            lat, steps = run(threshold)
            skipped = [i for i, (_, c) in enumerate(steps) if not c]
            late = skipped and any(c for _, c in steps[skipped[0] + 1:])
            margin = all(d is None or abs(d - threshold) >= 0.01 * threshold for d, _ in steps)
            if skipped and late and margin:
                break
        else:
            raise SystemExit(f"no first-block-cache threshold skips and recomputes for this seed: {changes}")
    finally:
        fbc.FBCHeadBlockHook._should_compute_remaining_blocks = orig
    dense = pipe(**{**call, "num_inference_steps": FBC_STEPS}, output_type="latent").images
    _save(lat, os.path.join(ref, "latents_fbcache.safetensors"))
    _save(dense, os.path.join(ref, "latents_fbcache_dense.safetensors"))
    rel = ((lat - dense).norm() / dense.norm()).item()
    print(f"first-block cache: threshold {threshold:.4g} skips {skipped} of {FBC_STEPS} steps; "
          f"rel. L2 vs dense {rel:.3e}", file=sys.stderr)
    return {"steps": FBC_STEPS, "threshold": threshold, "skipped": skipped,
            "changes": [d for d, _ in steps], "vs_dense_rel": rel}



def _int8_token_linears(module, name: str) -> bool:
    """The token GEMMs W8A8 applies to: the blocks' linears other than their AdaLN modulations."""
    return (isinstance(module, torch.nn.Linear)
            and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and ".norm" not in name)


def _int8_reference(transformer, tr_kwargs: dict, v0, ref: str) -> dict:
    """torchao's Int8DynamicActivationInt8WeightConfig on the token GEMMs of a copy of the f32
    transformer: its step-0 output, and one linear alone on a real activation (the layer-level
    reference the CPU path must equal to f32 rounding)."""
    import copy

    import torchao
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    q = copy.deepcopy(transformer)
    quantize_(q, Int8DynamicActivationInt8WeightConfig(), filter_fn=_int8_token_linears)
    n = sum(1 for name, m in transformer.named_modules() if _int8_token_linears(m, name))
    out = q(**tr_kwargs)[0]
    _save(out, os.path.join(ref, "int8_transformer_out.safetensors"))
    # One layer on the activation it really sees: single block 0's proj_out input (attention
    # output | GELU MLP), captured from the f32 model.
    seen = {}
    lin = transformer.single_transformer_blocks[0].proj_out

    def keep_input(module, args, output):  # returns None: the output is left as it is
        seen.setdefault("x", args[0].detach().clone())

    h = lin.register_forward_hook(keep_input)
    transformer(**tr_kwargs)
    h.remove()
    x = seen["x"][:, -128:]  # the last 128 tokens (image tokens): rows quantize independently
    y = q.single_transformer_blocks[0].proj_out(x)
    save_file({"x": x.contiguous(), "weight": lin.weight.detach().contiguous(),
               "bias": lin.bias.detach().contiguous(), "y": y.detach().contiguous()},
              os.path.join(ref, "int8_linear.safetensors"))
    rel = ((out - v0).norm() / v0.norm()).item()
    # How far torchao's own output moves when its inputs move by one f32 rounding (relative
    # 2^-24, random signs): on the int8 grid such a change flips a few roundings, and at this
    # size the flips reach the output. Another implementation of the same scheme differs from
    # torchao by a spread of this order; the parity test bounds it so.
    gen = torch.Generator().manual_seed(1234)
    spread = []
    for _ in range(4):
        kw = dict(tr_kwargs)
        for k in ("hidden_states", "encoder_hidden_states"):
            v = tr_kwargs[k]
            kw[k] = v * (1 + 2.0 ** -24 * torch.randn(v.shape, generator=gen).sign())
        o = q(**kw)[0]
        spread.append(((o - out).norm() / out.norm()).item())
    print(f"int8 (torchao {torchao.__version__}): {n} linears, transformer vs f32 {rel:.3e}, "
          f"spread under f32 rounding of the inputs {max(spread):.3e}", file=sys.stderr)
    return {"torchao": torchao.__version__, "linears": n, "vs_dense_rel": rel, "rounding_spread": spread}


def main(seed: int, out: str) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux import pipeline_flux_fill
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    torch.set_grad_enabled(False)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out = os.path.abspath(out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    pipe_dir = os.path.join(out, "pipeline")
    ref = os.path.join(out, "ref")
    os.makedirs(ref)
    manifest = {"seed": seed, "height": HEIGHT, "width": WIDTH, "t5_len": T5_LEN, "steps": STEPS,
                "guidance": GUIDANCE, "prompt": PROMPT}

    # -- tokenizers -------------------------------------------------------------------------------------------
    tmp_tok = os.path.join(out, "_tok")
    _train_clip_tokenizer(tmp_tok)
    clip_tok = CLIPTokenizer.from_pretrained(tmp_tok, model_max_length=77)
    t5_backend = _train_t5_tokenizer()
    t5_tok = T5TokenizerFast(tokenizer_object=t5_backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                             extra_ids=0, model_max_length=512)

    # -- models -----------------------------------------------------------------------------------------------
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # the legacy ids of openai/clip-vit-large-patch14
    )
    clip = CLIPTextModel(clip_cfg).eval()
    t5_cfg = T5Config(
        vocab_size=len(t5_tok), d_model=TRANSFORMER_CFG["joint_attention_dim"], d_kv=16, d_ff=128, num_layers=2,
        num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    t5 = T5EncoderModel(t5_cfg).eval()
    transformer = FluxTransformer2DModel(**TRANSFORMER_CFG).eval()
    vae = AutoencoderKL(**VAE_CFG).eval()
    for m in (clip, t5, transformer, vae):
        _f16_round_(m, gen)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CFG)

    pipe = FluxFillPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                            text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.to(torch.float16)
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    # Shard the two large components like the Hub repo does (index json + several files).
    transformer.to(torch.float16).save_pretrained(os.path.join(pipe_dir, "transformer"), max_shard_size="400KB")
    t5.to(torch.float16).save_pretrained(os.path.join(pipe_dir, "text_encoder_2"), max_shard_size="150KB")
    for sub in ("transformer", "text_encoder_2"):
        d = os.path.join(pipe_dir, sub)
        single = [f for f in os.listdir(d) if f in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
        for f in single:
            os.remove(os.path.join(d, f))
        assert any(f.endswith(".index.json") for f in os.listdir(d)), os.listdir(d)
    # CLIP tokenizer as in the Hub repo: vocab.json + merges.txt only (no tokenizer.json).
    tdir = os.path.join(pipe_dir, "tokenizer")
    for f in os.listdir(tdir):
        if f not in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            os.remove(os.path.join(tdir, f))
    shutil.copy(os.path.join(tmp_tok, "vocab.json"), os.path.join(tdir, "vocab.json"))
    shutil.copy(os.path.join(tmp_tok, "merges.txt"), os.path.join(tdir, "merges.txt"))
    shutil.rmtree(tmp_tok)

    # -- reload everything from disk, f32 ---------------------------------------------------------------------
    pipe = FluxFillPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)
    assert "tokenizer.json" not in os.listdir(tdir)
    # BFL / diffusers FLUX Fill reference encodes with the posterior mean (no RNG).
    pipeline_flux_fill.retrieve_latents = (
        lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode()
    )

    # -- inputs -----------------------------------------------------------------------------------------------
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.stack([
        128 + 100 * np.sin(xx / 7.0 + seed),
        128 + 90 * np.cos(yy / 5.0 - seed),
        128 + 60 * np.sin((xx + yy) / 11.0),
    ], axis=-1)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(img, "RGB")
    # soft-edged blob (a thick diagonal leash) + noise, with values on both sides of the 0.5 threshold
    d = np.abs((yy - HEIGHT * 0.2) - 0.45 * (xx - WIDTH * 0.1)) / 6.0
    mask_f = np.clip(1.5 - d, 0, 1) * 255 + rng.normal(0, 10, d.shape)
    mask_np = np.clip(mask_f, 0, 255).astype(np.uint8)
    mask_np[0, :4] = [127, 128, 129, 126]
    mask = Image.fromarray(mask_np, "L")
    image.save(os.path.join(out, "image.png"))
    mask.save(os.path.join(out, "mask.png"))

    h, w = 2 * (HEIGHT // 16), 2 * (WIDTH // 16)
    noise = torch.randn((1, 16, h, w), generator=gen, dtype=torch.float32)
    packed_noise = pipe._pack_latents(noise, 1, 16, h, w)
    save_file({"noise": noise.contiguous()}, os.path.join(out, "noise.safetensors"))
    _save(packed_noise, os.path.join(ref, "packed_noise.safetensors"))

    # -- text -------------------------------------------------------------------------------------------------
    clip_ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=T5_LEN, truncation=True,
                              return_tensors="pt").input_ids
    extra = {}
    for name, text in [("long", " ".join(CORPUS) * 3), ("odd", "Ünïcode  café\tnaïve — 3.14 <|endoftext|> x")]:
        extra[f"clip_ids_{name}"] = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                                   return_tensors="pt").input_ids
        extra[f"t5_ids_{name}"] = pipe.tokenizer_2(text, padding="max_length", max_length=T5_LEN, truncation=True,
                                                   return_tensors="pt").input_ids
        manifest[f"text_{name}"] = text
    save_file({"clip": clip_ids.to(torch.int64), "t5": t5_ids.to(torch.int64),
               **{k: v.to(torch.int64) for k, v in extra.items()}}, os.path.join(ref, "token_ids.safetensors"))
    pooled = pipe._get_clip_prompt_embeds(PROMPT)
    t5_out = pipe._get_t5_prompt_embeds(PROMPT, max_sequence_length=T5_LEN)
    _save(pooled, os.path.join(ref, "clip_pooled.safetensors"))
    _save(t5_out, os.path.join(ref, "t5.safetensors"))

    # -- image / mask conditioning ------------------------------------------------------------------------------
    init_image = pipe.image_processor.preprocess(image, height=HEIGHT, width=WIDTH).float()
    mask_image = pipe.mask_processor.preprocess(mask, height=HEIGHT, width=WIDTH)
    masked_image = init_image * (1 - mask_image)
    mask_lat, masked_lat = pipe.prepare_mask_latents(mask_image, masked_image, 1, 16, 1, HEIGHT, WIDTH,
                                                     torch.float32, "cpu", None)
    cond = torch.cat((masked_lat, mask_lat), dim=-1)
    _save(init_image, os.path.join(ref, "init_image.safetensors"))
    _save(mask_image, os.path.join(ref, "mask_image.safetensors"))
    _save(masked_lat, os.path.join(ref, "masked_image_latents.safetensors"))
    _save(mask_lat, os.path.join(ref, "mask_latents.safetensors"))

    # -- VAE alone ----------------------------------------------------------------------------------------------
    enc_mean = pipe.vae.encode(init_image).latent_dist.mode()
    _save(enc_mean, os.path.join(ref, "vae_encode_mean.safetensors"))
    dec = pipe.vae.decode(noise).sample
    _save(dec, os.path.join(ref, "vae_decode.safetensors"))
    pipe.vae.enable_tiling()
    assert pipe.vae.tile_latent_min_size == 4 and pipe.vae.tile_sample_min_size == 32
    _save(pipe.vae.decode(noise).sample, os.path.join(ref, "vae_decode_tiled.safetensors"))
    _save(pipe.vae.encode(init_image).latent_dist.mode(), os.path.join(ref, "vae_encode_tiled.safetensors"))
    pipe.vae.disable_tiling()

    # -- schedules ----------------------------------------------------------------------------------------------
    sched_cases = [(STEPS, HEIGHT, WIDTH), (20, 1024, 1024), (50, 1024, 1024), (28, 1632, 1232), (1, 512, 512),
                   (4, 768, 1360)]
    sched = {}
    for n, hh, ww in sched_cases:
        s = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        seq = (hh // 8 // 2) * (ww // 8 // 2)
        mu = pipeline_flux_fill.calculate_shift(seq, 256, 4096, 0.5, 1.15)
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        sched[f"sigmas_{n}_{hh}x{ww}"] = s.sigmas.clone()
        sched[f"timesteps_{n}_{hh}x{ww}"] = s.timesteps.clone()
    save_file(sched, os.path.join(ref, "schedules.safetensors"))
    manifest["schedules"] = [list(c) for c in sched_cases]

    # -- transformer at step 0 ------------------------------------------------------------------------------------
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS),
                                 mu=pipeline_flux_fill.calculate_shift((HEIGHT // 16) * (WIDTH // 16)))
    t0 = pipe.scheduler.timesteps[0]
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(T5_LEN, 3)
    x_in = torch.cat((packed_noise, cond), dim=2)
    tr_kwargs = dict(hidden_states=x_in, timestep=(t0.expand(1) / 1000), guidance=torch.full([1], GUIDANCE),
                     pooled_projections=pooled, encoder_hidden_states=t5_out, txt_ids=txt_ids, img_ids=img_ids,
                     return_dict=False)
    # intermediates (debugging aid): the conditioning vector
    tt = pipe.transformer
    temb = tt.time_text_embed(tr_kwargs["timestep"] * 1000, tr_kwargs["guidance"] * 1000, pooled)
    _save(temb, os.path.join(ref, "temb.safetensors"))
    v0 = pipe.transformer(**tr_kwargs)[0]
    _save(x_in, os.path.join(ref, "transformer_in.safetensors"))
    _save(v0, os.path.join(ref, "transformer_out.safetensors"))
    manifest["t0"] = float(t0)
    manifest["int8"] = _int8_reference(pipe.transformer, tr_kwargs, v0, ref)

    # -- whole pipeline: 2 steps -------------------------------------------------------------------------------------
    call = dict(prompt=PROMPT, image=image, mask_image=mask, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, max_sequence_length=T5_LEN, latents=packed_noise.clone())
    lat = pipe(**call, output_type="latent").images
    _save(lat, os.path.join(ref, "latents_2steps.safetensors"))
    out_pt = pipe(**call, output_type="pt").images  # [1,3,H,W] in [0,1]
    _save(out_pt, os.path.join(ref, "image_2steps.safetensors"))
    pil = pipe(**call, output_type="pil").images[0]
    pil.save(os.path.join(out, "expected_2steps.png"))

    # -- First-Block Cache: diffusers' FirstBlockCacheConfig on the same pipeline -------------------------------------
    manifest["fbcache"] = _first_block_cache(pipe, call, ref)

    # -- BFL single files -----------------------------------------------------------------------------------------
    bfl_dir = os.path.join(out, "bfl")
    os.makedirs(bfl_dir)
    tsd = {k: v.half() for k, v in pipe.transformer.state_dict().items()}
    bfl = transformer_to_bfl(tsd)
    save_file(bfl, os.path.join(bfl_dir, "flux1-fill-dev.safetensors"))
    vsd = {k: v.half() for k, v in pipe.vae.state_dict().items()}
    save_file(vae_to_bfl(vsd, len(VAE_CFG["block_out_channels"])), os.path.join(bfl_dir, "ae.safetensors"))
    # Check the inverse mappings against diffusers' own converters.
    _patched_flux_converter(HIDDEN)
    tb = FluxTransformer2DModel.from_single_file(os.path.join(bfl_dir, "flux1-fill-dev.safetensors"),
                                                 config=pipe_dir, subfolder="transformer", torch_dtype=torch.float32)
    assert torch.equal(tb(**tr_kwargs)[0], v0), "BFL transformer mapping"
    vb = AutoencoderKL.from_single_file(os.path.join(bfl_dir, "ae.safetensors"), config=pipe_dir, subfolder="vae",
                                        torch_dtype=torch.float32)
    assert torch.equal(vb.decode(noise).sample, dec), "BFL VAE mapping"

    # -- GGUF -------------------------------------------------------------------------------------------------------
    import gguf
    from diffusers import GGUFQuantizationConfig

    gdir = os.path.join(out, "gguf")
    os.makedirs(gdir)
    bfl32 = {k: v.float() for k, v in bfl.items()}
    q8 = os.path.join(gdir, "flux1-fill-dev-Q8_0.gguf")
    _write_gguf(bfl32, q8, _gguf_plan(bfl32, 32), gguf.GGMLQuantizationType.Q8_0)
    src = os.path.join(gdir, "_src.gguf")
    plan_k = _gguf_plan(bfl32, 256)
    assert any(v == "Q" for v in plan_k.values()), "no tensor wide enough for a K-quant"
    _write_gguf(bfl32, src, plan_k, None)
    names = os.path.join(gdir, "_names.txt")
    with open(names, "w") as f:
        f.write("\n".join(k for k, v in plan_k.items() if v == "Q") + "\n")
    q5k = os.path.join(gdir, "flux1-fill-dev-Q5_K.gguf")
    subprocess.run(["cargo", "run", "--quiet", "-p", "pawfect-models", "--example", "flux_gguf_quantize", "--",
                    src, q5k, "q5k", names], check=True, cwd=REPO)
    os.remove(src)
    os.remove(names)
    # Two references per file:
    # - "exact": the dense transformer on gguf-py's f32 dequantization of every tensor (what ggml computes);
    #   QuantMatmul::Dequant must match it at the dense bound.
    # - "diffusers": diffusers' own GGUF model. Its dequantize_gguf_tensor evaluates d*q (and the K-quant scale
    #   products) in float16 before casting to compute_dtype, so its weights are rounded; the parity test bounds
    #   that rounding. The weight-level evidence for it goes into the manifest.
    gguf_out, exact_out, digests = {}, {}, {}
    for tag, path in (("q8_0", q8), ("q5_k", q5k)):
        m = FluxTransformer2DModel.from_single_file(
            path, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=pipe_dir,
            subfolder="transformer", torch_dtype=torch.float32)
        gguf_out[tag] = m(**tr_kwargs)[0]
        del m
        exact, evidence, digests[os.path.relpath(path, out)] = _gguf_exact(path)
        exact_file = os.path.join(gdir, f"_exact_{tag}.safetensors")
        save_file(exact, exact_file)
        me = FluxTransformer2DModel.from_single_file(exact_file, config=pipe_dir, subfolder="transformer",
                                                     torch_dtype=torch.float32)
        assert all(p.dtype == torch.float32 for p in me.parameters())
        exact_out[tag] = me(**tr_kwargs)[0]
        del me
        os.remove(exact_file)
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        manifest[f"gguf_{tag}_vs_dense_rel"] = rel(gguf_out[tag], v0)
        manifest[f"gguf_{tag}_diffusers_vs_exact_rel"] = rel(gguf_out[tag], exact_out[tag])
        manifest[f"gguf_{tag}_diffusers_weights"] = evidence
        print(f"gguf {tag}: diffusers vs dense {rel(gguf_out[tag], v0):.3e}, exact vs dense "
              f"{rel(exact_out[tag], v0):.3e}, diffusers vs exact {rel(gguf_out[tag], exact_out[tag]):.3e}; "
              f"weights: {evidence}", file=sys.stderr)
    manifest["gguf_dequant_digest"] = digests
    save_file({k: v.contiguous() for k, v in gguf_out.items()}, os.path.join(ref, "gguf_transformer_out.safetensors"))
    save_file({k: v.contiguous() for k, v in exact_out.items()},
              os.path.join(ref, "gguf_exact_transformer_out.safetensors"))

    manifest["files"] = sorted(
        os.path.relpath(os.path.join(dp, f), out) for dp, _, fs in os.walk(out) for f in fs
    )
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(out, p)) for p in manifest["files"])
    print(f"flux fixtures: {len(manifest['files'])} files, {total / 1e6:.2f} MB in {out}", file=sys.stderr)
