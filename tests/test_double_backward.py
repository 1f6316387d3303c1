"""Second derivatives (``create_graph=True``): physics-informed losses on du/dx, gradient penalties.

The torch variants' backward passes are torch ops, so autograd differentiates them once more:
``gradgradcheck`` in float64 checks that against finite differences. Triton kernels are not
differentiable; a Triton variant's backward run with ``create_graph=True`` recomputes the op with the
torch variant's math on the saved inputs (``graph_grads``), so every variant's second derivatives must
match the torch variant's (before, they came back without a graph: ``du/dx`` was a constant, and a loss
on it silently contributed nothing to the parameters' gradients).
"""
import pytest
import torch
from torch.autograd import gradgradcheck

from opforge.kernels import KERNELS, get_op, kan_linear, kernel_matvec, spectral_conv, use_backend
from opforge.reference import assert_close

F64 = torch.float64


def _kan(basis, dtype, device):
    g = torch.Generator().manual_seed(11)
    K = {"bspline": 6, "rbf": 5, "chebyshev": 5, "fourier": 6}[basis]
    kw = {}
    if basis == "bspline":
        grid = torch.linspace(-2.2, 2.2, 10, dtype=dtype, device=device).expand(3, -1).contiguous()
        kw = dict(grid=grid, spline_order=3)
    elif basis == "rbf":
        kw = dict(centers=torch.linspace(-2, 2, 5, dtype=dtype, device=device), width=0.8)
    x = torch.randn(5, 3, generator=g, dtype=dtype)
    w = torch.randn(4, 3, K, generator=g, dtype=dtype)
    wb = torch.randn(4, 3, generator=g, dtype=dtype)
    bias = torch.randn(4, generator=g, dtype=dtype)
    return (lambda x, w, wb, bias: kan_linear(x, w, basis, base_weight=wb, bias=bias, **kw)), (x, w, wb, bias)


def _ksum(kernel, d, dtype, device):
    g = torch.Generator().manual_seed(12)
    x = torch.rand(6, d, generator=g, dtype=dtype)
    y = torch.rand(7, d, generator=g, dtype=dtype)
    b = torch.randn(7, 2, generator=g, dtype=dtype)
    ls = 0.4 + torch.rand(d, generator=g, dtype=dtype)
    return (lambda x, y, b, ls: kernel_matvec(x, y, b, kernel, lengthscale=ls, outputscale=1.5)), (x, y, b, ls)


def _spectral(shape, modes, out_shape, dtype, device):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(shape, generator=g, dtype=dtype)
    cdt = torch.complex128 if dtype == F64 else torch.complex64
    w = torch.randn((shape[1], 3) + tuple(modes), generator=g, dtype=cdt)
    bias = torch.randn(3, generator=g, dtype=dtype)
    return (lambda x, w, bias: spectral_conv(x, w, bias, output_shape=out_shape)), (x, w, bias)


KAN = [("kan", b) for b in ("bspline", "rbf", "chebyshev", "fourier")]
KSUM = [("kernel_sum", k, 3) for k in KERNELS] + [("kernel_sum", "gaussian", 9)]
SPECTRAL = [("spectral_conv", (2, 2, 11), (5,), None), ("spectral_conv", (2, 2, 7, 6), (4, 3), None),
            ("spectral_conv", (1, 2, 6, 6), (4, 3), (9, 8)), ("spectral_conv", (1, 2, 5, 4, 6), (4, 2, 3), None)]
CASES = KAN + KSUM + SPECTRAL


def _make(case, dtype, device="cpu"):
    """(function, inputs) of a case; tensors the function holds (knots, centres) and the inputs on ``device``."""
    if case[0] == "kan":
        f, inputs = _kan(case[1], dtype, device)
    elif case[0] == "kernel_sum":
        f, inputs = _ksum(case[1], case[2], dtype, device)
    else:
        f, inputs = _spectral(case[1], case[2], case[3], dtype, device)
    return f, tuple(t.to(device) for t in inputs)


def _id(case):
    return "-".join(str(c) for c in case)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_torch_variant_gradgradcheck(case):
    f, inputs = _make(case, F64)
    inputs = tuple(t.requires_grad_() for t in inputs)
    with use_backend("torch"):
        assert gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_bspline_local_form_gradgradcheck(monkeypatch):
    """The B-spline case above is small enough for the recursion over all knots; the local form (search,
    local de Boor, scatter) that larger inputs take must be twice differentiable too."""
    from opforge.kernels import kan

    for name in ("_FULL_MAX", "_FULL_ROWS", "_FULL_ROWS_GRAPH"):
        monkeypatch.setattr(kan, name, 0)
    f, inputs = _make(("kan", "bspline"), F64)
    inputs = tuple(t.requires_grad_() for t in inputs)
    with use_backend("torch"):
        assert gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def _pinn(f, inputs):
    """A physics-informed loss: u = f(...), du = d<u, v>/d(first input) with create_graph, L = <u, c> + |du|^2;
    returns dL/d(every input)."""
    inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    u = f(*inputs)
    gen = torch.Generator().manual_seed(14)
    v = torch.randn(u.shape, generator=gen).to(u.dtype)
    c = torch.randn(u.shape, generator=gen).to(u.dtype)
    (du,) = torch.autograd.grad((u * v).sum(), inputs[0], create_graph=True)
    assert du.requires_grad, "du/dx came back without a graph"
    loss = (u * c).sum() + (du * du).sum()
    return torch.autograd.grad(loss, inputs)


TRITON_VARIANTS = [(case, v) for case in CASES for v in (t.name for t in get_op(case[0]).triton_variants())]


@pytest.mark.parametrize("case,variant", TRITON_VARIANTS, ids=[f"{_id(c)}-{v}" for c, v in TRITON_VARIANTS])
def test_triton_second_derivatives_match_torch(case, variant):
    f, inputs = _make(case, torch.float32)
    with use_backend("torch"):
        want = _pinn(f, tuple(t.to(torch.complex128 if t.is_complex() else F64) for t in inputs))
    with use_backend("triton", **{case[0]: variant}):
        got = _pinn(f, inputs)
    for i, (t, a, b) in enumerate(zip(inputs, got, want)):
        assert a.dtype == t.dtype
        assert_close(a, b.detach().resolve_conj().numpy(), torch.float32, 64,
                     f"{case[0]} {variant}: second-order gradient of input {i}")


def test_only_the_bias_needs_a_gradient():
    """A create_graph backward where the kernel's own inputs need nothing (only the bias trains)."""
    f, (x, w, wb, bias) = _kan("rbf", torch.float32, "cpu")
    bias.requires_grad_()
    for backend in ("torch", "triton"):
        with use_backend(backend):
            y = f(x, w, None, bias)
            (gb,) = torch.autograd.grad((y * y).sum(), bias, create_graph=True)
            (ggb,) = torch.autograd.grad(gb.sum(), bias)
        torch.testing.assert_close(ggb, torch.full_like(bias, 2.0 * x.shape[0]))
