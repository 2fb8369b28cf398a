#!/usr/bin/env bash
# Runs the test suite. Ray Serve and Ray Train open listeners on all interfaces, so pytest runs
# inside a private network namespace with only loopback when the kernel lets us make one.
# Tests that start a Ray of their own (other Serve settings, an autoscaling cluster, `make run`) run in a
# second pytest process and the ray.cluster_utils.Cluster tests in a third: a process joins one Ray cluster
# only, and a Cluster started after other clusters in the same process once missed Ray's 30 s node
# registration on a loaded CI machine.
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
# exit 5 = nothing collected: the arguments named no test of that process
run "$PY" -m pytest -m "not multinode and not ownray" "$@" || [ $? -eq 5 ]
for marker in ownray multinode; do
  if grep -rlq "pytest.mark.$marker" tests 2>/dev/null; then
    run "$PY" -m pytest -m "$marker" "$@" || [ $? -eq 5 ]
  fi
done
