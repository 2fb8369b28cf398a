#!/usr/bin/env bash
# Runs the test suite. Ray Serve and Ray Train open listeners on all interfaces, so pytest runs
# inside a private network namespace with only loopback when the kernel lets us make one.
# Multi-node tests (ray.cluster_utils.Cluster) and tests that start a Ray of their own (other Serve
# settings) run in a second pytest process: a process joins one Ray cluster only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 OMP_NUM_THREADS=1
run() {
  if unshare -n true 2>/dev/null; then
    unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
  else
    echo "note: no private network namespace here; running on the host network" >&2
    "$@"
  fi
}
# exit 5 = nothing collected: the arguments named only multi-node or own-Ray test files
run "$PY" -m pytest -m "not multinode and not ownray" "$@" || [ $? -eq 5 ]
if [ -n "$(grep -rl 'pytest.mark.multinode\|pytest.mark.ownray' tests 2>/dev/null)" ]; then
  # exit 5 = nothing collected: the arguments named no such test file
  run "$PY" -m pytest -m "multinode or ownray" "$@" || [ $? -eq 5 ]
fi
