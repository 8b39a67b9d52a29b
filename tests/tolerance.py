"""Tolerances that mean something (docs/style.md, item 3).

A kernel output is compared with the reference computed in float64 from the same inputs,
and allowed twice the worst error that plain torch makes in the kernel's own dtype, plus a
small atol tiered by dtype:  max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + atol.
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
    """Check ``out`` against ``ref64`` with the error budget of ``same_dtype`` (plain torch).

    The budget is taken over the whole tensor (the flash-attention convention): the kernel's
    worst error may be at most twice plain torch's worst error, plus atol scaled by the
    reference's magnitude. Per element, torch's own error is zero by luck at some entries,
    which would turn ordinary rounding into failures (seen on an H100 for fp32 weight
    gradients reduced in a different order).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if out.numel() == 0:
        return
    atol = ATOL[out.dtype] if atol is None else atol
    ref = ref64.double().cpu()
    err = (out.double().cpu() - ref).abs().max().item()
    torch_err = (same_dtype.double().cpu() - ref).abs().max().item()
    budget = 2 * torch_err + atol * (1 + ref.abs().max().item())
    assert err <= budget, (f"{name}: worst error {err:.3g} exceeds the budget {budget:.3g} "
                           f"(plain torch in {out.dtype}: {torch_err:.3g})")
