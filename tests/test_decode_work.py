"""The decode kernels' work lists (``kernels/decode.py: work_plan``), checked on the CPU at the
paper's layer (d_model 2560, d_big 10240, d_small 640) on an H100/H200 (132 SMs, sm_90
configs): every item of a launch carries the same bytes, there are at least 4 items per SM,
and the programs that work read the same bytes (within 10%) for every set of active paths
at N = 1, 16, 64. Also: programs per SM follow the config's shared memory, and the arrival
counters are allocated once and left at zero."""
import importlib

import pytest
import torch

dec = importlib.import_module("duollm.kernels.decode")
cfgs = importlib.import_module("duollm.kernels.configs")
duo = importlib.import_module("duollm.kernels.duo_ffn")

D, WIDTHS, SMS = 2560, (640, 10240), 132  # routed slots in route order: small, big
MASKS = {"small": 1, "big": 2, "small+big": 3}


def _plan(n):
    cg = cfgs._lookup("sm90", "decode_gateup", "16", "decode", D, max(WIDTHS))
    cd = cfgs._lookup("sm90", "decode_down", "16", "decode", D, max(WIDTHS))
    return cg, cd, dec.work_plan(n, D, WIDTHS, cg, cd, SMS, 2, dec.SMEM_PER_SM_SM90)


@pytest.mark.parametrize("mix", MASKS)
@pytest.mark.parametrize("n", [1, 16, 64])
def test_work_items_equal_and_balanced_at_the_paper_layer(n, mix):
    cg, cd, plan = _plan(n)
    ks, kc, k = plan["table"][MASKS[mix]]
    assert ks * kc == D and all(w % k == 0 for w, b in zip(WIDTHS, (1, 2))
                                if MASKS[mix] & b)  # pieces of equal width, none ragged
    for kind, per_program in zip(("gate/up", "down"),
                                 dec.work_items(plan, WIDTHS, D, cg, cd, MASKS[mix], n)):
        total = sum(per_program)
        mean = total / len(per_program)
        assert max(per_program) <= 1.10 * mean, (kind, max(per_program), mean)
        # equal items: a working program reads ceil(items / programs) of them or one fewer
        assert len(set(per_program)) <= 2, (kind, sorted(set(per_program)))
    g_items = sum(plan["tiles"][i] * ks for i in (0, 1) if MASKS[mix] >> i & 1)
    d_items = plan["n_dt"] * sum(w // k for w, b in zip(WIDTHS, (1, 2)) if MASKS[mix] & b)
    assert g_items >= 4 * SMS and d_items >= 4 * SMS, (g_items, d_items)
    # the last arrival of a tile sums its partials a block of several at a time
    assert ks <= 40 and plan["ch_g"] >= (8 if n <= 16 else 2)


def test_items_of_one_launch_carry_equal_bytes():
    """Per launch, every item's weight piece has the same shape (the bytes test above
    counts per program; this one per item)."""
    cg, cd, plan = _plan(16)
    for m in MASKS.values():
        ks, kc, k = plan["table"][m]
        g = {min(cg.BM, w - r * cg.BM) * kc for i, w in enumerate(WIDTHS) if m >> i & 1
             for r in range(plan["tiles"][i])}
        dn = {cd.BM * k for i, w in enumerate(WIDTHS) if m >> i & 1}
        assert len(g) == 1 and len(dn) == 1, (m, g, dn)


def test_programs_per_sm_follow_shared_memory():
    """A config whose buffers fill most of an SM (the old decode-down guess at N = 64:
    4 stages x (64 x 128 + 128 x 64) bf16 = 128 KB) gets one program per SM, not its 2."""
    big = cfgs.GemmConfig(64, 16, 128, 1, 4, 4, 2)
    assert dec.smem_bytes("decode_down", big, 64, 2) == 128 * 1024
    assert dec.programs_per_sm("decode_down", big, 64, 2, dec.SMEM_PER_SM_SM90) == 1
    assert dec.programs_per_sm("decode_down", big, 16, 2, dec.SMEM_PER_SM_SM90) == 2
    # gate/up stages two weight tiles
    assert dec.smem_bytes("decode_gateup", big, 16, 2) == 4 * (2 * 64 * 128 + 128 * 16) * 2
    _, _, plan = _plan(64)
    cd = cfgs._lookup("sm90", "decode_down", "16", "decode", D, max(WIDTHS))
    assert plan["grid_d"] == SMS * dec.programs_per_sm("decode_down", cd, 64, 2,
                                                        dec.SMEM_PER_SM_SM90)


def test_counters_allocated_once_and_left_at_zero(device, monkeypatch):
    """The arrival counters are made by the first call (and a second set for captured
    graphs), never again, and every call leaves them at zero (the last arrival resets)."""
    monkeypatch.setattr(dec, "_COUNTERS", {})
    g = torch.Generator().manual_seed(0)
    d, widths = 40, (24, 72)
    params = (None,) + tuple(tuple(torch.randn(*s, generator=g).to(device) * 0.3
                                   for s in ((w, d), (w, d), (d, w))) for w in widths)
    x = torch.randn(9, d, generator=g).to(device)
    made = []
    real = torch.zeros
    monkeypatch.setattr(dec.torch, "zeros", lambda *a, **k: made.append(a) or real(*a, **k))
    for routes in ([0, 1, 2] * 3, [2] * 9, [1] * 9):
        duo.duo_ffn(x, torch.tensor(routes, device=device), params, mode="decode")
    assert len(made) == 2  # the stream's set and the graphs' set, once
    keys = list(dec._COUNTERS)
    assert len(keys) == 2 and any(k[1] == "graph" for k in keys)
    assert all(int(c.abs().sum()) == 0 for c in dec._COUNTERS.values())


def test_persistent_down_takes_the_widest_paths_first():
    """The persistent down GEMM's tile table puts the widest path's tiles first (a big tile
    costs 16 small ones at the paper's layer), so the cheap tiles fill in at the end; the
    default grid keeps route order."""
    fg = importlib.import_module("duollm.kernels.ffn_gemm")
    layout = ((0, 0), (1, 640), (2, 10240))
    cpu = torch.device("cpu")
    _, pers = fg._fwd_plan("down", 4096, D, layout, torch.float32, cpu, True)
    chunk, _, _, routes, widths = pers[0]
    assert chunk == (2, 1, 0) and routes[:3] == (2, 1, 0) and widths[:3] == (10240, 640, 0)
    _, default = fg._fwd_plan("down", 4096, D, layout, torch.float32, cpu, False)
    assert default[0][0] == (0, 1, 2)
