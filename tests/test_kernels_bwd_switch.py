"""The backward switch ``DUOLLM_TRITON_BWD=1`` (kernels/ffn_gemm_bwd.py, issue 19 item 8):
BK = 64 configurations for the 16-bit gate/up backward and large dx (``configs.BWD_TABLE``)
and a token-split count per path in the weight gradients (``_wgrad_pp_kernel``, planned by
``wgrad_plan``). Checked in the interpreter against ``duollm.reference`` (output, x, residual,
gate and every weight's gradient) for N in {1, 2, 7, 16, 64, 600, 1000} and every mix, each
run twice and bit-equal; the GPU configurations run in the interpreter in float16 too. With
the switch off the configurations and the split plan are pinned to what they were before the
switch existed."""
import importlib

import pytest
import torch

from duollm import BIG, SKIP, SMALL, reference
from duo_inputs import MIXES, make, make_routes, run
from tolerance import assert_close_to_ref

bwd = importlib.import_module("duollm.kernels.ffn_gemm_bwd")
configs = importlib.import_module("duollm.kernels.configs")
ffn_gemm = importlib.import_module("duollm.kernels.ffn_gemm")
duo = importlib.import_module("duollm.kernels.duo_ffn")
swiglu = importlib.import_module("duollm.kernels.swiglu")

C = configs.GemmConfig
D, WIDTHS = 20, (0, 8, 200)  # (SKIP, SMALL, BIG): the big path has 4 output tiles of 64
# every N and every mix run with the switch on; the default run takes one mix per small N
# (all of them between them), the slow run all the others
DEFAULT = {(1, "bad"), (2, "small"), (7, "no_small"), (16, "skip"), (64, "big"),
           (64, "random")}
GRID = [pytest.param(N, mix, marks=() if (N, mix) in DEFAULT else pytest.mark.slow)
        for N in (1, 2, 7, 16, 64, 600, 1000) for mix in MIXES]


class _Launches:
    """A jit kernel whose launches are recorded (the arguments of each) and then run."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return launch(*args, **kwargs)
        return call


@pytest.fixture
def spies(monkeypatch):
    """Record both weight-gradient kernels' launches and every ``wgrad_plan``."""
    pp = _Launches(bwd._wgrad_pp_kernel)
    one = _Launches(bwd._wgrad_kernel)
    plans = []
    real_plan = bwd.wgrad_plan

    def plan(*args, **kwargs):
        out = real_plan(*args, **kwargs)
        plans.append((kwargs.get("per_path", False), out))
        return out

    monkeypatch.setattr(bwd, "_wgrad_pp_kernel", pp)
    monkeypatch.setattr(bwd, "_wgrad_kernel", one)
    monkeypatch.setattr(bwd, "wgrad_plan", plan)
    return pp, one, plans


def _check_twice(device, dtype, N, d, widths, mix, seed):
    """The triton layer's output and every gradient against the reference (float64, with
    plain torch's same-dtype error as the budget), and a second run bit-equal to the first.
    ``mix``: a name of ``duo_inputs.make_routes`` or the routes themselves."""
    x, res, gt, params, dy, g = make(N, d, widths, dtype, device, seed=seed)
    routes = make_routes(mix, N, len(widths), g) if isinstance(mix, str) else mix
    routes = routes.to(device)
    y, grads = run(duo.duo_ffn, x, routes, res, gt, params, dy)
    y2, grads2 = run(duo.duo_ffn, x, routes, res, gt, params, dy)
    y64, g64 = run(reference.duo_ffn, x, routes, res, gt, params, dy, torch.float64)
    yd, gd = run(reference.duo_ffn, x, routes, res, gt, params, dy)
    assert {n for n, _ in grads} >= {"x", "params[1].w_gate", "params[2].w_down"}
    assert torch.equal(y, y2)
    assert_close_to_ref(y, y64, yd, "y")
    for (name, a), (_, b), (_, r64), (_, rd) in zip(grads, grads2, g64, gd):
        assert torch.equal(a, b), f"{name}: a rerun differs"
        assert a.dtype == rd.dtype, name
        assert_close_to_ref(a, r64, rd, name)


@pytest.mark.parametrize("N,mix", GRID)
def test_switch_on_matches_reference_and_reruns_bit_equal(device, monkeypatch, spies, N, mix):
    monkeypatch.setattr(bwd, "ENV_BWD", True)
    _check_twice(device, torch.float32, N, D, WIDTHS, mix, seed=N)
    pp, one, plans = spies
    # every weight gradient took the per-path kernel (all skip too: the launches are per
    # layer shape, their programs find no rows)
    assert not one.calls and len(pp.calls) == 4 and all(per_path for per_path, _ in plans)


def test_switch_on_splits_differ_per_path_and_size_the_partials(device, monkeypatch, spies):
    """N = 600 with a 200-wide big path: in the interpreter (4 'SMs', 8 programs wanted) the
    small path's outputs (one tile) take 3 token slices, the big path's (4 tiles) 2, so the
    per-path kernel really runs unequal splits; each launch's partial buffer holds exactly
    sum_p S_p x M_p x N_p fp32 elements. Over 384 tokens on the big path: 2 slices of 3's
    row chunk (cdiv(cdiv(n, 3), 64) x 64 = 192 rows) would miss some, so a kernel reading
    another slot's split count fails the reference check."""
    monkeypatch.setattr(bwd, "ENV_BWD", True)
    u = torch.rand(600, generator=torch.Generator().manual_seed(20))
    routes = torch.where(u < 0.7, BIG, torch.where(u < 0.95, SMALL, SKIP)).long()
    assert 384 < int((routes == BIG).sum()) <= 576 and int((routes == SMALL).sum()) > 64
    _check_twice(device, torch.float32, 600, D, WIDTHS, routes, seed=21)
    pp, one, plans = spies
    assert not one.calls and len(pp.calls) == 4 and len(plans) == 4  # 2 runs x 2 launches
    for (grid, args, kwargs), (per_path, (splits, tiles, offs, tot)) in zip(pp.calls, plans):
        assert per_path and splits == [3, 2], splits  # slots in route order: small, big
        p1 = args[8]
        a_tok = kwargs["A_TOK"]
        shapes = [(D, w) if a_tok else (w, D) for w in WIDTHS[1:]]
        assert p1.numel() == tot == sum(S * m * n for S, (m, n) in zip(splits, shapes))
        assert list(args[14:18]) == [3, 2, 1, 1]  # S0..S3 as launched
        assert grid == (sum(tiles),)


def test_switch_off_runs_the_one_split_kernel(device, monkeypatch, spies):
    """The default: one S for the launch, the largest (here 3 for both paths), the buffer
    sized by it, ``_wgrad_kernel`` launched with exactly that S."""
    monkeypatch.setattr(bwd, "ENV_BWD", False)
    x, res, gt, params, dy, g = make(600, D, WIDTHS, torch.float32, device, seed=22)
    routes = make_routes("random", 600, 3, g).to(device)
    weights = [t for p in params if p is not None for t in p]
    duo.duo_ffn_bwd(dy, x, routes, weights, [-1, *WIDTHS[1:]], gt)  # the backward alone
    pp, one, plans = spies
    assert not pp.calls and len(one.calls) == 2
    for (grid, args, kwargs), (per_path, (splits, tiles, offs, tot)) in zip(one.calls, plans):
        assert not per_path and splits == [3, 3]
        assert args[14] == 3 and args[8].numel() == tot


def test_switch_on_gpu_configs_in_the_interpreter(device, monkeypatch):
    """float16 with the sm90 table (``arch_of`` patched): the gate/up backward takes
    BWD_TABLE's BK = 64, BN = 128 entry (and dx, below 2048 tokens, its default one); every
    gradient matches the reference, a rerun is bit-equal."""
    monkeypatch.setattr(configs, "arch_of", lambda device: "sm90")
    monkeypatch.setattr(bwd, "ENV_BWD", True)
    seen = []
    for mod in (bwd, ffn_gemm):
        real = mod.gemm_config

        def spy(kind, *args, _real=real, **kwargs):
            cfg = _real(kind, *args, **kwargs)
            seen.append((kind, kwargs.get("bwd", False), cfg))
            return cfg
        monkeypatch.setattr(mod, "gemm_config", spy)
    _check_twice(device, torch.float16, 100, 72, (0, 24, 136), "bad", seed=23)
    got = {(k, b): c for k, b, c in seen}
    assert got[("gateup_bwd", True)] == C(64, 128, 64, 8, 8, 3, 1)
    assert got[("dx", True)] == C(64, 64, 64, 1, 4, 4, 2)  # the "small" bucket: unchanged


@pytest.mark.slow
def test_switch_on_large_dx_config_in_the_interpreter(device, monkeypatch):
    """N = 2048 (the "large" bucket) in float16 with the sm90 table: dx takes BWD_TABLE's
    BM = BN = 128, BK = 64 entry."""
    monkeypatch.setattr(configs, "arch_of", lambda device: "sm90")
    monkeypatch.setattr(bwd, "ENV_BWD", True)
    seen = []
    real = ffn_gemm.gemm_config

    def spy(kind, *args, **kwargs):
        cfg = real(kind, *args, **kwargs)
        seen.append((kind, kwargs.get("bwd", False), cfg))
        return cfg
    monkeypatch.setattr(ffn_gemm, "gemm_config", spy)
    _check_twice(device, torch.float16, 2048, 24, (0, 8, 136), "random", seed=24)
    assert ("dx", True, C(128, 128, 64, 8, 8, 3, 1)) in seen


def test_switch_on_plain_swiglu_backward(device, monkeypatch, spies):
    """The un-routed SwiGLU op's backward (one slot, rows not permuted) under the switch."""
    monkeypatch.setattr(bwd, "ENV_BWD", True)
    g = torch.Generator().manual_seed(25)
    N, d, W = 300, 20, 72
    inputs = [torch.randn(N, d, generator=g), torch.randn(W, d, generator=g) / d ** 0.5,
              torch.randn(W, d, generator=g) / d ** 0.5, torch.randn(d, W, generator=g) / W ** .5]
    inputs = [t.to(device) for t in inputs]
    dy = torch.randn(N, d, generator=g).to(device)
    grads = swiglu.swiglu_ffn_bwd(dy, *inputs)
    again = swiglu.swiglu_ffn_bwd(dy, *inputs)
    refs = []
    for cast in (torch.float64, torch.float32):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs]
        reference.swiglu_ffn(*leaves).backward(dy.to(cast))
        refs.append([t.grad for t in leaves])
    for name, a, b, r64, rd in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, again, *refs):
        assert torch.equal(a, b), name
        assert_close_to_ref(a, r64, rd, name)
    assert spies[0].calls and not spies[1].calls


# --------------------------------------------------------------------------- CPU only


def test_wgrad_plan_per_path_at_the_papers_layer(monkeypatch):
    """The paper's layer (d 2560, widths 640 / 10240) at 16K tokens on 132 SMs with the sm90
    weight-gradient configs: 264 programs wanted. dWd's outputs (d x W, 128 x 128 tiles) are
    100 tiles small, 1600 big -> 3 and 1 token slices; dWg/dWu's (W x d, 128 x 64) 200 and
    3200 -> 2 and 1. The default gives both paths the largest, tripling (dWd) and doubling
    (dWg, dWu) the big path's fp32 partials; per path it keeps one slice."""
    monkeypatch.setattr(bwd, "num_sms", lambda device: 132)
    d, small, big, N = 2560, 640, 10240, 16384
    cpu = torch.device("cpu")
    for kind, shapes, want in (("wgrad", [(d, small), (d, big)], [3, 1]),
                               ("wgrad2", [(small, d), (big, d)], [2, 1])):
        cfg = configs._lookup("sm90", kind, "16", "large", d, 0)
        splits, tiles, offs, tot = bwd.wgrad_plan(shapes, N, cfg, cpu, per_path=True)
        assert splits == want
        sizes = [S * m * n for S, (m, n) in zip(splits, shapes)]
        assert offs == [0, sizes[0]] and tot == sum(sizes)
        assert tiles == [S * -(-m // cfg.BM) * -(-n // cfg.BN)
                         for S, (m, n) in zip(splits, shapes)]
        d_splits, d_tiles, d_offs, d_tot = bwd.wgrad_plan(shapes, N, cfg, cpu)
        assert d_splits == [max(want)] * 2
        assert d_tot == max(want) * (d * small + d * big)
        # the big path's share of the buffer: max(want) times its weight, per path once
        assert d_tot - d_offs[1] == max(want) * (tot - offs[1]) == max(want) * d * big
    # few rows cap every path's slices alike (at least 4 * BK rows per slice)
    cfg = configs._lookup("sm90", "wgrad", "16", "decode", d, 0)
    assert bwd.wgrad_plan([(d, small), (d, big)], 64, cfg, cpu, per_path=True)[0] == [1, 1]


def test_switch_off_configs_are_the_committed_ones():
    """With the switch off the backward's configurations are the ones committed before the
    switch (pinned here so they cannot drift), and the switch changes exactly the two entries
    of BWD_TABLE, for every arch, dtype and bucket."""
    committed = {  # (kind, dtype, bucket) on a GPU -> the config the kernels shipped with
        ("gateup_bwd", "16"): {b: C(64, 128, 32, 8, 8, 4, 1)
                               for b in ("decode", "small", "mid", "large")},
        ("dx", "16"): {"decode": C(64, 64, 64, 1, 4, 4, 2), "small": C(64, 64, 64, 1, 4, 4, 2),
                       "mid": C(64, 128, 32, 8, 4, 4, 1), "large": C(128, 128, 32, 8, 8, 4, 1)},
        ("wgrad", "16"): {b: C(128, 128, 64, 1, 8, 3, 1)
                          for b in ("decode", "small", "mid", "large")},
        ("wgrad2", "16"): {b: C(128, 64, 64, 1, 8, 3, 1)
                           for b in ("decode", "small", "mid", "large")},
    }
    for kind in ("gateup_bwd", "dx", "wgrad", "wgrad2"):
        committed[(kind, "fp32")] = {b: C(64, 64, 32, 8, 4, 3, 2)
                                     for b in ("decode", "small", "mid", "large")}
        committed[(kind, "fp64")] = {b: C(64, 64, 32, 8, 4, 2, 2)
                                     for b in ("decode", "small", "mid", "large")}
    switched = {("gateup_bwd", "16", b): C(64, 128, 64, 8, 8, 3, 1)
                for b in ("decode", "small", "mid", "large")}
    switched[("dx", "16", "large")] = C(128, 128, 64, 8, 8, 3, 1)
    configs._lookup.cache_clear()
    for arch in ("sm90", "sm80", "sm100"):
        for (kind, dt), by_bucket in committed.items():
            for bucket, want in by_bucket.items():
                assert configs._lookup(arch, kind, dt, bucket, 2560, 10240) == want
                on = configs._lookup(arch, kind, dt, bucket, 2560, 10240, True)
                assert on == switched.get((kind, dt, bucket), want), (arch, kind, dt, bucket)
        for kind in ("gateup", "down", "decode_gateup", "decode_down"):  # forward untouched
            for dt in ("16", "fp32"):
                for bucket in ("decode", "small", "mid", "large"):
                    assert configs._lookup(arch, kind, dt, bucket, 2560, 640, True) == \
                        configs._lookup(arch, kind, dt, bucket, 2560, 640)
    # the interpreter keeps its own entries whatever the switch
    for kind in ("gateup_bwd", "dx", "wgrad", "wgrad2"):
        assert configs._lookup("interp", kind, "16", "large", 20, 200, True) == \
            configs._lookup("interp", kind, "16", "large", 20, 200) == C(64, 64, 64, 4, 4, 1, 1)
    assert set(configs.BWD_TABLE) <= set(configs.TABLE)
    # gemm_config without the switch asks exactly what it asked before it existed
    cpu = torch.device("cpu")
    assert configs.gemm_config("dx", torch.float16, 4096, cpu, 20) == \
        configs.gemm_config("dx", torch.float16, 4096, cpu, 20, bwd=False)


def test_env_switch_parsing(monkeypatch):
    monkeypatch.delenv("DUOLLM_TRITON_BWD", raising=False)
    assert bwd._env_bwd() is False
    monkeypatch.setenv("DUOLLM_TRITON_BWD", "0")
    assert bwd._env_bwd() is False
    monkeypatch.setenv("DUOLLM_TRITON_BWD", "1")
    assert bwd._env_bwd() is True
    monkeypatch.setenv("DUOLLM_TRITON_BWD", "on")
    with pytest.raises(ValueError, match="DUOLLM_TRITON_BWD"):
        bwd._env_bwd()
    x = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="bwd"):
        bwd.ffn_bwd(x, x, None, None, None, None, [], bwd="1")


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("N", [64, 2048])
def test_switch_on_bf16_papers_layer_gpu(monkeypatch, N):
    """bf16 at the paper's layer with the switch on: the BK = 64 gate/up backward (both N)
    and large dx (N = 2048), per-path weight-gradient splits; against the reference and bit
    for bit on a rerun."""
    monkeypatch.setattr(bwd, "ENV_BWD", True)
    _check_twice(torch.device("cuda"), torch.bfloat16, N, 2560, (0, 640, 10240), "random",
                 seed=26)
