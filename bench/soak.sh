#!/usr/bin/env bash
# The long form of the soak (tests/e2e/soak.rs): the real control plane, Redis with
# `appendfsync always`, the operator (two replicas) and real workers on the fixture models,
# JOBS InpaintJobs (default 300) in waves with every fault kind, for each SEED (default 1 2 3).
# Each run prints and keeps its one-line summary; all of them go into bench/results.json under
# `soak` (with the machine and the date). Exits non-zero when any run found a violation.
#
#   bench/soak.sh [SEED...]            # JOBS=300 REDIS_OUTAGE_S=30 by default
#
# Needs what the tests need (README.md, Tests): redis-server, helm, the control plane built by
# `scripts/local-k8s.sh build`. One run of 300 jobs takes about 10-15 min on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-300}
REDIS_OUTAGE_S=${REDIS_OUTAGE_S:-30}
seeds=("$@")
[ ${#seeds[@]} -eq 0 ] && seeds=(1 2 3)
out=$(mktemp -d)
status=0
for seed in "${seeds[@]}"; do
  echo "::: soak seed $seed, $JOBS jobs"
  start=$SECONDS
  if PAWFECT_SOAK_JOBS=$JOBS PAWFECT_SOAK_SEED=$seed PAWFECT_SOAK_REDIS_OUTAGE_S=$REDIS_OUTAGE_S \
      PAWFECT_SOAK_SUMMARY="$out/seed-$seed.json" \
      cargo test -p pawfect-e2e --test soak -- --nocapture > "$out/seed-$seed.log" 2>&1; then
    echo "::: seed $seed passed in $((SECONDS - start)) s"
  else
    echo "::: seed $seed FAILED in $((SECONDS - start)) s (log: $out/seed-$seed.log)"
    grep -E "VIOLATION|panicked" "$out/seed-$seed.log" | head -40 || true
    status=1
  fi
  cat "$out/seed-$seed.json" 2>/dev/null || true
done
python3 - "$out" "$JOBS" <<'PY' > "$out/soak.json"
import json, os, platform, subprocess, sys, datetime
out, jobs = sys.argv[1], int(sys.argv[2])
runs = []
for f in sorted(os.listdir(out)):
    if f.startswith("seed-") and f.endswith(".json"):
        with open(os.path.join(out, f)) as fh:
            runs.append(json.loads(fh.read()))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({
    "date": datetime.date.today().isoformat(),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "commit": commit,
    "jobs_per_run": jobs,
    "command": "bench/soak.sh " + " ".join(str(r["seed"]) for r in runs),
    "runs": runs,
}))
PY
python3 bench/merge_results.py soak "$out/soak.json"
echo "::: summaries merged into bench/results.json (key soak); logs in $out"
exit $status
