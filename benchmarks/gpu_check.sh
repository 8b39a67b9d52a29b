#!/usr/bin/env bash
# The GPU pass of docs/kernels.md, ready to run on the next GPU machine:
#
#   bash benchmarks/gpu_check.sh [all] [OUT_DIR]   # everything below, within BUDGET=480 s
#   bash benchmarks/gpu_check.sh OUT_DIR           # the same
#   bash benchmarks/gpu_check.sh tests OUT_DIR     # build + tests only
#   bash benchmarks/gpu_check.sh bench OUT_DIR     # build + benchmarks + the speedup sweep
#
# `all` (the default) is one call of at most BUDGET seconds (default 480): every step has a
# time limit and never runs past the budget; the most important steps come first.
#   1. build: pip install --no-build-isolation --no-deps -e . (builds duollm._C) with the
#      machine's own python (torch with CUDA, triton, nvcc, pytest);
#   2. the GPU-only tests (-m gpu: bf16, the CUDA backend, graph capture, the decode and
#      persistent paths in bf16 and replayed from CUDA graphs);
#   3. benchmarks/ops/bench_kernels.py --sections routing,layer,decode at the paper's layer in
#      bf16: the device's copy bandwidth and bf16 matmul rate; grouping of 16K tokens (public
#      op, lean, one launch); the layer at 16K tokens for every mix (triton default,
#      triton-persistent, torch) against the dense big FFN; decode N = 1, 16, 64 for the 1/12,
#      big and small mixes, default vs decode path, eager and CUDA graph, against the dense
#      big and small layers and the active weights' read time at the measured bandwidth;
#   4. the kernel, op and layer tests Triton-compiled (not interpreted), then again with the
#      decode and persistent switches on (DUOLLM_TRITON_DECODE=1 DUOLLM_TRITON_PERSISTENT=1),
#      then the rest of the default suite in whatever time is left.
# Writes logs, junit XML and kernels.csv / kernels.json under OUT_DIR (default $OUT, else
# /tmp/duollm-gpu), and prints one short table last. Copy the CSV/JSON into
# benchmarks/results/<gpu>/ and commit them; a switched-on path becomes the default only
# where these rows show it faster.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-all}" in  # gpu_check.sh [PHASE] [OUT_DIR]; a lone argument that is no phase is OUT_DIR
  all|tests|bench) PHASE=${1:-all}; OUT_ARG=${2:-} ;;
  *) PHASE=all; OUT_ARG=$1 ;;
esac
OUT_DIR=${OUT_ARG:-${OUT:-/tmp/duollm-gpu}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET DUOLLM_BACKEND DUOLLM_TRITON_DECODE DUOLLM_TRITON_PERSISTENT
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
t0=$SECONDS
BUDGET=${BUDGET:-480}
status=0
step() { echo "== [$((SECONDS - t0)) s] $*"; }
left() {  # seconds a step may take: its own limit $1, never past the budget (at least 1)
  local rest=$((BUDGET - (SECONDS - t0)))
  [ "$rest" -lt 1 ] && rest=1
  [ "$1" -lt "$rest" ] && echo "$1" || echo "$rest"
}

step "build (pip install --no-build-isolation --no-deps -e .)"
if ! timeout "$(left 200)" "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
    >"$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"; exit 1
fi
"$PY" -c "import duollm._C, duollm.ops as o, torch; print(torch.cuda.get_device_name(), \
o.backend_status(torch.device('cuda')))" || exit 1

summary() {  # name log: the pass/fail line and the first failures of a pytest log
  grep -E "^(FAILED|ERROR)" "$2" | head -15
  echo "$1: $(tail -1 "$2")"
}

KERNEL_TESTS=(tests/test_kernels_duo_ffn.py tests/test_kernels_paths.py
              tests/test_kernels_grouping.py tests/test_kernels_permute.py
              tests/test_kernels_swiglu.py tests/test_ops.py tests/test_modules.py
              tests/test_cuda_backend.py tests/test_model.py)
# checks that exist for machines without a GPU (sm_90 compile, the bench script's dry run)
CPU_ONLY=(tests/test_kernels_compile.py tests/test_kernels_bench.py)

if [ "$PHASE" != bench ]; then
  step "GPU-only tests (-m gpu)"
  timeout "$(left 120)" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    --junitxml="$OUT_DIR/junit-gpu.xml" >"$OUT_DIR/tests-gpu.log" 2>&1 || status=1
  summary "gpu tests" "$OUT_DIR/tests-gpu.log"
fi

if [ "$PHASE" != tests ]; then
  step "kernel benchmarks (ceilings, grouping, layer at 16K per mix, decode) -> $OUT_DIR"
  sections=routing,layer,decode
  [ "$PHASE" = bench ] && sections=routing,swiglu,layer,fwd_bwd,decode
  timeout "$(left 200)" "$PY" benchmarks/ops/bench_kernels.py --out "$OUT_DIR" \
    --sections "$sections" >"$OUT_DIR/kernels.log" 2>&1 || status=1
  grep -E "Error|Traceback" "$OUT_DIR/kernels.log" | head -5
  if [ "$PHASE" = bench ]; then
    step "speedup sweep and decode latency (duollm bench) -> $OUT_DIR/sweep"
    timeout 300 bash benchmarks/gpu_sweep.sh "$OUT_DIR/sweep" >"$OUT_DIR/sweep.log" 2>&1 \
      || status=1
    tail -30 "$OUT_DIR/sweep.log"
  fi
fi

if [ "$PHASE" != bench ]; then
  step "kernel, op and layer tests, Triton compiled"
  timeout "$(left 100)" "$PY" -m pytest -q -m "not slow and not gpu" -p no:cacheprovider \
    "${KERNEL_TESTS[@]}" --junitxml="$OUT_DIR/junit-kernels.xml" \
    >"$OUT_DIR/tests-kernels.log" 2>&1 || status=1
  summary "kernel tests" "$OUT_DIR/tests-kernels.log"

  step "the layer's tests with the decode and persistent switches on"
  DUOLLM_TRITON_DECODE=1 DUOLLM_TRITON_PERSISTENT=1 timeout "$(left 60)" "$PY" -m pytest -q \
    -p no:cacheprovider tests/test_kernels_duo_ffn.py tests/test_modules.py \
    >"$OUT_DIR/tests-switched.log" 2>&1 || status=1
  summary "switched-on paths" "$OUT_DIR/tests-switched.log"

  step "the rest of the default suite (time left: $(left 100000) s)"
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4 --dist loadfile)
  deselect=()
  for f in "${KERNEL_TESTS[@]}" "${CPU_ONLY[@]}"; do deselect+=(--ignore="$f"); done
  timeout "$(left 100000)" "$PY" -m pytest -q -m "not slow and not gpu" -p no:cacheprovider \
    "${xdist[@]}" "${deselect[@]}" --junitxml="$OUT_DIR/junit.xml" >"$OUT_DIR/tests.log" 2>&1 \
    || status=1
  summary "rest of the suite" "$OUT_DIR/tests.log"
fi

if [ "$PHASE" != tests ]; then
  step "table (kernels.csv)"
  "$PY" - "$OUT_DIR/kernels.json" <<'EOF' || status=1
import json, sys
doc = json.load(open(sys.argv[1]))
m = doc["meta"]
print(f"{m['device']}  torch {m['torch']}  triton {m['triton']}  {m['dtype']}  "
      f"sha {m['git_sha'][:10]}")
def f(v, spec):  # a number, or "-" padded to the same width
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))
print(f"{'row':<16}{'impl':<22}{'N':>6} {'mix':<18}{'graph':<6}{'us':>9}{'read_us':>9}"
      f"{'GB/s|TF':>9}{'x dense':>8}{'eff':>6}  err")
for r in doc["rows"]:
    rate = r.get("gbps") or r.get("tflops")
    x = r.get("vs_dense_big") or r.get("realized_speedup")
    us = r["ms"] * 1e3 if r.get("ms") is not None else None
    print(f"{r['name'][:15]:<16}{str(r.get('impl', ''))[:21]:<22}{str(r.get('N', '')):>6} "
          f"{str(r.get('mix', ''))[:17]:<18}{str(r.get('graph', '')):<6}{f(us, '9.1f')}"
          f"{f(r.get('read_us'), '9.1f')}{f(rate, '9.0f')}{f(x, '8.2f')}"
          f"{f(r.get('efficiency'), '6.2f')}  {(r.get('error') or '')[:40]}")
EOF
fi
step "done (status $status)"
exit $status
