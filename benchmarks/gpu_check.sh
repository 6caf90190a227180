#!/usr/bin/env bash
# The GPU check in one call, on a lent GPU machine (issue 10 item 8); see benchmarks/gpu_check.py
# for the stages and outputs, or run with --help. Carry DALI and omegaconf first as
# benchmarks/gpu_carry.sh prints (the last part and .device-carry/SHA256SUMS carried with this call):
# this installs them when `import nvidia.dali, omegaconf` fails. Without CUDA it says so and exits 2.
#
#   bash benchmarks/gpu_check.sh                 # writes to $OUT (else bench_out/gpu_check)
#   bash benchmarks/gpu_check.sh --help
#
# PYTHON picks the interpreter (default python3, the GPU machine's own).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
  echo "gpu_check: no Python interpreter '$py' (set PYTHON)" >&2
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" "$here/benchmarks/gpu_check.py" "$@"
