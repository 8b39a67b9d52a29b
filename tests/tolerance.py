"""Tolerances that mean something (STYLE 3).

A kernel output is compared with the reference computed in float64 from the same inputs,
and allowed twice the error that plain torch makes in the kernel's own dtype, plus a small
atol tiered by dtype:  |kernel - ref64| <= 2 * |torch_same_dtype - ref64| + atol.
"""
import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dtypes_for(device: torch.device):
    """float32 and float16 everywhere; bfloat16 only on a GPU (the interpreter mangles it)."""
    out = [torch.float32, torch.float16]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        out.append(torch.bfloat16)
    return out


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor,
                        name: str = "output", atol: float | None = None) -> None:
    """Check ``out`` against ``ref64`` with the error budget of ``same_dtype`` (plain torch)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    atol = ATOL[out.dtype] if atol is None else atol
    ref = ref64.double().cpu()
    err = (out.double().cpu() - ref).abs()
    budget = 2 * (same_dtype.double().cpu() - ref).abs() + atol * (1 + ref.abs())
    bad = err > budget
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements off; worst "
                           f"error {err.max().item():.3g} vs budget {budget.min().item():.3g}")
