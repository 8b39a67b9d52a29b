#!/usr/bin/env bash
# The GPU pass of docs/kernels.md in ONE call that stops by itself before BUDGET (470 s):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]                # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run [--quick] OUT  # the same steps on a CPU
#
# Uses the machine's python (PYTHON, default python3) as it is and installs nothing: the CUDA
# extension is built in place (setup.py build_ext --inplace) and the package is put on
# PYTHONPATH from a folder of links to this checkout (duollm/ with kernels/ as duollm.kernels).
# Steps, most important first, each with a time limit that never runs past the budget:
#   1. build duollm._C, in the background while steps 2-3 run (they need only Triton); a
#      failed build is recorded and the run goes on without it (DUOLLM_SKIP_CUDA_BUILD=1);
#   2. smoke: every kernel variant (grouping, gather, scatter-combine, SwiGLU fwd+bwd, the
#      routed layer in modes default/decode/persistent/decode+persistent for every route mix
#      including out-of-range routes, its backward, a policy route on one path) against
#      duollm/reference.py at the paper's layer in bf16, N = 1, 7, 16, 64, 1000, on random
#      data with every buffer the kernels allocate poisoned (NaN) first, each forward run
#      twice and compared bit for bit (bench_kernels.py --sections smoke);
#   3. benchmarks (bench_kernels.py --sections routing,layer,decode): the copy and matmul
#      ceilings; grouping of 16K tokens eager and replayed from a CUDA graph; the layer at 16K
#      tokens for every mix (triton default, triton-persistent, torch) against the dense big
#      FFN; decode N = 1, 16, 64 for the 1/12, big and small mixes, default vs decode path,
#      eager and CUDA graph, against the dense layers and the active weights' read time; every
#      row with its max_rel_err against the reference;
#   4. the gpu-marked tests with DUOLLM_TRITON_DECODE=1 DUOLLM_TRITON_PERSISTENT=1
#      DUOLLM_TRITON_BWD=1 (the decode and persistent paths, generate(cuda_graph=True) on the
#      decode path, the backward's BK = 64 configs and per-path weight-gradient splits), then
#      with the switches off; `-n 8 --dist loadfile` when pytest-xdist is importable, else
#      serially.
# Writes four files into OUT_DIR (default $OUT, else /tmp/duollm-gpu), each rewritten as the run
# goes, so a run cut short still leaves what it did:
#   results.json  meta, steps (status, seconds, what was skipped), every smoke and benchmark
#                 row with its derived fields (efficiency, ratios, max_rel_err), test outcomes
#   results.csv   the rows
#   logs.tar.gz   every step's full log
#   summary.txt   the short summary, also printed last
# Exit status 0 only if every step passed. --dry-run: TRITON_INTERPRET=1, float32, tiny
# shapes, nothing timed (tests/test_gpu_check.py runs it); --quick: one token count and mix
# per section. BUDGET=S sets the budget; GPU_CHECK_STEP_SCALE=k multiplies every step's own
# limit (a full dry run on a slow CPU). Copy results.json/results.csv into benchmarks/results/<gpu>/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
QUICK=0
OUT_ARG=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: $1: unknown option (expected --dry-run, --quick or OUT_DIR)" >&2; exit 2 ;;
    *) if [ -n "$OUT_ARG" ]; then
         echo "error: OUT_DIR: given twice ($OUT_ARG, $1)" >&2; exit 2
       fi
       OUT_ARG=$1 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ] && [ "$DRY" = 0 ]; then
  echo "error: --quick: only with --dry-run (a GPU run measures every row)" >&2; exit 2
fi
OUT_DIR=${OUT_ARG:-${OUT:-/tmp/duollm-gpu}}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-470}
case "$BUDGET" in ''|*[!0-9]*) echo "error: BUDGET: expected whole seconds, got $BUDGET" >&2
                              exit 2 ;; esac
SCALE=${GPU_CHECK_STEP_SCALE:-1}  # every step's own limit times this (a slow CPU's dry run)
case "$SCALE" in ''|0|*[!0-9]*) echo "error: GPU_CHECK_STEP_SCALE: expected a whole number \
>= 1, got $SCALE" >&2; exit 2 ;; esac
mkdir -p "$OUT_DIR" || { echo "error: OUT_DIR: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR"/results.json "$OUT_DIR"/results.csv "$OUT_DIR"/logs.tar.gz \
  "$OUT_DIR"/summary.txt
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$LOGS"
RESULTS=$OUT_DIR/results.json
REPORT=(env -u PYTHONPATH "$PY" "$ROOT/benchmarks/gpu_check_report.py")

if [ -z "${DUOLLM_GIT_SHA:-}" ] && sha=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
  [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && sha+=-dirty
  export DUOLLM_GIT_SHA=$sha  # the staged package is outside the checkout: name the commit
fi  # (a tree copied without .git: pass DUOLLM_GIT_SHA=<commit> to the script)
unset DUOLLM_BACKEND DUOLLM_TRITON_DECODE DUOLLM_TRITON_PERSISTENT DUOLLM_TRITON_BWD \
  DUOLLM_CHECK_ROUTES
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run)
  [ "$QUICK" = 1 ] && BENCH_ARGS+=(--quick)
else
  unset TRITON_INTERPRET
  BENCH_ARGS=()
fi
t0=$SECONDS
status=0

left() {  # seconds a step may take: its own limit $1 (x SCALE), never past the budget
  local rest=$((BUDGET - (SECONDS - t0))) own=$(($1 * SCALE))
  [ "$own" -lt "$rest" ] && echo "$own" || echo "$rest"
}
pack() {  # the logs so far and the summary (rewritten after every step)
  tar -czf "$WORK/logs.tar.gz" -C "$WORK" logs 2>/dev/null && mv "$WORK/logs.tar.gz" "$OUT_DIR/"
  "${REPORT[@]}" summary "$RESULTS" >"$WORK/summary.txt" 2>&1 && \
    mv "$WORK/summary.txt" "$OUT_DIR/summary.txt"
}
note() {  # name status seconds detail
  echo "== [$((SECONDS - t0)) s] $1: $2 ($3 s) $4"
  "${REPORT[@]}" step "$RESULTS" "$1" "$2" "$3" "$4"
  [ "$2" = ok ] || status=1
  pack
}
run() {  # name limit command...: one step under its time limit, recorded
  local name=$1 limit secs rc start=$SECONDS
  limit=$(left "$2")
  shift 2
  if [ "$limit" -lt 15 ]; then
    note "$name" skipped 0 "the ${BUDGET} s budget is spent"
    return 1
  fi
  echo "== [$((SECONDS - t0)) s] $name (at most $limit s)"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  if [ "$rc" = 0 ]; then
    note "$name" ok "$secs" ""
  elif [ "$rc" = 124 ]; then
    note "$name" "timed out" "$secs" "stopped at its $limit s limit; see logs/$name.log"
  else
    note "$name" failed "$secs" "exit $rc: $(grep -E 'Error|error:' "$LOGS/$name.log" | \
      tail -1 | cut -c1-120)"
  fi
  return "$rc"
}

# 1. build, in place and in the background (nothing below needs it before the tests)
if [ -n "${GPU_CHECK_BUILD_CMD:-}" ]; then  # tests: stand in for the build (e.g. `false`)
  BUILD=(bash -c "$GPU_CHECK_BUILD_CMD")
else
  BUILD=("$PY" setup.py build_ext --inplace)
fi
build_start=$SECONDS
echo "== [0 s] build: ${BUILD[*]} (in the background)"
(MAX_JOBS=${MAX_JOBS:-8} timeout "$(left 240)" "${BUILD[@]}" >"$LOGS/build.log" 2>&1
 echo $? >"$WORK/build.rc") &
build_pid=$!

# the package from this checkout, installed nowhere: duollm/ with kernels/ as duollm.kernels
stage() {
  rm -rf "$WORK/site"
  mkdir -p "$WORK/site/duollm"
  ln -s "$ROOT"/duollm/* "$WORK/site/duollm/"
  ln -s "$ROOT/kernels" "$WORK/site/duollm/kernels"
}
stage
export PYTHONPATH=$WORK/site
"$PY" -c "import duollm.kernels, duollm.ops as o, torch, triton, sys; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no GPU')" >"$LOGS/env.log" 2>&1
cat "$LOGS/env.log"

# 2. correctness smoke of every kernel variant (nothing timed)
run smoke 130 "$PY" benchmarks/ops/bench_kernels.py --sections smoke --out "$OUT_DIR" \
  --time-limit "$(( $(left 130) - 15 > 5 ? $(left 130) - 15 : 5 ))" "${BENCH_ARGS[@]}"

# 3. benchmarks, appended to the same results
run bench 170 "$PY" benchmarks/ops/bench_kernels.py --sections routing,layer,decode \
  --out "$OUT_DIR" --append \
  --time-limit "$(( $(left 170) - 20 > 5 ? $(left 170) - 20 : 5 ))" "${BENCH_ARGS[@]}"

# the build's outcome (waited for at most what the budget has left)
while kill -0 "$build_pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "$BUDGET" ]; do sleep 1; done
if kill -0 "$build_pid" 2>/dev/null; then
  kill "$build_pid" 2>/dev/null
  note build "timed out" $((SECONDS - build_start)) "still building at the budget's end"
elif [ "$(cat "$WORK/build.rc" 2>/dev/null)" = 0 ]; then
  stage  # links the freshly built duollm/_C*.so too
  if "$PY" -c "import duollm._C" >>"$LOGS/build.log" 2>&1; then
    note build ok $((SECONDS - build_start)) "duollm._C imports"
  elif [ "$DRY" = 1 ]; then
    note build ok $((SECONDS - build_start)) "dry run: no CUDA here, so no duollm._C (expected)"
  else
    note build failed $((SECONDS - build_start)) "built, but import duollm._C fails; \
continuing without it (DUOLLM_SKIP_CUDA_BUILD=1)"
    export DUOLLM_SKIP_CUDA_BUILD=1
  fi
else
  note build failed $((SECONDS - build_start)) "exit $(cat "$WORK/build.rc" 2>/dev/null): \
$(tail -1 "$LOGS/build.log" | cut -c1-100); continuing without duollm._C \
(DUOLLM_SKIP_CUDA_BUILD=1)"
  export DUOLLM_SKIP_CUDA_BUILD=1
fi

# 4. the gpu tests: switched-on paths first (they have never run on a GPU), then the defaults
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
[ "$QUICK" = 1 ] && GPU_TESTS=(tests/test_kernels_paths.py)  # the plumbing: every test skips
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n 8 --dist loadfile)
  echo "== pytest-xdist found: gpu tests with -n 8 --dist loadfile"
else
  echo "== pytest-xdist not importable: gpu tests run serially"
fi
# -P: the checkout root is not put first on sys.path (its duollm/ lacks duollm.kernels)
PYTEST=("$PY" -P -m pytest -q -m gpu -p no:cacheprovider "${XDIST[@]}" "${GPU_TESTS[@]}")
# every unmeasured path's switch (docs/kernels.md, "Paths behind a switch"); the label says which
SWITCHES=(DUOLLM_TRITON_DECODE=1 DUOLLM_TRITON_PERSISTENT=1 DUOLLM_TRITON_BWD=1)
run tests-switched-on 150 env "${SWITCHES[@]}" "${PYTEST[@]}"
"${REPORT[@]}" pytest "$RESULTS" "gpu tests, switched on: ${SWITCHES[*]}" \
  "$LOGS/tests-switched-on.log"
run tests-default 150 "${PYTEST[@]}"
"${REPORT[@]}" pytest "$RESULTS" "gpu tests, default paths" "$LOGS/tests-default.log"

pack
echo
cat "$OUT_DIR/summary.txt"
echo "== [$((SECONDS - t0)) s] done (status $status): $(ls "$OUT_DIR" | tr '\n' ' ')"
rm -rf "$WORK"
exit $status
