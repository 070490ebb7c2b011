#!/usr/bin/env python3
"""Tests bench/t4_model.py on a real worker output: `pawfect-worker inpaint --json` on the tiny
fixture models (CPU) with the example photo. Stdlib only.

    cargo build -p pawfect-worker && python3 bench/test_t4_model.py

PAWFECT_WORKER names the binary (default target/debug/pawfect-worker).
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import t4_model  # noqa: E402

WORKER = os.environ.get("PAWFECT_WORKER", os.path.join(ROOT, "target", "debug", "pawfect-worker"))


def tiny_run(tmp, steps, extra=()):
    """The worker's --json stdout for the example photo on the tiny fixtures, saved to a file."""
    out = subprocess.run(
        [WORKER, "inpaint", "--json", "--device", "cpu", "--dtype", "f32",
         "--models", os.path.join(ROOT, "tests/fixtures/flux/pipeline"),
         "--image", os.path.join(ROOT, "examples/photo/dog-on-lawn.jpg"),
         "--mask", os.path.join(ROOT, "examples/photo/leash-mask.png"),
         "--prompt", "green grass lawn, seamless continuation, no objects",
         "--steps", str(steps), *extra, "--out", os.path.join(tmp, "out.png")],
        check=True, capture_output=True, text=True,
    ).stdout
    path = os.path.join(tmp, f"worker-{steps}{'-'.join(('',) + tuple(extra))}.json")
    with open(path, "w") as f:
        f.write(out)
    return path, json.loads(out)


class T4Model(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.path, cls.summary = tiny_run(cls.tmp.name, 2)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def results_file(self):
        path = os.path.join(self.tmp.name, "results.json")
        with open(path, "w") as f:
            json.dump({"other": {"kept": True}}, f)
        return path

    def test_writes_the_counts_and_the_modelled_seconds(self):
        res = self.results_file()
        self.assertEqual(t4_model.main([self.path, "--results", res, "--allow-nonstandard"]), 0)
        with open(res) as f:
            got = json.load(f)
        total = self.summary["work"]["total"]
        self.assertEqual(got["other"], {"kept": True})
        self.assertEqual(got["standard_job_flops"], {
            "f16_gemm_flop": total["f16GemmFlop"],
            "int8_gemm_op": total["int8GemmOp"],
            "attention_flop": total["attentionFlop"],
            "memory_bound_bytes": total["memoryBoundBytes"],
        })
        # The model as stated in bench/RESULTS.md.
        want = (total["f16GemmFlop"] / 39e12 + total["int8GemmOp"] / 78e12
                + total["attentionFlop"] / 29e12 + total["memoryBoundBytes"] / 224e9)
        self.assertAlmostEqual(got["t4_modelled_s_default"], want, delta=want * 1e-12)
        self.assertGreater(want, 0)
        stages = got["t4_model_inputs"]["modelled_s_by_stage"]
        self.assertEqual(set(stages), {"encode", "denoise", "decode"})  # a spec prompt: no caption
        self.assertAlmostEqual(sum(stages.values()), want, delta=want * 1e-9)
        self.assertEqual(got["t4_model_inputs"]["image_tokens"], 3072)
        self.assertEqual(got["t4_model_inputs"]["text_tokens"], 512)

    def test_refuses_a_job_that_is_not_the_standard_one(self):
        res = self.results_file()
        # Tiny transformer, 2 steps: not the standard job; nothing is written.
        self.assertEqual(t4_model.main([self.path, "--results", res]), 1)
        with open(res) as f:
            self.assertEqual(json.load(f), {"other": {"kept": True}})
        problems = t4_model.standard_problems(self.summary)
        self.assertTrue(any(p.startswith("steps 2") for p in problems), problems)

    def test_refuses_output_without_work_counts(self):
        res = self.results_file()
        bare = dict(self.summary)
        del bare["work"]
        path = os.path.join(self.tmp.name, "bare.json")
        with open(path, "w") as f:
            json.dump(bare, f)
        self.assertEqual(t4_model.main([path, "--results", res, "--allow-nonstandard"]), 1)

    def test_the_denoise_counts_scale_with_the_steps(self):
        # Every step runs the same shapes: 4 steps issue exactly twice the denoise work of 2.
        _, four = tiny_run(self.tmp.name, 4)
        two = self.summary["work"]["denoise"]
        self.assertEqual(four["work"]["denoise"], {k: 2 * v for k, v in two.items()})
        self.assertEqual(four["work"]["encode"], self.summary["work"]["encode"])

    def test_fast_writes_the_fast_keys_and_the_skipped_steps(self):
        path, fast = tiny_run(self.tmp.name, 4, ("--cache-threshold", "1"))
        res = self.results_file()
        self.assertEqual(t4_model.main([path, "--fast", "--results", res, "--allow-nonstandard"]), 0)
        with open(res) as f:
            got = json.load(f)
        steps = fast["work"]["steps"]
        self.assertEqual(got["fbcache_steps_skipped_standard"], steps["cached"])
        self.assertEqual(got["standard_job_flops_fast"]["attention_flop"],
                         fast["work"]["total"]["attentionFlop"])
        self.assertAlmostEqual(got["t4_modelled_s_fast"], t4_model.modelled_seconds(fast["work"]["total"]))
        for key in ("standard_job_flops", "t4_modelled_s_default"):
            self.assertNotIn(key, got, "a fast run must not overwrite the default configuration's keys")

    def test_the_standard_check_counts_a_cached_step_as_one_block(self):
        n = t4_model.STANDARD_TEXT_TOKENS + t4_model.image_tokens(t4_model.STANDARD_TARGET)
        per_block = 4 * t4_model.FULL_HEADS * n * n * t4_model.FULL_HEAD_DIM

        def summary(computed, cached, blocks):
            return {"crops": [{"target": t4_model.STANDARD_TARGET}], "steps": t4_model.STANDARD_STEPS,
                    "maxSequenceLength": t4_model.STANDARD_TEXT_TOKENS,
                    "work": {"steps": {"computed": computed, "cached": cached},
                             "denoise": {"attentionFlop": blocks * per_block}}}

        full = t4_model.FULL_BLOCKS
        for computed, cached, blocks, ok in [
            (20, 0, 20 * full, True),
            (15, 5, 15 * full + 5, True),
            (15, 5, 20 * full, False),   # counted as if nothing was cached
            (15, 4, 15 * full + 4, False),  # steps do not add up to 20
        ]:
            problems = t4_model.standard_problems(summary(computed, cached, blocks))
            self.assertEqual(problems == [], ok, (computed, cached, problems))


if __name__ == "__main__":
    unittest.main()
