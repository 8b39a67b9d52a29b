"""Autograd helpers shared by the kernel tests."""


def leaves(*tensors):
    """Fresh leaf copies that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run_with_grads(fn, inputs, dout):
    """Output and input gradients of ``fn(*inputs)`` after backpropagating ``dout``."""
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [None if t is None else t.grad for t in inputs]
