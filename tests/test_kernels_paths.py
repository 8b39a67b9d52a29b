"""The switched-on forward paths of the routed Triton layer against ``duollm.reference``:
the decode kernels (kernels/decode.py, ``mode="decode"``, N <= 64) and the persistent grouped
GEMMs with the one-launch grouping (``mode="persistent"``), for N in {1, 2, 7, 16, 64} and
every mix (all one path, an empty path, all skip, out-of-range routes -> residual), forward
and backward, determinism (two runs bit-equal), split-K over several d tiles, and the
fallbacks. float32 in the interpreter; bf16 and CUDA-graph replay on a GPU only."""
import importlib

import pytest
import torch

from duollm import reference
from duo_inputs import MIXES, check, make, make_routes
from tolerance import assert_close_to_ref

duo = importlib.import_module("duollm.kernels.duo_ffn")
decode = importlib.import_module("duollm.kernels.decode")
grouping = importlib.import_module("duollm.kernels.grouping")

DUO_WIDTHS = (0, 24, 40)  # (SKIP, SMALL, BIG)
NS = (1, 2, 7, 16, 64)


def _layer(mode):
    return lambda x, r, p, res, gt: duo.duo_ffn(x, r, p, res, gt, mode=mode)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("N", NS)
def test_decode_path_matches_reference(device, N, mix):
    check(device, torch.float32, N, 20, DUO_WIDTHS, mix, seed=N, fn=_layer("decode"))


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("N", NS)
def test_persistent_path_matches_reference(device, N, mix):
    check(device, torch.float32, N, 20, DUO_WIDTHS, mix, seed=100 + N, fn=_layer("persistent"))


@pytest.mark.parametrize("mix", ["random", "bad", "no_small"])
def test_persistent_many_row_tiles(device, mix):
    """N = 200: several row tiles per path, so the fixed grid's programs loop over tiles of
    different paths (4 programs in the interpreter)."""
    check(device, torch.float32, 200, 20, DUO_WIDTHS, mix, seed=7, fn=_layer("persistent"))


@pytest.mark.parametrize("mode", ["decode", "persistent"])
@pytest.mark.parametrize("residual,gate", [(False, False), (False, True), (True, False)])
def test_paths_without_residual_or_gate(device, mode, residual, gate):
    """No residual: skip and out-of-range tokens get zeros."""
    check(device, torch.float32, 9, 20, DUO_WIDTHS, "bad", residual, gate, seed=3,
          fn=_layer(mode))


def test_decode_split_k_several_d_tiles(device):
    """d = 70 (two d tiles of 64) and widths 72 / 200: both paths' down reductions are split
    (a ragged last split) and the gate/up reduction over d too, so the last-arriver
    reductions sum several partials per tile."""
    N, d, widths = 11, 70, (0, 72, 200)
    plan = decode._plan(N, d, widths[1:], torch.float32, device)[2]
    ks, _, k = plan["table"][3]  # both paths active
    assert all(-(-w // k) > 1 for w in widths[1:]), plan  # the shape really splits K
    assert ks > 1, plan  # and the gate/up over d
    check(device, torch.float32, N, d, widths, "random", seed=5, fn=_layer("decode"))


def test_decode_four_routed_paths_and_no_skip_path(device):
    """Four routed paths (one launch's maximum) and no skip path: out-of-range routes take
    the residual in the decode kernel, and the overflow slot in the grouped path."""
    for mode in ("decode", "persistent", "default"):
        check(device, torch.float32, 13, 17, (16, 24, 8, 40), "bad", seed=9, fn=_layer(mode))


def test_decode_falls_back_beyond_its_limits(device):
    """More than 64 tokens, or more than four routed paths: the decode switch takes the
    grouped path, and the result is still right."""
    assert not decode.decode_ok(65, [duo.Slot(0, 8, None)])
    check(device, torch.float32, 70, 17, DUO_WIDTHS, "random", seed=10, fn=_layer("decode"))
    check(device, torch.float32, 9, 17, (0, 8, 16, 8, 24, 16), "bad", seed=11,
          fn=_layer("decode"))


@pytest.mark.parametrize("mode", ["decode", "persistent"])
def test_paths_deterministic(device, mode):
    """Two runs give bit-identical outputs (the split-K reduction sums in a fixed order)."""
    x, res, gt, params, _, g = make(16, 70, (0, 72, 200), torch.float32, device, seed=12)
    routes = make_routes("random", 16, 3, g).to(device)
    a = duo.duo_ffn(x, routes, params, res, gt, mode=mode)
    b = duo.duo_ffn(x, routes, params, res, gt, mode=mode)
    assert torch.equal(a, b)


def test_decode_workspace_reuse_across_routings(device):
    """The cached workspaces (counters included) serve successive calls with different
    routes: every call matches the reference, so the counters were reset by the kernel."""
    x, res, gt, params, _, g = make(7, 20, DUO_WIDTHS, torch.float32, device, seed=13)
    for mix in ("random", "skip", "big", "bad"):
        routes = make_routes(mix, 7, 3, g).to(device)
        y = duo.duo_ffn(x, routes, params, res, gt, mode="decode")
        ref = reference.duo_ffn(x, routes, params, res, gt)
        y64 = reference.duo_ffn(x.double(), routes, [None if p is None else
                                                     [t.double() for t in p] for p in params],
                                res.double(), gt.double())
        assert_close_to_ref(y, y64, ref, mix)


def test_mode_argument_and_env_parsing(monkeypatch):
    assert duo.parse_mode("decode+persistent") == duo.DECODE | duo.PERSISTENT
    assert duo.parse_mode(None) == duo.ENV_MODE
    with pytest.raises(ValueError, match="mode"):
        duo.parse_mode("fast")
    monkeypatch.setenv("DUOLLM_TRITON_DECODE", "yes")
    with pytest.raises(ValueError, match="DUOLLM_TRITON_DECODE"):
        duo._env_mode()
    monkeypatch.setenv("DUOLLM_TRITON_DECODE", "1")
    monkeypatch.setenv("DUOLLM_TRITON_PERSISTENT", "1")
    assert duo._env_mode() == duo.DECODE | duo.PERSISTENT


# --------------------------------------------------------------------------- grouping


@pytest.mark.parametrize("bad_bucket", [None, 0])
def test_grouping_one_launch_matches_three(device, bad_bucket):
    """The one-launch grouping (every program scans all routes) equals the three-launch one
    on 7 blocks of 16 tokens, bad routes included, with or without inv / widened routes."""
    g = torch.Generator().manual_seed(14)
    routes = torch.randint(-1, 4, (100,), generator=g).to(device)
    three = grouping.group_tokens_fwd(routes, 3, block_n=16, bad_bucket=bad_bucket)
    one = grouping.group_tokens_fwd(routes, 3, block_n=16, bad_bucket=bad_bucket,
                                    one_launch=True)
    for a, b in zip(three, one):
        assert torch.equal(a, b)
    lean = grouping.group_tokens_fwd(routes, 3, block_n=16, bad_bucket=bad_bucket,
                                     one_launch=True, write_inv=False, write_routes=False)
    assert torch.equal(lean[0], three[0]) and torch.equal(lean[3], three[3])
    assert lean[1].numel() == 0 and lean[4].numel() == 0


def test_grouping_bad_bucket(device):
    """Out-of-range routes join the named path's bucket, in token order with its tokens."""
    routes = torch.tensor([2, -1, 0, 5, 1, 0, 3], device=device)
    perm, inv, counts, offsets, _ = grouping.group_tokens_fwd(routes, 3, bad_bucket=0)
    assert perm.tolist() == [1, 2, 3, 5, 6, 4, 0]
    assert counts.tolist() == [5, 1, 1] and offsets.tolist() == [0, 5, 6, 7]
    assert torch.equal(perm[inv], torch.arange(7, device=device))
    with pytest.raises(ValueError, match="bad_bucket"):
        grouping.group_tokens_fwd(routes, 3, bad_bucket=4)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decode", "persistent"])
@pytest.mark.parametrize("N", [1, 16, 64, 4096])
def test_paths_bf16_gpu(mode, N):
    """bf16 at the sizes each path is for (decode: the grouped fallback above 64)."""
    check(torch.device("cuda"), torch.bfloat16, N, 256, (0, 128, 512), "bad", seed=15,
          fn=_layer(mode))


@pytest.mark.gpu
def test_paths_paper_shape_gpu():
    """The paper's layer in bf16: decode at N = 16 and persistent at N = 512."""
    dev = torch.device("cuda")
    check(dev, torch.bfloat16, 16, 2560, (0, 640, 10240), "random", seed=16,
          fn=_layer("decode"))
    check(dev, torch.bfloat16, 512, 2560, (0, 640, 10240), "random", seed=17,
          fn=_layer("persistent"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decode", "persistent"])
def test_paths_cuda_graph_replay_new_routes(mode):
    """Capture once, copy new routes in, replay: equal to eager for every mix (the decode
    counters reset themselves; the persistent tile table is read on the device)."""
    dev = torch.device("cuda")
    N = 16 if mode == "decode" else 1000
    x, res, gt, params, _, g = make(N, 256, (0, 64, 384), torch.bfloat16, dev, seed=18)
    static = make_routes("random", N, 3, g).to(dev)
    duo.duo_ffn(x, static, params, res, gt, mode=mode)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = duo.duo_ffn(x, static, params, res, gt, mode=mode)
    for mix in MIXES:
        static.copy_(make_routes(mix, N, 3, g).to(dev))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, duo.duo_ffn(x, static, params, res, gt, mode=mode)), mix


def test_int32_weight_offset_guard():
    """width * d >= 2**31 would overflow the kernels' int32 weight offsets: every launcher
    refuses it with an error naming the weights (checked on meta tensors: nothing is
    allocated)."""
    ffn_gemm = importlib.import_module("duollm.kernels.ffn_gemm")
    d, width = 2 ** 16, 2 ** 15
    with pytest.raises(ValueError, match="2\\*\\*31"):
        decode._plan(1, d, (width,), torch.float32, torch.device("cpu"))
    x = torch.empty(4, d, device="meta")
    w = torch.empty(width, d, device="meta")
    slot = duo.Slot(0, width, (w, w, w.t()))
    with pytest.raises(ValueError, match="weights"):
        ffn_gemm.gateup_fwd(x, None, None, [slot], torch.empty(4, width, device="meta"))
    decode._plan(1, d, (width - 1,), torch.float32, torch.device("cpu"))  # just fits


def test_configs_table_lookup(monkeypatch):
    """The committed table: the interpreter uses its own entries only, a GPU never does; the
    most specific matching entry wins, so a measured shape-specific entry overrides."""
    configs = importlib.import_module("duollm.kernels.configs")
    assert configs.gemm_config("gateup", torch.float32, 10, torch.device("cpu")).BM == 64
    large = configs._lookup("sm90", "gateup", "16", "large", 2560, 10240)
    assert (large.BM, large.BN, large.num_warps) == (128, 128, 8)
    dec = configs._lookup("sm90", "down", "16", "decode", 2560, 10240)
    assert (dec.BN, dec.GROUP_M) == (64, 1)
    assert configs._lookup("sm90", "gateup_bwd", "fp64", "large", 64, 64).BK == 32
    tuned = configs.GemmConfig(128, 256, 64, 8, 8, 3, 1)
    monkeypatch.setitem(configs.TABLE, ("sm90", "down", "16", "large", 2560, 10240), tuned)
    configs._lookup.cache_clear()
    try:
        assert configs._lookup("sm90", "down", "16", "large", 2560, 10240) == tuned
        assert configs._lookup("sm90", "down", "16", "large", 2560, 640) != tuned
        assert configs._lookup("interp", "down", "16", "large", 2560, 10240) != tuned
    finally:
        configs._lookup.cache_clear()
    with pytest.raises(KeyError):  # no entry for an unknown kind and dtype on a GPU
        configs._lookup("sm90", "nope", "bad", "x", 0, 0)


def test_decode_path_runs_no_grouping_and_forward_writes_no_inv(device, monkeypatch):
    """Decode: the grouping is folded into the kernels (no grouping launch at all). The
    grouped forward asks the grouping for neither inv nor the widened routes (the backward
    alone needs inv); the persistent one asks for the one-launch grouping."""
    x, res, gt, params, _, g = make(7, 20, DUO_WIDTHS, torch.float32, device, seed=19)
    routes = make_routes("random", 7, 3, g).to(device)
    calls = []
    real = duo.group_tokens_fwd

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(duo, "group_tokens_fwd", spy)
    duo.duo_ffn(x, routes, params, res, gt, mode="decode")
    assert calls == []
    duo.duo_ffn(x, routes, params, res, gt, mode="default")
    assert calls[-1]["write_inv"] is False and calls[-1]["write_routes"] is False
    assert calls[-1]["one_launch"] is False
    duo.duo_ffn(x, routes, params, res, gt, mode="persistent")
    assert calls[-1]["one_launch"] is True
    xl = x.clone().requires_grad_()
    duo.duo_ffn(xl, routes, params, res, gt, mode="decode").sum().backward()
    assert calls[-1].get("write_inv", True) is True  # the backward groups, with inv
