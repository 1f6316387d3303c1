"""Tensors with torch's lazy bits: a negative view (``x.conj().imag`` is one) or a conjugate view reads as its
values in torch, but its memory holds the negated or unconjugated numbers. A Triton kernel reads the memory,
so every variant must be handed resolved tensors (``_registry.resolved``); before, the fused KAN kernel took
a negative-view x with its sign flipped, silently.
"""
import pytest
import torch

from opforge.kernels import get_op, kan_linear, use_backend

OPS = ["spectral_conv", "kan", "kernel_sum"]


def _lazy(t: torch.Tensor) -> torch.Tensor:
    """A view with t's values whose memory holds something else: conjugate bit (complex), negative bit (real)."""
    v = t.conj_physical().conj() if t.is_complex() else torch._neg_view(-t)
    assert v.is_conj() or v.is_neg()
    return v


def _small_cases(op):
    return [c for c in op.cases if "small" in c.tags][:2]


@pytest.mark.parametrize("op_name", OPS)
def test_every_variant_reads_lazy_views_as_their_values(op_name):
    op = get_op(op_name)
    for case in _small_cases(op):
        p, args = op.make_inputs(case, "cpu", torch.float32, requires_grad=True)
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        for v in op.variants:
            ref = op.run_variant(v, p, *args)
            g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=ref.dtype)
            ref_grads = torch.autograd.grad(ref, [args[i] for i in tensors], g, allow_unused=True)
            lazy_g = torch.autograd.grad(op.run_variant(v, p, *args), [args[i] for i in tensors], _lazy(g),
                                         allow_unused=True)  # the incoming gradient a lazy view
            for a, b in zip(lazy_g, ref_grads):
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{case.name}, {v}, lazy gradient")
            for i in tensors:
                lazy = list(args)
                lazy[i] = _lazy(args[i])
                out = op.run_variant(v, p, *lazy)
                msg = f"{case.name}, variant {v}, argument {i} as a lazy view"
                torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=msg)
                grads = torch.autograd.grad(out, [args[j] for j in tensors], g, allow_unused=True)
                for a, b in zip(grads, ref_grads):
                    assert (a is None) == (b is None), msg
                    if a is not None:
                        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=msg)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kan_knots_and_centres_as_negative_views(backend):
    """The knots and RBF centres ride inside the basis description, past the argument list."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.rand(9, 4, generator=gen) * 2 - 1, torch.randn(3, 4, 6, generator=gen)
    grid = torch.linspace(-1.6, 1.6, 10).expand(4, -1).contiguous()
    centers = torch.linspace(-1, 1, 6)
    with use_backend(backend):
        torch.testing.assert_close(kan_linear(x, w, grid=grid, spline_order=3),
                                   kan_linear(x, w, grid=_lazy(grid), spline_order=3), rtol=0, atol=0)
        torch.testing.assert_close(kan_linear(x, w, "rbf", centers=centers, width=0.4),
                                   kan_linear(x, w, "rbf", centers=_lazy(centers), width=0.4), rtol=0, atol=0)
