"""Whole FluxFillPipeline at full size with random weights: diffusers vs `pawfect-worker inpaint`.

    python3 bench/flux_gpu_pipeline.py build --work DIR --tokenizers FIXTURE_PIPELINE [--tiny] [--device cuda]
    python3 bench/flux_gpu_pipeline.py compare --work DIR --rust OUT.png [--rust-trace TRACE.safetensors]

`build` writes a diffusers folder (FLUX.1-Fill-dev sizes: transformer 11.9 B, T5-XXL, CLIP-L, FLUX VAE;
seeded random weights, fp16; tokenizers taken from the tiny fixture since the real ones cannot be
downloaded here), a 1024x1024 image + mask + noise, and runs diffusers' FluxFillPipeline in fp16 with
that noise and the posterior mean (as the Rust pipeline): `expected.png` and timings (JSON on stdout).
`--tiny` uses the fixture's own sizes (a CPU check of this script). `build` also writes
`diffusers_trace.safetensors`: the T5 and CLIP embeddings and the condition the transformer saw (first
call), the unscaled latents `z` handed to the VAE, that image, and the same `z` decoded by the VAE in
fp32 (`image_vae32`). `compare --rust-trace` (the `flux_step --pipeline` trace) splits the image
difference by component: text encoders, condition (VAE encode), transformer loop, VAE decode.
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

PROMPT = "weathered wooden deck boards, seamless continuation, no objects"


def init_(model, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g, device=device) / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device)
            else:
                v = 0.05 * torch.randn(p.shape, generator=g, device=device)
            p.copy_(v)


def build(work, tok_dir, tiny, device, steps, size):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux import pipeline_flux_fill
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.set_grad_enabled(False)
    dtype = torch.float16 if device == "cuda" else torch.float32
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer"))
    t5_tok = T5Tokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer_2"))
    rd = lambda sub: json.load(open(os.path.join(tok_dir, sub, "config.json")))  # noqa: E731
    if tiny:
        tcfg = {k: v for k, v in rd("transformer").items() if not k.startswith("_")}
        vcfg = {k: v for k, v in rd("vae").items() if not k.startswith("_")}
        ccfg = CLIPTextConfig(**{k: v for k, v in rd("text_encoder").items() if not k.startswith("_")})
        t5cfg = T5Config(**{k: v for k, v in rd("text_encoder_2").items() if not k.startswith("_")})
    else:
        tcfg = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        vcfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                    layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                    mid_block_add_attention=True)
        ccfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                              projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        t5cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         relative_attention_num_buckets=32, relative_attention_max_distance=128,
                         feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                         tie_word_embeddings=False, dropout_rate=0.0)
    t = time.perf_counter()
    parts = {}
    for i, (name, make) in enumerate([("transformer", lambda: FluxTransformer2DModel(**tcfg)),
                                      ("vae", lambda: AutoencoderKL(**vcfg)),
                                      ("text_encoder", lambda: CLIPTextModel(ccfg)),
                                      ("text_encoder_2", lambda: T5EncoderModel(t5cfg))]):
        with torch.device(device):
            m = make().eval()
        init_(m, 100 + i, device)
        parts[name] = m.to(dtype)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(tok_dir, "scheduler"))
    pipe = FluxFillPipeline(scheduler=sched, tokenizer=clip_tok, tokenizer_2=t5_tok, **parts)
    res["init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe.save_pretrained(os.path.join(work, "pipeline"), max_shard_size="10GB")
    res["save_s"] = time.perf_counter() - t

    h = w = 64 if tiny else size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 37.0), 128 + 90 * np.cos(yy / 23.0), 128 + 60 * np.sin((xx + yy) / 51.0)], -1)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    d = np.abs((yy - h * 0.2) - 0.45 * (xx - w * 0.1)) / (h / 40)
    mask = Image.fromarray((np.clip(1.5 - d, 0, 1) * 255).astype(np.uint8), "L")
    image.save(os.path.join(work, "image.png"))
    mask.save(os.path.join(work, "mask.png"))
    lh, lw = 2 * (h // 16), 2 * (w // 16)
    noise = torch.randn((1, 16, lh, lw), generator=torch.Generator().manual_seed(5))
    save_file({"noise": noise}, os.path.join(work, "noise.safetensors"))

    pipeline_flux_fill.retrieve_latents = lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode()
    packed = pipe._pack_latents(noise, 1, 16, lh, lw).to(device, dtype)
    call = dict(prompt=PROMPT, image=image, mask_image=mask, height=h, width=w, num_inference_steps=steps,
                guidance_scale=30.0, max_sequence_length=512, latents=packed)
    out = pipe(**call).images[0]  # warm-up (and the reference image)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trace = {}

    def first_call(_mod, args, kwargs):
        if "t5" not in trace:
            trace["t5"] = kwargs["encoder_hidden_states"].float().cpu()
            trace["pooled"] = kwargs["pooled_projections"].float().cpu()
            trace["cond"] = kwargs["hidden_states"][..., 64:].float().cpu()

    hook = pipe.transformer.register_forward_pre_hook(first_call, with_kwargs=True)
    decode = pipe.vae.decode

    def decode_traced(z, *a, **k):
        trace["z"] = z.float().cpu()
        return decode(z, *a, **k)

    pipe.vae.decode = decode_traced
    t = time.perf_counter()
    out = pipe(**call).images[0]
    if device == "cuda":
        torch.cuda.synchronize()
        res["diffusers_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["diffusers_pipeline_s"] = time.perf_counter() - t
    hook.remove()
    pipe.vae.decode = decode
    trace["image"] = torch.from_numpy(np.asarray(out).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    vae32 = pipe.vae.to(torch.float32)
    trace["image_vae32"] = (vae32.decode(trace["z"].to(device)).sample / 2 + 0.5).clamp(0, 1).float().cpu()
    save_file({k: v.contiguous() for k, v in trace.items()}, os.path.join(work, "diffusers_trace.safetensors"))
    res["steps"] = steps
    res["size"] = [h, w]
    out.save(os.path.join(work, "expected.png"))
    print(json.dumps(res))


def compare(work, rust, rust_trace, t5_f32=False):
    from safetensors.torch import load_file

    res = {}
    if rust:
        a = np.asarray(Image.open(rust).convert("RGB")).astype(np.float64)
        b = np.asarray(Image.open(os.path.join(work, "expected.png")).convert("RGB")).astype(np.float64)
        m = np.asarray(Image.open(os.path.join(work, "mask.png"))) >= 128
        res.update({"mean_abs_err_255": float(np.abs(a - b).mean()),
                    "mean_abs_err_255_in_mask": float(np.abs(a - b)[m].mean()),
                    "max_abs_err_255": float(np.abs(a - b).max()), "rust_std": float(a.std()),
                    "diffusers_std": float(b.std())})
    if rust_trace:
        r = load_file(rust_trace)
        d = load_file(os.path.join(work, "diffusers_trace.safetensors"))
        rel = lambda x, y: float((x.float() - y.float()).norm() / y.float().norm())  # noqa: E731
        u8 = lambda x: (x.float().clamp(0, 1) * 255).round()  # noqa: E731
        mae = lambda x, y: float((u8(x) - u8(y)).abs().mean())  # noqa: E731
        res["rel_t5"] = rel(r["t5"], d["t5"])
        res["rel_pooled"] = rel(r["pooled"], d["pooled"])
        res["rel_cond"] = rel(r["cond"], d["cond"])
        res["rel_z"] = rel(r["z"], d["z"])
        if "z_dinputs" in r:
            res["rel_z_with_diffusers_inputs"] = rel(r["z_dinputs"], d["z"])
            res["mae255_rust_vae_on_diffusers_z"] = mae(r["image_dz"], d["image"])
            res["mae255_rust_vae32_on_diffusers_z_vs_diffusers_vae32"] = mae(r["image_dz_vae32"], d["image_vae32"])
            res["mae255_rust_vae32_own_z_vs_diffusers"] = mae(r["image_vae32"], d["image"])
        res["mae255_image"] = mae(r["image"], d["image"])
        if t5_f32:
            # Both T5 outputs against the same encoder in fp32: which side the fp16 difference is on.
            from transformers import T5EncoderModel, T5Tokenizer

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            tok = T5Tokenizer.from_pretrained(os.path.join(work, "pipeline", "tokenizer_2"))
            ids = tok(PROMPT, padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids
            enc = T5EncoderModel.from_pretrained(os.path.join(work, "pipeline", "text_encoder_2"),
                                                 torch_dtype=torch.float32).to(dev).eval()
            with torch.no_grad():
                ref = enc(ids.to(dev))[0].float().cpu()
            res["rel_t5_rust_vs_fp32"] = rel(r["t5"], ref)
            res["rel_t5_diffusers_fp16_vs_fp32"] = rel(d["t5"], ref)
            res["t5_fp32_absmax"] = float(ref.abs().max())
        res["mae255_diffusers_vae16_vs_vae32"] = mae(d["image"], d["image_vae32"])
    print(json.dumps(res))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["build", "compare"])
    p.add_argument("--work", required=True)
    p.add_argument("--tokenizers")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rust")
    p.add_argument("--rust-trace")
    p.add_argument("--t5-f32", action="store_true", help="also compare both T5 outputs with T5 in fp32")
    a = p.parse_args()
    if a.stage == "build":
        os.makedirs(a.work, exist_ok=True)
        build(a.work, a.tokenizers, a.tiny, a.device, a.steps, a.size)
    else:
        compare(a.work, a.rust, a.rust_trace, a.t5_f32)
