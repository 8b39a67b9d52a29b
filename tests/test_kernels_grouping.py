"""The Triton grouping kernels (kernels/grouping.py): ``group_tokens`` is a stable counting sort
equal to ``duollm.reference.group_tokens``, on one block and across many (the block scan),
memory-safe on out-of-range routes, deterministic, registered for torch.compile."""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duollm import ops, reference

grouping = importlib.import_module("duollm.kernels.grouping")

# Module level, not the `device` fixture: hypothesis tests cannot take function-scoped fixtures.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _assert_valid_groups(groups, routes_N, num_paths):
    """The RouteGroups contract, checked from first principles."""
    perm, inv, counts, offsets, r = groups
    n = routes_N.numel()
    for name, t in zip(groups._fields, groups):
        assert t.dtype == torch.int64, f"{name}: dtype {t.dtype}"
        assert t.device == routes_N.device, f"{name}: device {t.device}"
    assert perm.shape == inv.shape == r.shape == (n,)
    assert counts.shape == (num_paths,) and offsets.shape == (num_paths + 1,)
    assert torch.equal(r, routes_N.to(torch.int64))
    assert torch.equal(torch.sort(perm).values, torch.arange(n, device=perm.device))
    assert torch.equal(inv[perm], torch.arange(n, device=perm.device))
    assert torch.equal(counts, torch.bincount(r, minlength=num_paths)[:num_paths])
    assert offsets[0] == 0 and torch.equal(offsets[1:], torch.cumsum(counts, 0))
    grouped = r[perm]
    assert bool((grouped[1:] >= grouped[:-1]).all()), "routes[perm] must be non-decreasing"
    for p in range(num_paths):
        ids = perm[offsets[p]:offsets[p + 1]]
        assert bool((r[ids] == p).all())
        assert bool((ids[1:] > ids[:-1]).all()), f"path {p}: ids must ascend (stable sort)"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 300), num_paths=st.integers(1, 8),
       block_n=st.sampled_from([None, 32, 128]), data=st.data())
def test_group_tokens_is_a_stable_counting_sort(n, num_paths, block_n, data):
    values = data.draw(st.lists(st.integers(0, num_paths - 1), min_size=n, max_size=n))
    routes = torch.tensor(values, dtype=torch.int64, device=DEVICE)
    groups = reference.RouteGroups(*grouping.group_tokens_fwd(routes, num_paths, block_n))
    _assert_valid_groups(groups, routes, num_paths)
    assert torch.equal(groups.perm, torch.sort(routes, stable=True).indices)
    for got, want in zip(groups, reference.group_tokens(routes, num_paths)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32,
                                   torch.int64])
def test_group_tokens_any_integer_dtype_and_shape(dtype, device):
    g = torch.Generator().manual_seed(1)
    routes = torch.randint(0, 3, (4, 5, 7), generator=g).to(device=device, dtype=dtype)
    got = ops.group_tokens(routes, 3, backend="triton")
    for name, a, b in zip(got._fields, got, reference.group_tokens(routes, 3)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mix", ["one_path", "empty_path", "all_skip", "random"])
@pytest.mark.parametrize("n", [0, 1, 7, 100])
def test_group_tokens_route_mixes(n, mix, device):
    g = torch.Generator().manual_seed(n)
    routes = {"one_path": torch.full((n,), 2), "empty_path": 2 * torch.randint(0, 2, (n,),
              generator=g), "all_skip": torch.zeros(n, dtype=torch.int64),
              "random": torch.randint(0, 3, (n,), generator=g)}[mix].to(device)
    got = grouping.group_tokens(routes, 3)
    _assert_valid_groups(got, routes, 3)
    if mix == "empty_path" and n:
        assert got.counts[1] == 0


@pytest.mark.parametrize("block_n", [None, 16])
def test_out_of_range_routes_stay_in_bounds(block_n, device):
    """With validation off (graph capture), bad routes must not corrupt memory or perm: they
    land after all paths, perm/inv stay a permutation, the real paths are exact."""
    routes = torch.tensor([0, 5, -1, 2, 1, 7, 0, 127, -128, 1] * 4, dtype=torch.int8,
                          device=device)
    perm, inv, counts, offsets, r = grouping.group_tokens_fwd(routes, 3, block_n)
    n = routes.numel()
    assert torch.equal(torch.sort(perm).values, torch.arange(n, device=device))
    assert torch.equal(inv[perm], torch.arange(n, device=device))
    valid = (r >= 0) & (r < 3)
    assert torch.equal(counts, torch.bincount(r[valid], minlength=3))
    assert offsets[-1] == int(valid.sum())
    assert torch.equal(perm, torch.sort(torch.where(valid, r, 3), stable=True).indices)
    # a route that only fits int64 must not wrap around into a valid path
    big = torch.tensor([2 ** 33 + 1, 1, -(2 ** 40)], dtype=torch.int64, device=device)
    assert grouping.group_tokens(big, 3).counts.tolist() == [0, 1, 0]


def test_num_paths_limit():
    routes = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    assert grouping.group_tokens(routes, grouping.MAX_PATHS).counts[0] == 4
    with pytest.raises(ValueError, match="num_paths"):
        grouping.group_tokens_fwd(routes, grouping.MAX_PATHS + 1)


def test_group_tokens_deterministic(device):
    routes = torch.randint(0, 4, (257,), generator=torch.Generator().manual_seed(3)).to(device)
    a = grouping.group_tokens_fwd(routes, 4, 32)
    b = grouping.group_tokens_fwd(routes, 4, 32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_group_tokens_custom_op_fake_and_compile(device):
    """The op is registered with a fake kernel (sizes known without reading routes), so it
    traces under torch.compile(fullgraph=True) without a graph break or host sync."""
    routes = torch.randint(0, 3, (33,), generator=torch.Generator().manual_seed(4)).to(device)
    torch.library.opcheck(torch.ops.duollm.group_tokens.default, (routes, 3),
                          test_utils=("test_schema", "test_faketensor"))
    fake = torch.ops.duollm.group_tokens(routes.to("meta"), 3)
    assert [tuple(t.shape) for t in fake] == [(33,), (33,), (3,), (4,), (33,)]
    compiled = torch.compile(lambda r: tuple(grouping.group_tokens(r, 3)), fullgraph=True,
                             backend="aot_eager")
    for a, b in zip(compiled(routes), reference.group_tokens(routes, 3)):
        assert torch.equal(a, b)


def test_bad_routes_same_errors_as_torch(device):
    for bad, num_paths in [(torch.tensor([0, 3]), 3), (torch.tensor([-1, 0]), 2),
                           (torch.tensor([0.0, 1.0]), 2), (torch.tensor([0, 1]), 0)]:
        errors = []
        for backend in ("torch", "triton"):
            with pytest.raises((ValueError, TypeError)) as e:
                ops.group_tokens(bad.to(device), num_paths, backend=backend)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1]


@pytest.mark.gpu
def test_group_tokens_large_on_gpu():
    """Many blocks (the scan's loop over block chunks) at the token counts that matter."""
    for n in (1, 16, 4096, 65536, 1 << 20):
        routes = torch.randint(0, 3, (n,), device="cuda", dtype=torch.int8)
        got = grouping.group_tokens(routes, 3)
        for name, a, b in zip(got._fields, got, reference.group_tokens(routes, 3)):
            assert torch.equal(a, b), (n, name)
