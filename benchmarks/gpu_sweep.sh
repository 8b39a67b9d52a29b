#!/usr/bin/env bash
# The GPU benchmark sweep in one command (H100/H200, about 4-5 minutes):
#
#   bash benchmarks/gpu_sweep.sh [OUT_DIR]        # default: $OUT, else benchmarks/results/<gpu>/
#
# 1. installs the package if it is not importable (pip --no-build-isolation --no-deps -e .);
# 2. the speedup sweep at the paper's layer (d 2560, big 10240, small 640) in bf16 for the
#    triton, cuda (if built) and torch backends against the dense FFN and the naive and sorted
#    plain-PyTorch routings: N = 16384 and 4096 for every mix first (its JSON records the GPU's
#    measured copy bandwidth and bf16 matmul rate), later N = 1, 16, 64, 1024, and N = 65536
#    for the 1/12 and quarter-skip mixes;
# 3. decode latency (N = 1, 16, 64): the routed layer and a paper-1.4b decode step with a KV
#    cache, eager and in a CUDA graph, against the dense layer / dense model; then the triton
#    rows again with DUOLLM_TRITON_DECODE=1 DUOLLM_TRITON_PERSISTENT=1 (into OUT_DIR/switched);
# 4. prints a Markdown summary (largest N per mix) of everything written (summary.md).
# Every step has a time limit, so the whole stays under about 6 minutes even if one stalls.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-}}
unset TRITON_INTERPRET DUOLLM_BACKEND
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import duollm.kernels, duollm.bench" 2>/dev/null; then
  echo "== installing duollm (pip install --no-build-isolation --no-deps -e .)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
fi
if [ -z "$OUT_DIR" ]; then
  OUT_DIR=$("$PY" -c "import torch; from duollm.bench.results import committed_results_dir; \
print(committed_results_dir(torch.device('cuda')))")
fi
mkdir -p "$OUT_DIR"
echo "== results in $OUT_DIR"
"$PY" -m duollm info 2>/dev/null ||
  "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"

BENCH=("$PY" -m duollm.bench)  # the same program as `duollm bench`
status=0
t0=$SECONDS

COMMON=(--device cuda --dtype bf16 --shapes paper --backends triton,cuda,torch --out "$OUT_DIR")

# The goal rows first (16K tokens), so a slow autotune can only cut the less important ones.
echo "== speedup: paper shape, bf16, N = 16384 and 4096, all mixes (+ device ceilings)"
timeout 150 "${BENCH[@]}" speedup "${COMMON[@]}" --tokens 16384,4096 \
  --baselines naive,sorted --repeats 50 --budget 0.25 --time-limit 110 || status=1

echo "== decode latency: layer and paper-1.4b model step, eager and CUDA graph"
timeout 120 "${BENCH[@]}" decode --device cuda --dtype bf16 --tokens 1,16,64 \
  --mixes 1/12,big,small --backends triton,cuda,torch --repeats 100 --budget 0.15 \
  --out "$OUT_DIR" || status=1

echo "== decode latency again with the switched-off triton paths on (decode + persistent)"
DUOLLM_TRITON_DECODE=1 DUOLLM_TRITON_PERSISTENT=1 timeout 90 "${BENCH[@]}" decode \
  --device cuda --dtype bf16 --tokens 1,16,64 --mixes 1/12,big,small --backends triton \
  --repeats 100 --budget 0.15 --out "$OUT_DIR/switched" || status=1

echo "== speedup: paper shape, bf16, N = 1, 16, 64, 1024, all mixes"
timeout 100 "${BENCH[@]}" speedup "${COMMON[@]}" --tokens 1,16,64,1024 \
  --baselines naive,sorted --repeats 50 --budget 0.2 --time-limit 70 --no-ceilings || status=1

echo "== speedup: paper shape, bf16, N = 65536, mixes 1/12 and quarter-skip"
timeout 75 "${BENCH[@]}" speedup "${COMMON[@]}" --tokens 65536 --mixes 1/12,quarter-skip \
  --baselines sorted --repeats 20 --budget 0.3 --time-limit 40 --no-ceilings || status=1

echo "== done in $((SECONDS - t0)) s; summary (largest N per mix):"
"${BENCH[@]}" report "$OUT_DIR" --summary --out "$OUT_DIR/summary.md" || status=1
exit $status
