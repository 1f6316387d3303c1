"""Meta tensors: shapes without values, as used for shape inference and for building a large model before its
memory exists (``with torch.device("meta")``). Modules build there (the KAN layers' least-squares initial fit
is skipped: nothing to fit) and every op gives its output's shape and dtype, with value checks skipped as in
the torch.compile fake implementations (``checked_once``)."""
import pytest
import torch

from opforge.kernels import (KAN, ChebyKANLayer, FastKAN, FastKANLayer, FourierKANLayer, KANLinear, SpectralConv,
                             kernel_matvec)

MODULES = {
    "SpectralConv": (lambda: SpectralConv(3, 4, (6, 6)), (2, 3, 9, 8), (2, 4, 9, 8)),
    "KANLinear": (lambda: KANLinear(4, 3), (5, 4), (5, 3)),
    "KAN": (lambda: KAN([4, 6, 2]), (2, 5, 4), (2, 5, 2)),
    "FastKANLayer": (lambda: FastKANLayer(4, 3), (5, 4), (5, 3)),
    "FastKAN": (lambda: FastKAN([4, 6, 2]), (5, 4), (5, 2)),
    "ChebyKANLayer": (lambda: ChebyKANLayer(4, 3, 4), (5, 4), (5, 3)),
    "FourierKANLayer": (lambda: FourierKANLayer(4, 3, 3), (5, 4), (5, 3)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_build_and_run_on_the_meta_device(name):
    build, x_shape, y_shape = MODULES[name]
    with torch.device("meta"):
        module = build()
        x = torch.randn(x_shape, requires_grad=True)
        y = module(x)
    assert all(p.is_meta for p in module.parameters())
    assert y.is_meta and tuple(y.shape) == y_shape and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape


def test_kernel_matvec_on_the_meta_device():
    with torch.device("meta"):
        x, y, b = torch.randn(2, 7, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 4)
        out = kernel_matvec(x, y, b, "matern32", lengthscale=torch.full((3,), 0.5))
    assert out.is_meta and tuple(out.shape) == (2, 7, 4)
