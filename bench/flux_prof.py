"""Lean companion of flux_gpu.py for `flux_prof.sh`: the same seeded random full-size Fill transformer
(fp16) and inputs as `flux_gpu.py reference --sizes 1024,512`, but only diffusers fp16 (output and
timing) at 1024² and 512², so a profiling run fits a short device call.

    python3 bench/flux_prof.py reference --work DIR
    python3 bench/flux_prof.py compare --work DIR --rust OUT.safetensors --size 1024
"""
import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_gpu import FILL, init_, make_inputs, timed  # noqa: E402


def reference(work, seed):
    from diffusers import FluxTransformer2DModel

    os.makedirs(work, exist_ok=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    t = time.perf_counter()
    with torch.device("cuda"):
        model = FluxTransformer2DModel(**FILL).to(torch.float16).eval()
    init_(model, seed)
    res["init_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    model.save_pretrained(os.path.join(work, "transformer"), max_shard_size="10GB")
    res["save_s"] = round(time.perf_counter() - t, 1)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    timestep = torch.tensor([1.0], device="cuda")
    guidance = torch.tensor([30.0], device="cuda")
    txt_ids = torch.zeros(512, 3, device="cuda")
    for size in (1024, 512):
        x, txt, pooled, ids, lh, lw = make_inputs(g, size, size)
        name = "inputs.safetensors" if size == 1024 else f"inputs_{size}.safetensors"
        save_file({"hidden_states": x.cpu(), "encoder_hidden_states": txt.cpu(), "pooled": pooled.cpu(),
                   "timestep": timestep.cpu(), "guidance": guidance.cpu(),
                   "latent_h": torch.tensor([float(lh)]), "latent_w": torch.tensor([float(lw)])},
                  os.path.join(work, name))

        def run():
            with torch.no_grad():
                h = torch.float16
                return model(hidden_states=x.to(h), encoder_hidden_states=txt.to(h),
                             pooled_projections=pooled.to(h), timestep=timestep.to(h), guidance=guidance,
                             txt_ids=txt_ids.to(h), img_ids=ids.to(h), return_dict=False)[0]

        y = run()
        res[f"fp16_ms_{size}"], res[f"fp16_all_ms_{size}"] = timed(run)
        save_file({"fp16": y.float().cpu()}, os.path.join(work, f"prof_diffusers_{size}.safetensors"))
    print(json.dumps(res))


def compare(work, rust, size):
    y = load_file(rust)["sample"]
    ref = load_file(os.path.join(work, f"prof_diffusers_{size}.safetensors"))["fp16"]
    print(json.dumps({"size": size, "rust": os.path.basename(rust),
                      "rust_fp16_vs_diffusers_fp16_rel": float((y - ref).norm() / ref.norm()),
                      "rust_finite": bool(torch.isfinite(y).all())}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["reference", "compare"])
    p.add_argument("--work", required=True)
    p.add_argument("--rust")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=1024)
    a = p.parse_args()
    if a.stage == "reference":
        reference(a.work, a.seed)
    else:
        compare(a.work, a.rust, a.size)
