"""Full-size FLUX.1-Fill-dev transformer with random weights: diffusers reference and timings.

    python3 bench/flux_gpu.py reference --work DIR   # weights + inputs + diffusers outputs/timings
    python3 bench/flux_gpu.py compare   --work DIR --rust OUT.safetensors
    python3 bench/flux_gpu.py tiny      --work DIR [--fixtures tests/fixtures/flux]

`reference` builds the Fill transformer (384 in / 64 out, guidance embeds, 19 + 38 blocks) on the GPU
with seeded random weights in fp16, saves it as a diffusers `transformer/` folder, makes random
inputs at 1024x1024 (4096 image tokens, 512 text tokens), runs diffusers eager in fp16 (output and
timing), in fp32 with TF32 off (the reference output) and in bf16 (timing). Prints JSON.
`compare` prints the relative L2 errors of the Rust output against both. `reference --sizes 1024,768,512`
also writes inputs and diffusers fp16 outputs/timings at the other sizes (`inputs_768.safetensors`, …).
`tiny` writes `tiny_inputs.safetensors` for `flux_step` from the tiny fixture's reference tensors (the
transformer input of the CPU parity test), so the Rust transformer can be checked on the GPU against
the fixture's diffusers outputs (`ref/transformer_out`, `ref/gguf_transformer_out`).
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


def make_inputs(g, h, w):
    lh, lw = h // 16, w // 16
    x = torch.randn((1, lh * lw, 384), generator=g, device="cuda")
    txt = torch.randn((1, 512, 4096), generator=g, device="cuda")
    pooled = torch.randn((1, 768), generator=g, device="cuda")
    img_ids = torch.zeros(lh, lw, 3)
    img_ids[..., 1] += torch.arange(lh)[:, None]
    img_ids[..., 2] += torch.arange(lw)[None, :]
    img_ids = img_ids.reshape(lh * lw, 3).cuda()
    return x, txt, pooled, img_ids, lh, lw


def reference(work, seed, sizes):
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
    x, txt, pooled, img_ids, lh, lw = make_inputs(g, 1024, 1024)
    timestep = torch.tensor([1.0], device="cuda")  # t = 1000 (first step), passed as t/1000
    guidance = torch.tensor([30.0], device="cuda")
    txt_ids = torch.zeros(512, 3, device="cuda")
    save_file({"hidden_states": x.cpu(), "encoder_hidden_states": txt.cpu(), "pooled": pooled.cpu(),
               "timestep": timestep.cpu(), "guidance": guidance.cpu(),
               "latent_h": torch.tensor([float(lh)]), "latent_w": torch.tensor([float(lw)])},
              os.path.join(work, "inputs.safetensors"))

    def run(dtype, x=x, txt=txt, pooled=pooled, img_ids=img_ids):
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
    res["fp16_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    for size in sizes:
        if size == 1024:
            continue
        xs, ts_, ps, ids, sh, sw = make_inputs(g, size, size)
        save_file({"hidden_states": xs.cpu(), "encoder_hidden_states": ts_.cpu(), "pooled": ps.cpu(),
                   "timestep": timestep.cpu(), "guidance": guidance.cpu(),
                   "latent_h": torch.tensor([float(sh)]), "latent_w": torch.tensor([float(sw)])},
                  os.path.join(work, f"inputs_{size}.safetensors"))
        ys = run(torch.float16, xs, ts_, ps, ids)
        res[f"fp16_ms_{size}"], _ = timed(lambda: run(torch.float16, xs, ts_, ps, ids))
        save_file({"fp16": ys.float().cpu()}, os.path.join(work, f"diffusers_out_{size}.safetensors"))
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


def compare(work, rust, size):
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    y = load_file(rust)["sample"]
    if size != 1024:
        ref = load_file(os.path.join(work, f"diffusers_out_{size}.safetensors"))
        print(json.dumps({"size": size, "rust_fp16_vs_diffusers_fp16_rel": rel(y, ref["fp16"]),
                          "rust_finite": bool(torch.isfinite(y).all()), "shape": list(y.shape)}))
        return
    ref = load_file(os.path.join(work, "diffusers_out.safetensors"))
    print(json.dumps({"size": size, "rust_fp16_vs_diffusers_fp16_rel": rel(y, ref["fp16"]),
                      "rust_fp16_vs_diffusers_fp32_rel": rel(y, ref["fp32"]),
                      "rust_finite": bool(torch.isfinite(y).all()), "shape": list(y.shape)}))


def tiny(work, fixtures):
    """flux_step inputs from the tiny fixture (the transformer input of the CPU parity test)."""
    os.makedirs(work, exist_ok=True)
    m = json.load(open(os.path.join(fixtures, "manifest.json")))
    ref = lambda n: load_file(os.path.join(fixtures, "ref", n + ".safetensors"))["data"]  # noqa: E731
    save_file({"hidden_states": ref("transformer_in"), "encoder_hidden_states": ref("t5"),
               "pooled": ref("clip_pooled"), "timestep": torch.tensor([m["t0"] / 1000.0]),
               "guidance": torch.tensor([float(m["guidance"])]),
               "latent_h": torch.tensor([float(m["height"] // 16)]),
               "latent_w": torch.tensor([float(m["width"] // 16)])},
              os.path.join(work, "tiny_inputs.safetensors"))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["reference", "compare", "tiny"])
    p.add_argument("--work", required=True)
    p.add_argument("--rust")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default="1024", help="comma-separated square sizes (reference)")
    p.add_argument("--size", type=int, default=1024, help="size of the Rust output (compare)")
    p.add_argument("--fixtures", default="tests/fixtures/flux")
    a = p.parse_args()
    if a.stage == "reference":
        reference(a.work, a.seed, [int(s) for s in a.sizes.split(",")])
    elif a.stage == "compare":
        compare(a.work, a.rust, a.size)
    else:
        tiny(a.work, a.fixtures)
