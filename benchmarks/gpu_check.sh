#!/usr/bin/env bash
# The GPU pass of docs/kernels.md in two phases, each under 10 minutes on an H100:
#
#   bash benchmarks/gpu_check.sh tests OUT_DIR   # build duollm._C, whole suite, no interpreter
#   bash benchmarks/gpu_check.sh bench OUT_DIR   # kernel microbenchmarks + the speedup sweep
#
# Uses the machine's python3 as it is (torch with CUDA, triton, nvcc, pytest): the package is
# installed with `pip install --no-build-isolation --no-deps -e .`, which builds the CUDA
# extension. Bench results land in benchmarks/results/<gpu>/ and, packed, in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:?usage: gpu_check.sh tests|bench OUT_DIR}
OUT_DIR=${2:-${OUT:-/tmp/duollm-gpu}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET DUOLLM_BACKEND
export PYTHONUNBUFFERED=1

echo "== build (pip install --no-build-isolation --no-deps -e .)"
if ! "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"; exit 1
fi
"$PY" -c "import duollm._C, duollm.ops as o, torch; print(o.backend_status(torch.device('cuda')))" \
  || exit 1
status=0

if [ "$PHASE" = tests ]; then
  echo "== the whole suite (default + gpu markers), Triton compiled, not interpreted"
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4 --dist loadfile)
  timeout 480 "$PY" -m pytest -q -m "not slow" -p no:cacheprovider "${xdist[@]}" \
    --junitxml="$OUT_DIR/junit.xml" >"$OUT_DIR/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests.log" | head -40
  tail -2 "$OUT_DIR/tests.log"
fi

if [ "$PHASE" = bench ]; then
  # Every step is time-boxed so the results are always packed inside a 10-minute call.
  echo "== study and bench smoke tests on the GPU machine"
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_study.py tests/test_bench.py \
    >"$OUT_DIR/smoke.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/smoke.log" | head; tail -1 "$OUT_DIR/smoke.log"
  name=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
  RES=benchmarks/results/$name
  mkdir -p "$RES"
  echo "== kernel microbenchmarks -> $RES"
  timeout 120 "$PY" benchmarks/ops/bench_kernels.py --out "$RES" >"$RES/kernels.log" 2>&1 \
    || status=1
  tail -45 "$RES/kernels.log"
  echo "== speedup sweep and decode latency -> $RES (most important rows first)"
  timeout 300 bash benchmarks/gpu_sweep.sh "$RES" >"$RES/sweep.log" 2>&1 || status=1
  tail -50 "$RES/sweep.log"
  tar czf "$OUT_DIR/results.tgz" "$RES"
fi
exit $status
