"""Checks of the ``duollm.stack.RoutedStack`` contract that hold for every implementation
(``DuoStack`` in test_stack.py, the Hugging Face stacks in test_hf_stack.py)."""
import torch

from duollm.reference import BIG


def check_attend_in_context_with_own_context(stack, h: torch.Tensor, n_layers: int) -> None:
    """With every branch's keys the recorded context's own, ``attend_in_context`` is plain
    causal attention (position t sees exactly positions <= t), and ``attend_record`` returns
    what ``attend`` does; layer by layer over ``n_layers``, from embeddings ``h`` (B, T, d)."""
    with torch.no_grad():
        for i in range(n_layers):
            plain = stack.attend(i, h)
            recorded, ctx = stack.attend_record(i, h)
            torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-6)
            branch = stack.attend_in_context(i, h[None].expand(3, -1, -1, -1), ctx)
            torch.testing.assert_close(branch, plain[None].expand(3, -1, -1, -1),
                                       rtol=1e-5, atol=1e-5)
            h = stack.ffn(i, plain, BIG)
