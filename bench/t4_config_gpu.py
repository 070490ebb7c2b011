"""Helpers of bench/t4_config_gpu.sh (the default T4 worker configuration at real size).

    python3 bench/t4_config_gpu.py folder --out DIR --tokenizers FIXTURE_PIPELINE [--device cuda]
    python3 bench/t4_config_gpu.py memory --samples MEM.txt --log RUN.log --start MS --end MS [--summary RUN.json]

`folder` writes the FLUX.1-Fill-dev diffusers folder as `fetch-models --variant q5_k_m` leaves it:
model_index.json, scheduler, tokenizers (taken from the tiny fixture: the real ones cannot be
downloaded here; prompts are padded to 512 T5 tokens either way), CLIP-L (`text_encoder`, 123 M
parameters) and the FLUX VAE with random weights in fp16 (the initialisation of
`flux_gpu_pipeline.py`), and the configs of `transformer/` and `text_encoder_2/` without their
weights (those come from the GGUF files).

`memory` reads the nvidia-smi samples (`<unix ms> <MiB used>` a line) of one worker process run
between `--start` and `--end` (unix ms) and its log, and prints JSON: the peak, the memory before
the process, and the memory when each "loaded" log line was written; with `--summary` (the
`inpaint --json` output) also the peak of each stage, the stage windows placed from the "prompt
chosen" log line (end of the caption) and the stage durations (encode, denoise, then decode, stitch
and store up to the end of the process), to within the 100 ms sampling period.
"""
import argparse
import datetime
import json
import math
import os
import re
import shutil


def init_(model, seed, device):
    import torch

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


TRANSFORMER_CONFIG = {
    "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 384, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "out_channels": 64, "patch_size": 1,
    "pooled_projection_dim": 768,
}


def folder(out, tok_dir, device):
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config

    torch.set_grad_enabled(False)
    os.makedirs(out, exist_ok=True)
    for sub in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(os.path.join(tok_dir, sub), os.path.join(out, sub), dirs_exist_ok=True)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
        pad_token_id=1))
    for i, (sub, m) in enumerate((("vae", vae), ("text_encoder", clip))):
        m = m.to(device).eval()
        init_(m, 101 + i, device)
        m.to(torch.float16).save_pretrained(os.path.join(out, sub))
    os.makedirs(os.path.join(out, "transformer"), exist_ok=True)
    with open(os.path.join(out, "transformer", "config.json"), "w") as f:
        json.dump(TRANSFORMER_CONFIG, f, indent=2)
    T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
             relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
             is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False, dropout_rate=0.0,
             architectures=["T5EncoderModel"]).save_pretrained(os.path.join(out, "text_encoder_2"))
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump({
            "_class_name": "FluxFillPipeline", "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        }, f, indent=2)
    print(json.dumps({"folder": out, "files": sorted(
        os.path.relpath(os.path.join(d, n), out) for d, _, ns in os.walk(out) for n in ns)}))


ANSI = re.compile(r"\x1b\[[0-9;]*m")
TS = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z)\s+\S+\s+(.*)$")


def _log_time(ts):
    ts = ts.rstrip("Z")
    ts = ts[:26] if "." in ts else ts
    return datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp() * 1000


def memory(samples, log, start, end, summary=None):
    rows = []
    for line in open(samples):
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            rows.append((int(parts[0]), int(parts[1])))
    before = [m for t, m in rows if t < start]
    during = [(t, m) for t, m in rows if start <= t <= end]
    res = {"samples": len(during), "mib_before_process": before[-1] if before else None,
           "peak_mib": max((m for _, m in during), default=None)}
    if during:
        t_peak = max(during, key=lambda x: x[1])[0]
        res["peak_at_s_after_start"] = round((t_peak - start) / 1000, 2)
    events = []
    prompt_at = None
    for line in open(log, errors="replace"):
        m = TS.match(ANSI.sub("", line.strip()))
        if m and "prompt chosen" in m.group(2):
            prompt_at = _log_time(m.group(1))
        if not m or "loaded" not in m.group(2):
            continue
        t = _log_time(m.group(1))
        upto = [mm for tt, mm in rows if start <= tt <= t]
        events.append({"event": m.group(2)[:120], "at_s": round((t - start) / 1000, 2),
                       "mib_then": upto[-1] if upto else None, "peak_mib_until_then": max(upto, default=None)})
    res["load_events"] = events
    if summary and prompt_at is not None:
        tm = json.load(open(summary))["timings"]
        bounds = [("load+caption", start, prompt_at)]
        t = prompt_at
        for stage in ("encode", "denoise"):
            bounds.append((stage, t, t + tm[stage]))
            t += tm[stage]
        bounds.append(("decode..end", t, end))
        res["stage_peak_mib"] = {
            name: max((mm for tt, mm in rows if a <= tt <= b), default=None) for name, a, b in bounds}
    print(json.dumps(res))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["folder", "memory"])
    p.add_argument("--out")
    p.add_argument("--tokenizers")
    p.add_argument("--device", default="cuda")
    p.add_argument("--samples")
    p.add_argument("--log")
    p.add_argument("--start", type=int)
    p.add_argument("--end", type=int)
    p.add_argument("--summary")
    a = p.parse_args()
    if a.cmd == "folder":
        folder(a.out, a.tokenizers, a.device)
    else:
        memory(a.samples, a.log, a.start, a.end, a.summary)
