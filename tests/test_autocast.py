"""torch.autocast (mixed-precision training): each op's cast policy, documented in its docstring and the
README's Precision section, and nothing else.

* ``kan_linear`` and the KAN layers are on autocast's lower-precision list, like ``nn.Linear``: x is cast to
  the autocast dtype, the weights are read as they are, the result is in that dtype;
* ``kernel_matvec`` and ``kernel_solve`` are on its float32 list, like ``torch.cdist``;
* the spectral convolution keeps x's dtype (torch's FFTs are on neither list).

Under autocast each op must give exactly what an explicit call with the cast inputs gives outside autocast,
forward and backward, with the backward run inside the autocast region too: the variants run in the op's
own precision policy, not with their torch matmuls cast to 16 bits (which made the KAN torch variant's
backward fail on a bfloat16 gradient against float32 bases, and kernel sums refuse a bfloat16 x from an
autocast layer beside float32 points).
"""
import copy

import pytest
import torch

from opforge.kernels import (KAN, ChebyKANLayer, FastKAN, FastKANLayer, FourierKANLayer, KANLinear, SpectralConv,
                             kernel_matvec, kernel_solve, use_backend)

AMP = [torch.bfloat16, torch.float16]


class _KernelSum(torch.nn.Module):
    """kernel_matvec(x, y, b) with y and b as float32 parameters (deep kernel learning: x from a network)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.y = torch.nn.Parameter(torch.rand(6, 5, generator=g))
        self.b = torch.nn.Parameter(torch.randn(6, 2, generator=g))
        self.lengthscale = torch.nn.Parameter(torch.full((5,), 0.7))

    def forward(self, x):
        return kernel_matvec(x, self.y, self.b, "matern52", lengthscale=self.lengthscale)


def _modules():
    torch.manual_seed(0)
    # name: (module, input shape, policy: the dtype autocast gives x, "amp" for the autocast dtype)
    return {
        "spectral2d": (SpectralConv(3, 4, (6, 5)), (2, 3, 7, 6), None),
        "spectral1d": (SpectralConv(3, 2, (5,)), (2, 3, 9), None),
        "kan_bspline": (KANLinear(5, 3, grid_size=4), (7, 5), "amp"),
        # FastKAN's own LayerNorm and base nn.Linear have autocast's policies: test_networks_train_under_autocast
        "kan_rbf": (FastKANLayer(5, 3, num_grids=4, use_base_update=False, use_layernorm=False), (7, 5), "amp"),
        "kan_chebyshev": (ChebyKANLayer(5, 3, 4), (7, 5), "amp"),
        "kan_fourier": (FourierKANLayer(5, 3, 3), (7, 5), "amp"),
        "kernel_sum": (_KernelSum(), (4, 5), torch.float32),
    }


MODULES = _modules()


def _run(module, x, amp=None, backward_inside=False):
    """The output and the gradients of x and every parameter, under autocast to ``amp`` when given."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        y = module(x)
        if backward_inside:
            y.float().square().sum().backward()
    if not backward_inside:
        y.float().square().sum().backward()
    return y, [x.grad] + [p.grad for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_autocast_is_the_documented_cast_and_nothing_else(name, x_dtype, amp, backend):
    _check_policy(name, x_dtype, amp, backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_cuda_autocast_is_the_documented_cast_and_nothing_else(name, amp):
    _check_policy(name, torch.float32, amp, "auto", "cuda")


def _check_policy(name, x_dtype, amp, backend, device):
    module, shape, policy = MODULES[name]
    module = copy.deepcopy(module).to(device)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=x_dtype)
    want_dtype = amp if policy == "amp" else (x_dtype if policy is None else policy)
    with use_backend(backend):
        y, grads = _run(module, x, amp, backward_inside=x_dtype == torch.float32)
        y_ref, grads_ref = _run(module, x.to(want_dtype))
    assert y.dtype == want_dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads[1:], grads_ref[1:]):  # parameters: exactly the explicit call's
        assert g is not None and g.dtype == g_ref.dtype
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    assert grads[0].dtype == x_dtype  # x's gradient: the explicit call's, cast back through autocast's cast
    torch.testing.assert_close(grads[0], grads_ref[0].to(x_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["KAN", "FastKAN", "FNO-block"])
def test_networks_train_under_autocast(name, backend):
    """Whole networks, with their torch layers (FastKAN's LayerNorm and base nn.Linear, an FNO block's 1x1
    convolution), train a step under bfloat16 autocast and stay within bfloat16's error of float32."""
    torch.manual_seed(6)
    if name == "KAN":
        net, x = KAN([4, 6, 2], grid_size=4), torch.randn(9, 4)
    elif name == "FastKAN":
        net, x = FastKAN([4, 6, 2], num_grids=4), torch.randn(9, 4)
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), SpectralConv(4, 4, (4, 4)), torch.nn.GELU(),
                                  torch.nn.Conv2d(4, 1, 1))
        x = torch.randn(2, 2, 8, 8)
    with use_backend(backend):
        y32, g32 = _run(net, x)
        y16, g16 = _run(net, x, torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    scale = y32.abs().max().item()
    torch.testing.assert_close(y16.float(), y32, rtol=0, atol=0.05 * scale)
    for g, g_ref in zip(g16, g32):
        torch.testing.assert_close(g.to(g_ref.dtype), g_ref, rtol=0, atol=0.05 * g_ref.abs().max().item())


def test_kernel_solve_under_autocast_runs_in_float32():
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(12, 2, generator=g), torch.randn(12, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alpha = kernel_solve(x.bfloat16(), y, "gaussian", noise=0.1, lengthscale=0.5)
    assert alpha.dtype == torch.float32
    torch.testing.assert_close(alpha, kernel_solve(x.bfloat16().float(), y, "gaussian", noise=0.1, lengthscale=0.5),
                               rtol=0, atol=0)


def test_update_grid_under_autocast_matches_float32():
    torch.manual_seed(2)
    a, b = KANLinear(3, 2, grid_size=5), KANLinear(3, 2, grid_size=5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(40, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a.update_grid(x)
    b.update_grid(x)
    for (name, t), t_ref in zip(a.state_dict().items(), b.state_dict().values()):
        assert t.dtype == t_ref.dtype, name
        # (float32 least squares agree run to run to about 1e-7, not bit for bit; a 16-bit bmm is off by 1e-3)
        torch.testing.assert_close(t, t_ref, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["spectral2d", "kan_bspline", "kernel_sum"])
def test_compiled_inference_under_autocast_matches_eager(name):
    module, shape, _ = MODULES[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager, y_compiled = module(x), compiled(x)
    assert y_compiled.dtype == y_eager.dtype
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
