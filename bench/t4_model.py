#!/usr/bin/env python3
"""T4 time model of one job from the work counts the worker reported (`inpaint --json`).

    python3 bench/t4_model.py WORKER_JSON [--fast] [--results bench/results.json] [--allow-nonstandard]

WORKER_JSON is the stdout of `pawfect-worker inpaint --json` (its `work.total` counts). The model:

    t4_modelled_s = f16GemmFlop / 39e12 + int8GemmOp / 78e12
                  + attentionFlop / 29e12 + memoryBoundBytes / 224e9

Written into RESULTS (through bench/merge_results.py): `standard_job_flops` (the four classes of
`work.total`, snake_case) and `t4_modelled_s_default`, plus `t4_model_inputs` (where the counts
came from, the per-stage seconds). Only a standard job is accepted unless --allow-nonstandard:
one 1024x768 crop, 20 steps, 512 T5 tokens, and denoise attention equal to that of the full-size
FLUX.1-Fill-dev transformer (19 + 38 blocks, 24 heads of 128) over 512 + 3072 tokens, so a run
of another model size is refused rather than recorded.

--fast: WORKER_JSON is the standard job in the fast configuration (First-Block Cache on; int8
when the worker has it). Writes `standard_job_flops_fast`, `t4_modelled_s_fast`,
`fbcache_steps_skipped_standard` (the worker's `work.steps.cached`) and `t4_model_inputs_fast`
instead; the attention check then counts a cached step as one block. Stdlib only.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

# Peak rates of an NVIDIA T4 used by the model (dense fp16 tensor-core FLOP/s, int8 tensor-core
# OP/s, attention FLOP/s, DRAM bytes/s).
F16_GEMM_PEAK = 39e12
INT8_GEMM_PEAK = 78e12
ATTENTION_PEAK = 29e12
MEMORY_BW = 224e9

# The API's camelCase class names (InpaintJob status `work`, `inpaint --json`) and results.json's.
CLASSES = [
    ("f16GemmFlop", "f16_gemm_flop", F16_GEMM_PEAK),
    ("int8GemmOp", "int8_gemm_op", INT8_GEMM_PEAK),
    ("attentionFlop", "attention_flop", ATTENTION_PEAK),
    ("memoryBoundBytes", "memory_bound_bytes", MEMORY_BW),
]
STAGES = ["caption", "encode", "denoise", "decode"]

# The standard job: the example photo with the defaults.
STANDARD_TARGET = [1024, 768]
STANDARD_STEPS = 20
STANDARD_TEXT_TOKENS = 512
# FLUX.1-Fill-dev (transformer/config.json): blocks, heads, head dim.
FULL_BLOCKS, FULL_HEADS, FULL_HEAD_DIM = 19 + 38, 24, 128


def modelled_seconds(counts):
    """Seconds on a T4 for one object of camelCase class counts."""
    return sum(int(counts.get(api, 0)) / peak for api, _, peak in CLASSES)


def image_tokens(target):
    w, h = target
    return (w // 16) * (h // 16)


def standard_problems(summary):
    """Why `summary` is not the standard job (empty when it is)."""
    problems = []
    crops = summary.get("crops") or []
    if len(crops) != 1 or crops[0].get("target") != STANDARD_TARGET:
        problems.append(f"crops {[c.get('target') for c in crops]} (want one {STANDARD_TARGET})")
    if summary.get("steps") != STANDARD_STEPS:
        problems.append(f"steps {summary.get('steps')} (want {STANDARD_STEPS})")
    if summary.get("maxSequenceLength") != STANDARD_TEXT_TOKENS:
        problems.append(
            f"text tokens {summary.get('maxSequenceLength')} (want {STANDARD_TEXT_TOKENS})"
        )
    steps = summary.get("work", {}).get("steps") or {"computed": STANDARD_STEPS, "cached": 0}
    computed, cached = steps.get("computed", 0), steps.get("cached", 0)
    if not problems and computed + cached != STANDARD_STEPS:
        problems.append(f"work.steps {steps} does not add up to {STANDARD_STEPS}")
    if not problems:
        n = STANDARD_TEXT_TOKENS + image_tokens(STANDARD_TARGET)
        # A step served by the First-Block Cache ran the first block only.
        blocks = computed * FULL_BLOCKS + cached
        want = blocks * 4 * FULL_HEADS * n * n * FULL_HEAD_DIM
        got = summary["work"].get("denoise", {}).get("attentionFlop")
        if got != want:
            problems.append(
                f"denoise attention {got} FLOP is not the full-size transformer's {want}"
            )
    return problems


def results_from(summary, source, fast=False):
    work = summary.get("work")
    if not isinstance(work, dict) or not isinstance(work.get("total"), dict):
        raise ValueError("no work.total in the worker's JSON (a worker without work accounting?)")
    total = work["total"]
    missing = [api for api, _, _ in CLASSES if not isinstance(total.get(api), int)]
    if missing:
        raise ValueError(f"work.total lacks {missing}")
    flops = {key: total[api] for api, key, _ in CLASSES}
    by_stage = {s: modelled_seconds(work[s]) for s in STAGES if isinstance(work.get(s), dict)}
    inputs = {
        "source": source,
        "crops": [c.get("target") for c in summary.get("crops", [])],
        "steps": summary.get("steps"),
        "text_tokens": summary.get("maxSequenceLength"),
        "image_tokens": sum(image_tokens(c["target"]) for c in summary.get("crops", [])),
        "prompt_source": summary.get("promptSource"),
        "peaks": {
            "f16_gemm_flop_per_s": F16_GEMM_PEAK,
            "int8_gemm_op_per_s": INT8_GEMM_PEAK,
            "attention_flop_per_s": ATTENTION_PEAK,
            "memory_bytes_per_s": MEMORY_BW,
        },
        "modelled_s_by_stage": by_stage,
        "measured_ms_by_stage": summary.get("timings"),
    }
    if fast:
        steps = work.get("steps") or {}
        inputs["steps_computed"] = steps.get("computed")
        inputs["steps_cached"] = steps.get("cached")
        return {
            "standard_job_flops_fast": flops,
            "t4_modelled_s_fast": modelled_seconds(total),
            "fbcache_steps_skipped_standard": steps.get("cached", 0),
            "t4_model_inputs_fast": inputs,
        }
    return {
        "standard_job_flops": flops,
        "t4_modelled_s_default": modelled_seconds(total),
        "t4_model_inputs": inputs,
    }


def merge(results_path, entries):
    merge_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge_results.py")
    with tempfile.TemporaryDirectory() as tmp:
        for key, value in entries.items():
            path = os.path.join(tmp, f"{key}.json")
            with open(path, "w") as f:
                json.dump(value, f)
            subprocess.run([sys.executable, merge_script, key, path, results_path], check=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("worker_json", help="stdout of `pawfect-worker inpaint --json`")
    ap.add_argument(
        "--results",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"),
    )
    ap.add_argument(
        "--allow-nonstandard",
        action="store_true",
        help="accept any job (test runs on the tiny fixtures; never for bench/results.json)",
    )
    ap.add_argument(
        "--fast",
        action="store_true",
        help="the fast configuration's run: writes the *_fast keys",
    )
    a = ap.parse_args(argv)
    with open(a.worker_json) as f:
        summary = json.load(f)
    try:
        entries = results_from(summary, os.path.basename(a.worker_json), a.fast)
    except ValueError as e:
        print(f"{a.worker_json}: {e}", file=sys.stderr)
        return 1
    problems = standard_problems(summary)
    if problems and not a.allow_nonstandard:
        print("not the standard job: " + "; ".join(problems), file=sys.stderr)
        return 1
    merge(a.results, entries)
    print(json.dumps({k: v for k, v in entries.items() if not k.startswith("t4_model_inputs")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
