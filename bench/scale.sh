#!/usr/bin/env bash
# The scale run (tests/e2e/scale.rs): JOBS InpaintJobs (default 10000) over POOLS pools (default 5)
# created at RATE jobs/s (default 50), workers with the fast stand-in model, on the real control
# plane with the operator's two replicas. Prints the summary (operator CPU and peak RSS, API
# requests by verb, status lag p50/p99, throughput) and merges it into bench/results.json under
# `scale` with the machine and the date.
#
#   bench/scale.sh                      # JOBS=10000 POOLS=5 RATE=50
#   KEY=scale_rate20 RATE=20 JOBS=3000 bench/scale.sh   # another key of results.json
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-10000}
POOLS=${POOLS:-5}
RATE=${RATE:-50}
KEY=${KEY:-scale}
out=$(mktemp -d)
PAWFECT_SCALE_JOBS=$JOBS PAWFECT_SCALE_POOLS=$POOLS PAWFECT_SCALE_RATE=$RATE \
  PAWFECT_SCALE_SUMMARY="$out/run.json" \
  cargo test -p pawfect-e2e --test scale -- --ignored --nocapture 2>&1 | tee "$out/scale.log" | grep -E "^scale|panicked|test result"
python3 - "$out" "$JOBS" "$POOLS" "$RATE" <<'PY' > "$out/scale.json"
import json, os, platform, subprocess, sys, datetime
out, jobs, pools, rate = sys.argv[1], *sys.argv[2:]
with open(os.path.join(out, "run.json")) as f:
    run = json.load(f)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({
    "date": datetime.date.today().isoformat(),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "commit": commit,
    "command": f"JOBS={jobs} POOLS={pools} RATE={rate} bench/scale.sh",
    **run,
}))
PY
python3 bench/merge_results.py "$KEY" "$out/scale.json"
echo "::: merged into bench/results.json (key $KEY); log and the last /metrics of the operators and kube-apiserver: $out"
