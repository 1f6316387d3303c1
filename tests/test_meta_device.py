"""Meta tensors: shapes without values, as used for shape inference and for building a large model before its
memory exists (``with torch.device("meta")``). Modules build there (the KAN layers' least-squares initial fit
is skipped: nothing to fit) and every op gives its output's shape and dtype, with value checks skipped as in
the torch.compile fake implementations (``checked_once``). Deferred initialisation (build on meta, ``to_empty``,
then ``reset_parameters`` on each submodule holding state, as FSDP does) gives the layer a normal build gives."""
import pytest
import torch

from opforge.kernels import (KAN, ChebyKANLayer, FastKAN, FastKANLayer, FourierKANLayer, KANLinear, SpectralConv,
                             kernel_matvec)

MODULES = {
    "SpectralConv": (lambda: SpectralConv(3, 4, (6, 6)), (2, 3, 9, 8), (2, 4, 9, 8)),
    "SpectralConv-tucker": (lambda: SpectralConv(3, 4, (6, 6), factorization="tucker"), (2, 3, 9, 8), (2, 4, 9, 8)),
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


def _reset_like_fsdp(module):
    """What FSDP does for a meta-device module: ``reset_parameters()`` on every submodule with its own state."""
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            m.reset_parameters()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(MODULES))
def test_deferred_initialisation_gives_a_normal_build(name, device):
    """On the GPU too: KANLinear's initial fit drew its noise on the CPU and fitted it against the layer's
    knots wherever they were, so ``to_empty(device="cuda")`` then ``reset_parameters()`` failed on mixed
    devices (not run on a GPU yet)."""
    build, x_shape, _ = MODULES[name]
    torch.manual_seed(0)
    with torch.device(device):  # (built there: its draws from that device's generator, as the reset's)
        eager = build()
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device=device)
    torch.manual_seed(0)
    _reset_like_fsdp(module)
    want, got = eager.state_dict(), module.state_dict()
    assert want.keys() == got.keys()
    if name == "SpectralConv-tucker":
        # a factorized weight is reset by the layer, then by itself (FSDP resets each module holding
        # parameters): other draws than a normal build's, of the same deviation
        for w in (eager, module):
            std = w.weight.to_tensor().abs().pow(2).mean().sqrt()
            assert 0.3 * w.init_std < std < 3 * w.init_std
        want = {k: v for k, v in want.items() if not k.startswith("weight.")}
        got = {k: v for k, v in got.items() if not k.startswith("weight.")}
    for key in want:  # the knots and ChebyKAN's arange buffer too, which to_empty leaves as garbage
        torch.testing.assert_close(got[key], want[key], msg=key)
    x = torch.randn(x_shape, device=device)
    if name == "SpectralConv-tucker":
        module.weight.load_state_dict(eager.weight.state_dict())
    torch.testing.assert_close(module(x), eager(x))


def test_reset_parameters_with_a_module_activation():
    """A base_activation passed as a module (nn.SiLU()) is a child without parameters: reset skips it."""
    layer = FastKANLayer(4, 3, base_activation=torch.nn.SiLU())
    before = layer.spline_linear.weight.clone()
    layer.reset_parameters()
    assert not torch.equal(layer.spline_linear.weight, before)  # drawn again
    assert torch.isfinite(layer(torch.randn(2, 4))).all()


@pytest.mark.parametrize("name", list(MODULES))
def test_every_module_resets_to_a_seeded_build(name):
    """``module.reset_parameters()`` on the top module (the models included) gives a seeded build's state."""
    build, x_shape, _ = MODULES[name]
    module = build()
    if hasattr(module, "layers"):
        module(torch.rand(x_shape) * 0.5, **({"update_grid": True} if name == "KAN" else {}))
    torch.manual_seed(1)
    want = build().state_dict()
    torch.manual_seed(1)
    module.reset_parameters()
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, want[key], msg=key)


def test_reset_parameters_undoes_update_grid():
    layer = KANLinear(3, 2, grid_range=(-2, 3))
    knots = layer.grid.clone()
    layer.update_grid(torch.rand(50, 3) * 0.3)
    assert not torch.equal(layer.grid, knots)
    layer.reset_parameters()
    assert torch.equal(layer.grid, knots)
    assert torch.isfinite(layer(torch.randn(4, 3))).all()
