"""No call reads tensor values back to the host once its parameters have been seen.

On a GPU, turning a tensor into a Python value (``bool(t)``, ``t.item()``, ``t.tolist()``, ...) waits for
every queued kernel: the CPU stops running ahead and each layer's launches are exposed. Validation that
needs values (knots, kernel-sum scale tensors) is therefore done once per version of the tensor
(``checked_once``), and numbers are checked as Python floats. The CPU tests watch opforge's own code for
such reads (torch and the Triton interpreter may read values inside themselves; only calls made from
``opforge.kernels`` count), through both backends; the GPU test asks CUDA itself to fail on a sync.
"""
import contextlib
import os
import sys

import pytest
import torch

import opforge.kernels as K
from opforge.kernels._registry import checked_once

KERNELS_DIR = os.path.dirname(K.__file__)
READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")


@contextlib.contextmanager
def host_reads():
    """Record (method, file, line) for every value read of a tensor made from a file of opforge.kernels."""
    hits = []
    saved = {n: getattr(torch.Tensor, n) for n in READS}

    def watch(name, method):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(KERNELS_DIR):
                hits.append((name, os.path.basename(caller), sys._getframe(1).f_lineno))
            return method(self, *args, **kwargs)
        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, watch(name, method))
    try:
        yield hits
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _calls(device="cpu"):
    """name -> (input tensors, a forward pass of each public entry point over them returning its outputs),
    modules and parameters made once: what the tests repeat, train through (``_train``) and capture."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    kan = [m.to(device) for m in (K.KANLinear(7, 5, grid_size=3), K.FastKANLayer(7, 5, num_grids=4),
                                  K.ChebyKANLayer(7, 5, 4), K.FourierKANLayer(7, 5, 3))]
    spec = [m.to(device) for m in (K.SpectralConv(3, 4, (5,)), K.SpectralConv(3, 4, (6, 6)),
                                   K.SpectralConv(3, 4, (4, 4, 3)))]
    x_kan, x_spec = rand(9, 7), [rand(2, 3, 11), rand(2, 3, 10, 9), rand(1, 3, 6, 5, 7)]
    pts, rhs = rand(9, 3), rand(9, 2)
    ls = torch.full((3,), 0.5, device=device, requires_grad=True)  # ARD, a tensor kept across calls

    def kernel_sums():
        A = K.KernelOperator(pts, kernel="imq", lengthscale=ls, noise=0.1)
        return [K.kernel_matvec(pts, pts, rhs, "matern52", lengthscale=ls, outputscale=2.0),
                K.kernel_matvec(pts, pts, rhs, "gaussian", lengthscale=0.3), A @ rhs, A.T @ rhs, A.diag()]

    return {"kan": ([x_kan], lambda: [m(x_kan) for m in kan]),
            "spectral_conv": (x_spec, lambda: [m(x) for m, x in zip(spec, x_spec)]),
            "kernel_sum": ([pts, rhs], kernel_sums)}


def _train(forward):
    """A training step: forward, then backward through every output."""
    sum(y.sum() for y in forward()).backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["kan", "spectral_conv", "kernel_sum"])
def test_no_host_reads_after_first_call(op, backend):
    forward = _calls()[op][1]
    with K.use_backend(backend):
        _train(forward)  # first sight: tensor parameters are validated (one read each)
        with host_reads() as hits:
            _train(forward)
            with torch.no_grad():
                forward()
    assert hits == [], f"{op} ({backend}) read tensor values on the host: {hits}"


@pytest.mark.parametrize("method", ["cholesky", "cg"])
def test_gp_predictions_read_only_the_test_points(method):
    """A GP model's repeated predictions (a Bayesian-optimisation loop's many calls), frozen or under no_grad:
    with the weights (and on the Cholesky path the factor) kept, the mean reads nothing back and, on the
    Cholesky path, the variance and covariance read only the new test points' finiteness (the distribution
    adds its factorisation's status); the kept hyperparameter values are checked once. A changed parameter is
    checked again: a NaN one is an error, not a NaN mean."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=g), torch.randn(30, generator=g)
    gp = K.GPRegression(x, y, "matern52", noise=0.1, method=method)
    xt = torch.randn(7, 3, generator=g)
    with torch.no_grad():
        gp(xt, return_variance=True), gp(xt, return_covariance=True), gp.posterior(xt)  # (kept, checked)
    calls = {"mean": lambda t: gp(t), "variance": lambda t: gp(t, return_variance=True),
             "covariance": lambda t: gp(t, return_covariance=True), "posterior": lambda t: gp.posterior(t)}
    want = {"mean": 0, "variance": 1, "covariance": 1, "posterior": 2}
    for name, call in calls.items() if method == "cholesky" else [("mean", calls["mean"])]:
        with torch.no_grad(), host_reads() as hits:
            call(torch.randn(7, 3, generator=g))
        assert len(hits) == want[name], (name, hits)
    gp.requires_grad_(False)  # (frozen: gradients in the test points only, an acquisition function's)
    with host_reads() as hits:
        gp(torch.randn(7, 3, generator=g).requires_grad_()).sum().backward()
    assert hits == []
    with torch.no_grad():
        gp.likelihood.noise_covar.raw_noise.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"noise must be > 0 and finite|\(noise nan\)"), torch.no_grad():
        gp(xt)


def test_watch_sees_reads():
    """The watcher is not blind: a lengthscale tensor seen for the first time is read (and a float is not)."""
    x, b = torch.randn(5, 2), torch.randn(5, 1)
    with host_reads() as hits:
        K.kernel_matvec(x, x, b, lengthscale=0.5)
    assert hits == []
    with host_reads() as hits:
        K.kernel_matvec(x, x, b, lengthscale=torch.tensor([0.5, 0.7]))
    assert hits and all(f == "kernel_sum.py" for _, f, _ in hits)


def test_checked_once_sees_changes():
    calls = []

    def check(t, tag):
        calls.append(tag)
        return float(t.sum())

    t = torch.ones(3)
    assert checked_once(t, check, "a") == 3.0 and checked_once(t, check, "a") == 3.0
    assert calls == ["a"]
    assert checked_once(t, check, "b") == 3.0 and calls == ["a", "b"]  # another check, its own entry
    t.add_(1)  # in-place: new version
    assert checked_once(t, check, "a") == 6.0 and calls[-1] == "a" and len(calls) == 3
    t.data = torch.zeros(3)  # storage swapped, version unchanged
    assert checked_once(t, check, "a") == 0.0 and len(calls) == 4
    t.data.copy_(torch.full((3,), 2.0))  # written through .data: its own version counter, t's unchanged
    assert t._version == 1 and checked_once(t, check, "a") == 6.0 and len(calls) == 5  # (a CPU tensor's values)
    assert checked_once(t, check, "a") == 6.0 and len(calls) == 5
    with torch.inference_mode():
        u = torch.ones(2)  # tracks no version: checked every time
    assert checked_once(u, check, "a") == 2.0 and checked_once(u, check, "a") == 2.0 and len(calls) == 7


def test_checked_once_reads_nothing_during_cuda_graph_capture(monkeypatch):
    """Inside CUDA graph capture (_capturing, stood in for here: the GPU test of inductor's CUDA graphs in
    test_graph_op runs the real one) a version checked before gives its remembered result, an unseen one is
    not read and gives None; after capture it is checked as usual."""
    from opforge.kernels import _registry

    calls = []

    def check(t):
        calls.append(1)
        return float(t.sum())

    seen, unseen = torch.ones(3), torch.full((2,), 5.0)
    assert checked_once(seen, check) == 3.0 and len(calls) == 1
    monkeypatch.setattr(_registry, "_capturing", lambda t: True)
    assert checked_once(seen, check) == 3.0 and checked_once(unseen, check) is None and len(calls) == 1
    with torch.inference_mode():
        inf = torch.ones(2)
    assert checked_once(inf, check) is None and len(calls) == 1
    monkeypatch.setattr(_registry, "_capturing", lambda t: False)
    assert checked_once(unseen, check) == 10.0 and len(calls) == 2



def test_kan_knots_first_seen_during_capture_leave_the_fused_kernel(monkeypatch):
    """During CUDA graph capture (stood in for, as above) B-spline knots checked before keep their spacing, and
    the fused kernel; knots not seen before have no known spacing, and a kernel other than the warm-up's could
    not be loaded there (cuModuleLoadData is refused during capture), so the fused variant declines them and
    the torch variant runs, for knots of any spacing."""
    import importlib

    from opforge.kernels import _registry

    kan = importlib.import_module("opforge.kernels.kan")
    fused = K.get_op("kan").variants["fused"]
    x, w = torch.randn(5, 3), torch.randn(4, 3, 6)
    seen = torch.linspace(-2.2, 2.2, 10).expand(3, -1).contiguous()  # evenly spaced knots
    unseen = seen.clone()
    p0 = kan._prepare(x, w, "bspline", None, None, seen, 3, None, None)[0]
    monkeypatch.setattr(_registry, "_capturing", lambda t: True)
    p1 = kan._prepare(x, w, "bspline", None, None, seen, 3, None, None)[0]
    p2 = kan._prepare(x, w, "bspline", None, None, unseen, 3, None, None)[0]
    assert p0.uniform and p1 == p0 and not p1.knots_unread and fused.why_not(p1) is None
    assert p2.knots_unread and not p2.uniform and "capture" in fused.why_not(p2)
    monkeypatch.setattr(_registry, "_capturing", lambda t: False)
    assert kan._prepare(x, w, "bspline", None, None, unseen, 3, None, None)[0] == p0  # read once capture is over

def test_update_grid_warns_when_a_captured_graph_assumed_even_knots(monkeypatch):
    """A CUDA graph captured with evenly spaced knots (capture stood in for, as above) replays the kernels
    and forms for such knots whatever the knots later hold; update_grid moves them in place, so when it
    moves them off even it says that graph is now wrong. Knots that stay even, and layers never captured,
    update silently."""
    import warnings

    from opforge.kernels import _registry

    x = torch.randn(64, 3) ** 3
    captured, kept_even, plain = (K.KANLinear(3, 4, grid_size=5) for _ in range(3))
    for layer in (captured, kept_even, plain):
        layer(x)  # the warm-up: knots checked (evenly spaced)
    monkeypatch.setattr(_registry, "_capturing", lambda t: True)
    captured(x), kept_even(x)
    monkeypatch.setattr(_registry, "_capturing", lambda t: False)
    with pytest.warns(RuntimeWarning, match="CUDA graph captured this layer with evenly spaced knots"):
        captured.update_grid(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.update_grid(x)
        kept_even.grid_eps = 1.0  # efficient-kan's all-uniform update: the knots stay evenly spaced
        kept_even.update_grid(x)


def test_edited_parameters_are_checked_again():
    layer = K.KANLinear(4, 3, grid_size=3)
    x = torch.randn(2, 4)
    layer(x)
    good = layer.grid.clone()
    with torch.no_grad():
        layer.grid[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        layer(x)
    with torch.no_grad():
        layer.grid.copy_(good)
    layer(x)
    with torch.no_grad():
        layer.grid.data = torch.flip(good, dims=[1]).contiguous()
    with pytest.raises(ValueError, match="increasing"):
        layer(x)
    ls = torch.tensor([0.5, 0.5, 0.5, 0.5])
    K.kernel_matvec(x, x, x[:, :1], lengthscale=ls)
    ls[0] = -1.0
    with pytest.raises(ValueError, match="lengthscale must be positive"):
        K.kernel_matvec(x, x, x[:, :1], lengthscale=ls)


def test_inference_mode():
    """Inference tensors have no version counter: they are validated every call, and work."""
    with torch.inference_mode():
        layer = K.KANLinear(4, 3, grid_size=3)
        x = torch.randn(2, 4)
        assert layer(x).shape == (2, 3)
        ls = torch.tensor([0.5, 0.6, 0.7, 0.8])
        assert K.kernel_matvec(x, x, x, lengthscale=ls).shape == (2, 4)
        layer.grid[0, 0] = float("inf")
        with pytest.raises(ValueError, match="finite"):
            layer(x)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["kan", "spectral_conv", "kernel_sum"])
def test_no_cuda_sync_after_first_call(op):
    forward = _calls("cuda")[op][1]
    _train(forward)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train(forward)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["kan", "spectral_conv", "kernel_sum"])
def test_forward_is_cuda_graph_capturable(op):
    """No syncs and no host-to-device copies on the call path: a forward pass can be captured in a CUDA
    graph (after warm-up calls, which compile and build cached bases) and replays on new inputs."""
    inputs, forward = _calls("cuda")[op]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        outs = forward()
    with torch.no_grad():
        for t in inputs:
            t.copy_(torch.randn_like(t))
    graph.replay()
    with torch.no_grad():
        want = forward()
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got, ref)
