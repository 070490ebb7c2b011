#!/usr/bin/env python3
"""Builds tiny random-weight reference models and the tensors the Rust parity tests compare against.

    python tools/make_fixtures.py flux      --seed 0 --out tests/fixtures/flux
    python tools/make_fixtures.py florence2 --seed 0 --out tests/fixtures/florence2
    python tools/make_fixtures.py gguf      --seed 0 --out tests/fixtures/gguf

Each model lives in its own module next to this file (fixtures_<model>.py) with a `main(seed, out)`.
"""
import argparse
import importlib
import os
import sys

MODELS = ("flux", "florence2", "gguf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=MODELS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    mod = importlib.import_module(f"fixtures_{args.model}")
    os.makedirs(args.out, exist_ok=True)
    mod.main(seed=args.seed, out=args.out)


if __name__ == "__main__":
    main()
