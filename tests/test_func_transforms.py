"""torch.func transforms (vmap, grad, jacrev, jacfwd, hessian, functional_call), forward-mode AD,
torch.compile and torch.jit.trace over opforge's ops (the torch.compile / torch.export graph nodes:
test_graph_op.py).

The custom autograd Functions behind the memory-lean torch variants and the Triton variants do not
compose with these transforms (forward-mode AD, batching rules). Under a transform, and on dual tensors
of ``torch.autograd.forward_ad``, the registry runs each op's ``plain`` differentiable torch math
instead (``Op.run_plain``), on any device. Each result here is checked against ordinary autograd through
the ops' usual paths, in float64. Under torch.compile a differentiated call runs eagerly at a graph break
and a call without gradients is an opforge graph node; either way its dispatch stays live.
"""
import contextlib
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacrev, stack_module_state, vmap

from opforge.kernels import (ChebyKANLayer, FastKANLayer, FourierKANLayer, KANLinear, KERNELS, SpectralConv,
                             get_op, kan_linear, kernel_matvec, use_backend)
from opforge.kernels._registry import checked_once, lanes
from test_double_backward import CASES, _id, _make

F64 = torch.float64


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _weights(u):
    return torch.randn(u.shape, generator=torch.Generator().manual_seed(21), dtype=u.dtype).to(u.device)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_vmap_of_grad_gives_autograd_per_example_gradients(case):
    """vmap(grad) over the rows of the first input (every op is independent along them) against one
    autograd pass through the op's usual path."""
    f, (x, *rest) = _make(case, F64)
    v = _weights(f(x, *rest))
    xg = x.clone().requires_grad_()
    (want,) = torch.autograd.grad((f(xg, *rest) * v).sum(), xg)
    got = vmap(grad(lambda xi, vi: (f(xi[None], *rest)[0] * vi).sum()))(x, v)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_hessian_matches_double_backward(case):
    """torch.func.hessian (forward over reverse mode, the plain math) against autograd's double backward
    through the ops' autograd Functions (torch.autograd.functional.hessian)."""
    f, (x, *rest) = _make(case, F64)
    x = x[:1]  # one row: Hessians are (numel)^2
    v = _weights(f(x, *rest))

    def scalar(xi):
        return (f(xi, *rest) * v).sum()

    got = hessian(scalar)(x)
    want = torch.autograd.functional.hessian(scalar, x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_mode_dual_tensors(case):
    """torch.autograd.forward_ad outside torch.func: dual tensors run the plain math; the tangent out
    matches autograd's jvp (by double backward through the usual path)."""
    f, (x, *rest) = _make(case, F64)
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(22), dtype=x.dtype)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(f(fwAD.make_dual(x, t), *rest))
    y, want = torch.autograd.functional.jvp(lambda z: f(z, *rest), x, t)
    torch.testing.assert_close(out.primal, y)
    torch.testing.assert_close(out.tangent, want)


def _modules():
    torch.manual_seed(3)
    kan = KANLinear(3, 4, grid_size=4)
    kan.update_grid(torch.randn(32, 3) * 1.7)  # non-uniform per-feature knots
    return {"KANLinear": kan, "FastKANLayer": FastKANLayer(3, 4, num_grids=5),
            "ChebyKANLayer": ChebyKANLayer(3, 4, 4), "FourierKANLayer": FourierKANLayer(3, 4, 3)}


@pytest.mark.parametrize("name", list(_modules()))
def test_module_jacobians_and_parameter_gradients(name):
    m = _modules()[name].double()
    x = torch.randn(6, 3, dtype=F64) * 1.5
    # per-example input Jacobians [6, out, in] against autograd, row by row of the output
    J = vmap(jacrev(lambda xi: m(xi[None])[0]))(x)
    xg = x.clone().requires_grad_()
    y = m(xg)
    for o in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, o].sum(), xg, retain_graph=True)
        torch.testing.assert_close(J[:, o], g)
    # gradients over the parameters through functional_call against .backward()
    params = {k: p.detach() for k, p in m.named_parameters()}
    got = grad(lambda p: functional_call(m, p, (x,)).square().sum())(params)
    m.requires_grad_()  # FastKAN's frozen centres too: torch.func differentiates whatever it is given
    with pytest.warns(RuntimeWarning, match="plain torch math") if name == "FastKANLayer" else _no_warning():
        m(x).square().sum().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(got[k], p.grad, msg=f"{name}.{k}")


def test_vmap_over_an_ensemble_of_kan_layers_with_their_own_knots():
    """Model ensembling: parameters and buffers (the knots) stacked and vmapped; each lane's knots are
    checked, and a bad lane is an error, not a silent NaN."""
    torch.manual_seed(4)
    models = [KANLinear(3, 2, grid_size=4) for _ in range(3)]
    for i, m in enumerate(models):
        m.update_grid(torch.randn(40, 3) * (1 + i))
    params, buffers = stack_module_state(models)
    base = KANLinear(3, 2, grid_size=4).to("meta")
    x = torch.randn(5, 3)

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    got = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        torch.testing.assert_close(got[i], m(x), rtol=1e-5, atol=1e-6)
    buffers["grid"][1, 2, 3] = buffers["grid"][1, 2, 2]  # lane 1: knots not strictly increasing
    with pytest.raises(ValueError, match="strictly increasing"):
        vmap(run, in_dims=(0, 0, None))(params, buffers, x)


def test_rbf_width_as_a_tensor_is_differentiated():
    """An RBF width given as a tensor that requires grad, or differentiated or vmapped by torch.func: its
    gradient comes from the plain math (the kernels read the width as a number; it used to be read with
    float(), its gradient silently 0 under grad and None under autograd), against central differences;
    every vmapped lane's width is checked."""
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(2, 3, 6, generator=gen, dtype=F64)
    c = torch.linspace(-1.5, 1.5, 6, dtype=F64)

    def f(width):
        return kan_linear(x, w, "rbf", centers=c, width=width).square().sum()

    h = 1e-6
    fd = [(f(v + h) - f(v - h)) / (2 * h) for v in (0.7, 0.9)]
    torch.testing.assert_close(vmap(grad(f))(torch.tensor([0.7, 0.9], dtype=F64)), torch.stack(fd))
    wt = torch.tensor(0.7, dtype=F64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="width requires grad"):
        f(wt).backward()
    torch.testing.assert_close(wt.grad, fd[0])
    with torch.no_grad():  # the kernels' path, width read as a number
        torch.testing.assert_close(f(wt), f(0.7))
    with pytest.raises(ValueError, match="width must be positive and finite"):
        vmap(f)(torch.tensor([0.7, -0.9], dtype=F64))
    with pytest.raises(TypeError, match="one-element real tensor"):
        f(torch.tensor([0.7, 0.9], dtype=F64))


def test_lengthscale_gradients_under_vmap_and_bad_lanes():
    torch.manual_seed(5)
    x, y, b = torch.randn(4, 2, dtype=F64), torch.randn(6, 2, dtype=F64), torch.randn(6, dtype=F64)
    ls = torch.tensor([[0.5, 0.9], [1.2, 0.7]], dtype=F64)  # a lengthscale per lane (ARD)

    def loss(l):
        return kernel_matvec(x, y, b, "matern52", lengthscale=l).sum()

    got = vmap(grad(loss))(ls)
    for i in range(2):
        li = ls[i].clone().requires_grad_()
        (want,) = torch.autograd.grad(loss(li), li)
        torch.testing.assert_close(got[i], want)
    with pytest.raises(ValueError, match="lengthscale must be positive"):
        vmap(loss)(torch.tensor([[0.5, 0.9], [1.2, -0.7]], dtype=F64))


@pytest.mark.parametrize("kernel,d", [(k, 2) for k in KERNELS] + [("gaussian", 9)])
def test_kernel_hessian_at_coincident_points_is_finite(kernel, d):
    """At x = y_j, sqrt(|x - y_j|^2) has an infinite slope: the second derivatives must still be finite
    (2 phi'(0) I from that point), on the plain math, the torch Function and the Triton variant. (D = 9:
    squared distances by expansion, whose clamp at 0 must not cut the second derivative there.)"""
    g = torch.Generator().manual_seed(6)
    y, b = torch.randn(5, d, generator=g, dtype=F64), torch.randn(5, 1, generator=g, dtype=F64)

    def scalar(xi):
        return kernel_matvec(xi[None], y.to(xi.dtype), b.to(xi.dtype), kernel, lengthscale=0.7).sum()

    x0 = y[1].clone()
    got = hessian(scalar)(x0)
    assert torch.isfinite(got).all()
    with use_backend("torch"):
        torch.testing.assert_close(torch.autograd.functional.hessian(scalar, x0), got)
    with use_backend("triton"):  # float32 (flash takes no float64)
        h = torch.autograd.functional.hessian(scalar, x0.float())
    torch.testing.assert_close(h, got.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["matern32", "matern52"])
def test_plain_matern_keeps_its_tail(kernel):
    """The plain math's split near 0 (1 - c s plus a remainder) would cancel far out: at r = 12 lengthscales
    a float32 kernel value of 1e-9 came out as rounding noise of 1e-5. Under vmap the sums of far points must
    match the usual path's to float32 relative accuracy."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, generator=g)
    y = torch.randn(7, 3, generator=g) + 12.0  # every pair ~12 to 25 lengthscales apart
    b = torch.rand(7, 1, generator=g) + 0.5  # positive weights: the sums are tiny and positive
    want = kernel_matvec(x, y, b, kernel)
    got = vmap(lambda xi: kernel_matvec(xi[None], y, b, kernel)[0])(x)
    assert (want > 0).all() and want.max() < 1e-6
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_triton_cannot_be_forced_under_a_transform():
    x, y, b = torch.randn(3, 2), torch.randn(4, 2), torch.randn(4)
    per_point = vmap(lambda xi: kernel_matvec(xi[None], y, b)[0])
    flash = get_op("kernel_sum").triton_variants()[0].name
    for kw in ({"backend": "triton"}, {"kernel_sum": flash}):
        with use_backend(**kw), pytest.raises(ValueError, match="torch.func transforms"):
            per_point(x)
    with use_backend("triton", kernel_sum="torch"):  # the pin wins over the backend, as outside transforms
        torch.testing.assert_close(per_point(x), kernel_matvec(x, y, b))


def test_lanes_and_checks_see_every_lane():
    x = torch.arange(24.0).reshape(2, 3, 4)

    def inner(a):
        ls = lanes(a)
        assert ls.shape == (6, 4)
        torch.testing.assert_close(ls, x.permute(1, 0, 2).reshape(6, 4))
        return a

    vmap(vmap(inner, in_dims=0), in_dims=1)(x)
    assert lanes(x).shape == (1, 2, 3, 4)  # a plain tensor: one lane
    seen = []
    vmap(lambda a: checked_once(a, lambda t: seen.append(t.clone()) or True) and a)(x)
    assert len(seen) == 2 and all(torch.equal(s, x[i]) for i, s in enumerate(seen))


@pytest.mark.parametrize("case", [CASES[0], ("kernel_sum", "matern32", 3), CASES[-3]], ids=_id)
def test_torch_compile_matches_eager_and_keeps_dispatch_live(case, monkeypatch):
    f, inputs = _make(case, torch.float32)
    compiled = torch.compile(f, backend="aot_eager")

    def run(fn):
        ins = [t.clone().requires_grad_() for t in inputs]
        out = fn(*ins)
        return [out] + list(torch.autograd.grad(out.abs().sum(), ins))

    for got, want in zip(run(compiled), run(f)):
        torch.testing.assert_close(got, want)
    # dispatch runs at every call, not once when traced: the torch variant is entered each time, and a
    # backend chosen after compiling takes effect (without gradients the op is an opforge graph node, whose
    # implementation dispatches: test_graph_op.py)
    variant = get_op(case[0]).torch_variant
    calls, torch_run = [], variant.run
    monkeypatch.setattr(variant, "run", lambda *a, **k: calls.append(1) or torch_run(*a, **k))
    with torch.no_grad():
        want = [compiled(*inputs) for _ in range(2)]
        assert len(calls) == 2
        with use_backend("triton"):
            got = compiled(*inputs)
    assert len(calls) == 2
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)


def _traceable():
    """(module, example input, other inputs it must then serve): batch sizes (a traced module takes inputs of
    the traced rank: its reshapes are recorded with that many dimensions, and another rank is an error; a
    traced spectral layer takes the traced resolution, see the test)."""
    torch.manual_seed(5)

    class KernelSum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.y, self.b = torch.nn.Parameter(torch.rand(9, 3)), torch.nn.Parameter(torch.randn(9, 2))

        def forward(self, x):
            return kernel_matvec(x, self.y, self.b, "matern52", lengthscale=0.6)

    kan = [(m, (4, 3), [(1, 3), (300, 3)]) for m in _modules().values()]  # (3 inputs each)
    return kan + [(SpectralConv(3, 4, n_modes=(6, 6)), (2, 3, 6, 6), [(5, 3, 6, 6), (1, 3, 6, 6)]),
                  (KernelSum(), (6, 3), [(1, 3), (700, 3)])]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_jit_trace_records_the_plain_math_and_serves_other_shapes(device):
    """torch.jit.trace records torch operations only: the KAN layers failed inside the tracer
    ("unordered_map::at", the torch variant's autograd Function), and on a GPU a Triton launch would have
    been missing from the traced graph. A traced call runs the op's plain
    torch math, and the traced module gives the module's outputs and gradients at other batch sizes, call
    after call. A traced spectral layer takes the resolution it was traced at: which planes of the half
    spectrum are self-conjugate depends on the last axis's parity, a choice the tracer bakes in (traced at
    6 x 6, a 7 x 7 input came out wrong), so the grid is pinned and another one is an error.

    Spectral convolutions are complex: from a traced module's second call on, TorchScript's optimized
    execution differentiates chains of complex products without conjugation (gradients 10-100% off here,
    forward exact), so tracing one with gradients possible warns and says what works: their gradients are
    checked inside ``torch.jit.optimized_execution(False)``."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for m, example, others in _traceable():
        m = m.to(device)
        complex_math = isinstance(m, SpectralConv)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")  # (and TracerWarnings: the shape checks read Python values)
            traced = torch.jit.trace(m, torch.randn(*example, device=device).clamp(-2, 2), check_trace=False)
        said = [w for w in seen if "optimized_execution(False)" in str(w.message)]
        assert len(said) == (1 if complex_math else 0), type(m).__name__
        with torch.jit.optimized_execution(not complex_math):
            for shape in [example, example] + others:
                x = torch.rand(*shape, device=device) * 3 - 1.5
                outs = []
                for f in (traced, m):
                    xg = x.clone().requires_grad_()
                    m.zero_grad()
                    y = f(xg)
                    y.square().sum().backward()
                    outs.append([y, xg.grad] + [p.grad.clone() for p in m.parameters() if p.requires_grad])
                for got, want in zip(*outs):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{type(m).__name__} {shape}")
        if complex_math:
            for shape in [(2, 3, 7, 7), (2, 3, 10, 10)]:
                with pytest.raises(RuntimeError, match="invalid for input of size"):
                    traced(torch.randn(*shape, device=device))
    # the traced graph reads the module's knots when it runs, so it must not keep a form that holds for
    # evenly spaced knots only (taken past 2^16 basis values): update_grid moves them in place
    kan = KANLinear(3, 4, grid_size=5).to(device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(kan, torch.randn(4000, 3, device=device), check_trace=False)
        kan.update_grid(torch.randn(256, 3, device=device) ** 3)
        x = torch.randn(64, 3, device=device) * 1.5
        torch.testing.assert_close(traced(x), kan(x))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # traced for inference: nothing to warn about
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.jit.trace(SpectralConv(2, 2, n_modes=(4,)), torch.randn(1, 2, 9), check_trace=False)
    x = torch.rand(6, 3)
    with use_backend("triton"), pytest.raises(ValueError, match="torch.jit.trace"):
        torch.jit.trace(lambda t: kernel_matvec(t, t, t[:, :1]), x, check_trace=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cuda_transforms_run_the_plain_math_and_agree_with_the_kernels(case):
    """On CUDA tensors a transform runs the plain torch math; per-example gradients agree with one
    autograd pass through the dispatched Triton variant (float32)."""
    f, (x, *rest) = _make(case, torch.float32, "cuda")
    v = _weights(f(x, *rest))
    xg = x.clone().requires_grad_()
    (want,) = torch.autograd.grad((f(xg, *rest) * v).sum(), xg)
    got = vmap(grad(lambda xi, vi: (f(xi[None], *rest)[0] * vi).sum()))(x, v)
    assert (got - want).abs().max() <= 2e-4 * want.abs().max()
    compiled = torch.compile(f, backend="aot_eager")
    torch.testing.assert_close(compiled(x, *rest), f(x, *rest))
