"""Florence-2-base-sized random-weight model on the GPU: transformers baseline and report.

    python3 bench/florence2_gpu.py make   --out DIR --tokenizer tests/fixtures/florence2/native/tokenizer.json
    python3 bench/florence2_gpu.py time   --model DIR --image IMG --json OUT.json
    python3 bench/florence2_gpu.py report --dir DIR

`make` writes a native-layout checkpoint with Florence-2-base's shapes (DaViT 128-256-512-1024,
depths 1-1-9-1, BART-base 6+6 layers, 51328 tokens) and random weights, fp16, with Florence-2-base's
generation config and a 768×768 image processor; the tokenizer only has to be valid (prompt ids do
not matter for timing). `time` measures transformers' `generate` (fp16, eager attention, 64 new
tokens, beam 3 and greedy) the same way the candle binary is measured: the image is already 768×768
(no resize), vision + encoder + decoding included, warm runs, median.
"""
import argparse
import json
import os
import shutil
import statistics
import time

import numpy as np
import torch
from PIL import Image

MAX_NEW = int(os.environ.get("MAX_NEW", "64"))
DEV = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" only to dry-run the script


def make(out: str, tokenizer: str, image: str) -> None:
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration, GenerationConfig

    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    text = BartConfig(
        vocab_size=51328, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
        activation_function="gelu", scale_embedding=False, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        decoder_start_token_id=2,
    )
    cfg = Florence2Config(vision_config=dict(projection_dim=768), text_config=text.to_dict(), image_token_id=51289)
    with torch.device(DEV):
        model = Florence2ForConditionalGeneration(cfg)
    model = model.half().eval()
    model.generation_config = GenerationConfig(
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
        forced_eos_token_id=2, num_beams=3, no_repeat_ngram_size=3, early_stopping=True,
    )
    model.save_pretrained(out)
    shutil.copy(tokenizer, os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump({
            "do_resize": True, "size": {"height": 768, "width": 768}, "resample": 3, "do_center_crop": False,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "image_seq_length": 577,
        }, f)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8), "RGB").save(image)


def _pixel_values(image: str) -> torch.Tensor:
    img = Image.open(image).convert("RGB").resize((768, 768), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def time_transformers(model_dir: str, image: str, out: str, runs: int = 5) -> None:
    from transformers import Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float16, attn_implementation="eager").to(DEV).eval()
    pv = _pixel_values(image).to(DEV).half()
    # <image>×577 + <s> + 11 prompt tokens + </s> (ids are irrelevant for timing)
    prompt = [0] + list(range(300, 311)) + [2]
    ids = torch.tensor([[51289] * 577 + prompt], device=DEV)
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__}
    import transformers
    res["transformers"] = transformers.__version__
    def sync():
        if DEV == "cuda":
            torch.cuda.synchronize()

    for beams in (3, 1):
        kw = dict(input_ids=ids, pixel_values=pv, max_new_tokens=MAX_NEW, num_beams=beams)
        with torch.no_grad():
            for _ in range(2):
                model.generate(**kw)
            times, n = [], 0
            for _ in range(runs):
                sync()
                t = time.perf_counter()
                g = model.generate(**kw)
                sync()
                times.append((time.perf_counter() - t) * 1e3)
                n = g.shape[1] - 1
        res[f"beam{beams}"] = {"ms": times, "median_ms": statistics.median(times), "new_tokens": n, "ids": g[0].tolist()}
    with open(out, "w") as f:
        json.dump(res, f)


def report(d: str) -> None:
    tf = json.load(open(os.path.join(d, "transformers.json")))
    print(f"device: {tf['device']}  torch {tf['torch']}  transformers {tf['transformers']}")
    for beams in (3, 1):
        path = os.path.join(d, f"candle_beam{beams}.json")
        t = tf[f"beam{beams}"]
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            print(f"beam {beams}: candle failed; transformers {t['median_ms']:.1f} ms ({t['new_tokens']} new tokens)")
            continue
        c = json.load(open(path))
        warm = c["caption_ms"][1:] or c["caption_ms"]
        cm = statistics.median(warm)
        same = c["ids"] == t["ids"]
        print(
            f"beam {beams}: candle {cm:.1f} ms ({len(c['ids']) - 1} new tokens, first run {c['caption_ms'][0]:.0f} ms, "
            f"load {c['load_ms']:.0f} ms)  transformers {t['median_ms']:.1f} ms ({t['new_tokens']} new tokens)  "
            f"ratio {cm / t['median_ms']:.2f}  ids identical: {same}"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["make", "time", "report"])
    p.add_argument("--out")
    p.add_argument("--tokenizer")
    p.add_argument("--image")
    p.add_argument("--model")
    p.add_argument("--json")
    p.add_argument("--dir")
    a = p.parse_args()
    if a.cmd == "make":
        make(a.out, a.tokenizer, a.image)
    elif a.cmd == "time":
        time_transformers(a.model, a.image, a.json)
    else:
        report(a.dir)


if __name__ == "__main__":
    main()
