"""pytest-benchmark suite set-up (``pytest benchmarks/ --benchmark-only``; not in ``make test``).

The CPU allocator is tuned as in ``duollm bench`` (see ``duollm.bench.timing``) so that page
faults on fresh buffers do not dominate; set ``DUOLLM_BENCH_MALLOC_TUNE=0`` to keep glibc's
defaults.
"""
import os

from duollm.bench.timing import tune_cpu_allocator

if os.environ.get("DUOLLM_BENCH_MALLOC_TUNE", "1") != "0":
    tune_cpu_allocator()
os.environ.setdefault("DUOLLM_CHECK_ROUTES", "0")  # no route-value read-back in the timings
