"""Full-size FLUX.1-Fill-dev transformer with random weights: diffusers reference and timings.

    python3 bench/flux_gpu.py reference --work DIR   # weights + inputs + diffusers outputs/timings
    python3 bench/flux_gpu.py compare   --work DIR --rust OUT.safetensors

`reference` builds the Fill transformer (384 in / 64 out, guidance embeds, 19 + 38 blocks) on the GPU
with seeded random weights in fp16, saves it as a diffusers `transformer/` folder, makes random
inputs at 1024x1024 (4096 image tokens, 512 text tokens), runs diffusers eager in fp16 (output and
timing), in fp32 with TF32 off (the reference output) and in bf16 (timing). Prints JSON.
`compare` prints the relative L2 errors of the Rust output against both.
"""
import argparse
import json
import math
import os
import time

import torch
from safetensors.torch import load_file, save_file

FILL = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def init_(model, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g, device="cuda") / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, device="cuda")
            else:
                v = 0.05 * torch.randn(p.shape, generator=g, device="cuda")
            p.copy_(v)


def timed(fn, warmup=2, iters=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[len(ts) // 2], ts


def reference(work, seed):
    from diffusers import FluxTransformer2DModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.makedirs(work, exist_ok=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    t = time.perf_counter()
    with torch.device("cuda"):
        model = FluxTransformer2DModel(**FILL).to(torch.float16).eval()
    init_(model, seed)
    res["init_s"] = time.perf_counter() - t

    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    h = w = 1024
    lh, lw = h // 16, w // 16
    x = torch.randn((1, lh * lw, 384), generator=g, device="cuda")
    txt = torch.randn((1, 512, 4096), generator=g, device="cuda")
    pooled = torch.randn((1, 768), generator=g, device="cuda")
    timestep = torch.tensor([1.0], device="cuda")  # t = 1000 (first step), passed as t/1000
    guidance = torch.tensor([30.0], device="cuda")
    img_ids = torch.zeros(lh, lw, 3)
    img_ids[..., 1] += torch.arange(lh)[:, None]
    img_ids[..., 2] += torch.arange(lw)[None, :]
    img_ids = img_ids.reshape(lh * lw, 3).cuda()
    txt_ids = torch.zeros(512, 3, device="cuda")
    save_file({"hidden_states": x.cpu(), "encoder_hidden_states": txt.cpu(), "pooled": pooled.cpu(),
               "timestep": timestep.cpu(), "guidance": guidance.cpu(),
               "latent_h": torch.tensor([float(lh)]), "latent_w": torch.tensor([float(lw)])},
              os.path.join(work, "inputs.safetensors"))

    def run(dtype):
        with torch.no_grad():
            return model(hidden_states=x.to(dtype), encoder_hidden_states=txt.to(dtype),
                         pooled_projections=pooled.to(dtype), timestep=timestep.to(dtype), guidance=guidance,
                         txt_ids=txt_ids.to(dtype), img_ids=img_ids.to(dtype), return_dict=False)[0]

    t = time.perf_counter()
    model.save_pretrained(os.path.join(work, "transformer"), max_shard_size="10GB")
    res["save_s"] = time.perf_counter() - t

    y16 = run(torch.float16)
    res["fp16_ms"], res["fp16_all_ms"] = timed(lambda: run(torch.float16))
    res["fp16_finite"] = bool(torch.isfinite(y16).all())
    model.to(torch.float32)
    y32 = run(torch.float32)
    res["fp32_ms"], _ = timed(lambda: run(torch.float32), warmup=1, iters=2)
    model.to(torch.bfloat16)
    ybf = run(torch.bfloat16)
    res["bf16_ms"], res["bf16_all_ms"] = timed(lambda: run(torch.bfloat16))
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    res["diffusers_fp16_vs_fp32_rel"] = rel(y16, y32)
    res["diffusers_bf16_vs_fp32_rel"] = rel(ybf, y32)
    save_file({"fp16": y16.float().cpu(), "fp32": y32.float().cpu(), "bf16": ybf.float().cpu()},
              os.path.join(work, "diffusers_out.safetensors"))
    res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res))


def compare(work, rust):
    ref = load_file(os.path.join(work, "diffusers_out.safetensors"))
    y = load_file(rust)["sample"]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(json.dumps({"rust_fp16_vs_diffusers_fp16_rel": rel(y, ref["fp16"]),
                      "rust_fp16_vs_diffusers_fp32_rel": rel(y, ref["fp32"]),
                      "rust_finite": bool(torch.isfinite(y).all()), "shape": list(y.shape)}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["reference", "compare"])
    p.add_argument("--work", required=True)
    p.add_argument("--rust")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    reference(a.work, a.seed) if a.stage == "reference" else compare(a.work, a.rust)
