#!/usr/bin/env python3
"""Merges one benchmark's JSON into bench/results.json under KEY (replacing what was there).

    python3 bench/merge_results.py KEY FILE [RESULTS]   # RESULTS defaults to bench/results.json
"""
import json
import os
import sys


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    key, src = sys.argv[1], sys.argv[2]
    dst = sys.argv[3] if len(sys.argv) == 4 else os.path.join(os.path.dirname(__file__), "results.json")
    with open(src) as f:
        new = json.load(f)
    results = {}
    if os.path.exists(dst):
        with open(dst) as f:
            results = json.load(f)
    results[key] = new
    with open(dst, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
