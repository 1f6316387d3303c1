"""torch.compile(fullgraph=True) and torch.export over opforge's ops (kernels/_graph_op.py).

A traced call of spectral_conv, kan_linear or kernel_matvec becomes one node,
``torch.ops.opforge.<name>``, whose implementation is the eager op (dispatch at run time) and whose
backward recomputes it. By default (``OPFORGE_COMPILE=auto``) only calls that need no gradient, and
exports, take that path; a differentiated call under torch.compile stays a graph break with the eager
autograd (no recompute). ``OPFORGE_COMPILE=op`` makes every traced call the node, so fullgraph training
works. Each result is checked against the eager op in float64. That dispatch stays live inside the node
(a backend chosen after compiling takes effect) is checked in test_func_transforms.py.
"""
import numpy as np
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch.export import Dim

from opforge.kernels import (ChebyKANLayer, FastKAN, FourierKANLayer, KAN, KANLinear, SpectralConv, kan_linear,
                             kernel_matvec)
from test_double_backward import CASES, _id, _make

F64 = torch.float64
OP_NAME = {"kan": "kan_linear", "kernel_sum": "kernel_matvec", "spectral_conv": "spectral_conv"}


def _recording(graphs):
    """A torch.compile backend that keeps dynamo's graphs and runs them through aot_eager (AOTAutograd:
    functionalization, the decomposed backward, the custom op's fake and autograd registrations)."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def _opforge_nodes(graphs) -> list:
    return [str(n.target) for gm in graphs for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("opforge.")]


def _loss_and_grads(fn, inputs) -> list:
    """[fn(*inputs), its gradient for every input] on fresh leaf copies of the inputs."""
    ins = [t.clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    return [out] + list(torch.autograd.grad(out, ins))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fullgraph_inference_is_one_graph_node(case):
    f, inputs = _make(case, F64)
    graphs = []
    compiled = torch.compile(lambda *a: f(*a).tanh(), fullgraph=True, backend=_recording(graphs))
    with torch.no_grad():
        got, want = compiled(*inputs), f(*inputs).tanh()
    torch.testing.assert_close(got, want)
    assert _opforge_nodes(graphs) == [f"opforge.{OP_NAME[case[0]]}.default"]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fullgraph_training_with_compile_mode_op(case, monkeypatch):
    """OPFORGE_COMPILE=op: the differentiated call is the node too; its backward op recomputes the forward
    through the eager autograd path and gives every input's gradient."""
    monkeypatch.setenv("OPFORGE_COMPILE", "op")
    f, inputs = _make(case, F64)
    graphs = []
    compiled = torch.compile(lambda *a: f(*a).sin().sum(), fullgraph=True, backend=_recording(graphs))
    for got, want in zip(_loss_and_grads(compiled, inputs), _loss_and_grads(lambda *a: f(*a).sin().sum(), inputs)):
        torch.testing.assert_close(got, want)
    assert _opforge_nodes(graphs) == [f"opforge.{OP_NAME[case[0]]}.default"]


@pytest.mark.parametrize("case", [CASES[0], ("kernel_sum", "matern52", 3), CASES[-3]], ids=_id)
def test_inductor_training_with_compile_mode_op(case, monkeypatch):
    """The same through inductor (on the CPU), which also asserts that each node's outputs have its fake
    implementation's strides (a spectral dx came back as a strided view before)."""
    monkeypatch.setenv("OPFORGE_COMPILE", "op")
    f, inputs = _make(case, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(*inputs), f(*inputs))
    torch._dynamo.reset()
    got = _loss_and_grads(torch.compile(lambda *a: f(*a).sin().sum(), fullgraph=True), inputs)
    for g, w in zip(got, _loss_and_grads(lambda *a: f(*a).sin().sum(), inputs)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_differentiated_calls_keep_the_graph_break_by_default():
    """OPFORGE_COMPILE=auto: a call that will be differentiated runs eagerly at a graph break (its autograd
    Function saves what its backward needs; the node would recompute the forward), so fullgraph=True
    refuses it; without fullgraph the gradients are the eager ones."""
    f, inputs = _make(CASES[0], F64)
    graphs = []
    got = _loss_and_grads(torch.compile(lambda *a: f(*a).sin().sum(), backend=_recording(graphs)), inputs)
    for g, w in zip(got, _loss_and_grads(lambda *a: f(*a).sin().sum(), inputs)):
        torch.testing.assert_close(g, w)
    assert _opforge_nodes(graphs) == []
    with pytest.raises(Exception, match="(?i)graph break|disable|skip"):
        _loss_and_grads(torch.compile(lambda *a: f(*a).sin().sum(), fullgraph=True, backend="eager"), inputs)


def test_values_are_checked_when_the_graph_runs():
    """The fake implementation checks shapes only; the values (a negative lengthscale here) are checked by
    the real one, when the compiled graph runs, with the eager op's error."""
    x = torch.rand(5, 2, dtype=F64)
    compiled = torch.compile(lambda x, ls: kernel_matvec(x, x, x[:, :1], "gaussian", ls), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        compiled(x, torch.tensor([0.5, 1.0], dtype=F64))
        with pytest.raises(ValueError, match="lengthscale must be positive"):
            compiled(x, torch.tensor([0.5, -1.0], dtype=F64))


def test_unknown_compile_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("OPFORGE_COMPILE", "fast")
    f, inputs = _make(CASES[0], F64)
    with torch.no_grad(), pytest.raises(Exception, match=r"OPFORGE_COMPILE='fast'.*valid: \['auto', 'op'\]"):
        torch.compile(f, fullgraph=True, backend="eager")(*inputs)


def _modules():
    torch.manual_seed(0)
    return [pytest.param(*m[1:], id=m[0]) for m in [
        ("SpectralConv1d", SpectralConv(3, 4, (8,)), (2, 3, 17), {0: Dim("batch"), 2: Dim("n", min=8)}),
        ("SpectralConv2d", SpectralConv(3, 4, (6, 6)), (2, 3, 16, 12),
         {0: Dim("batch"), 2: Dim("h", min=6), 3: Dim("w", min=10)}),
        ("SpectralConv3d", SpectralConv(2, 3, (4, 4, 4), resolution_scaling_factor=2), (2, 2, 8, 8, 9),
         {0: Dim("batch")}),
        ("KANLinear", KANLinear(5, 3, grid_size=4), (4, 5), {0: Dim("batch")}),
        ("KAN", KAN([5, 6, 3]), (4, 5), {0: Dim("batch")}),
        ("FastKAN", FastKAN([5, 6, 3]), (4, 5), {0: Dim("batch")}),
        ("ChebyKANLayer", ChebyKANLayer(5, 3, 4), (4, 5), {0: Dim("batch")}),
        ("FourierKANLayer", FourierKANLayer(5, 3, 4), (4, 5), {0: Dim("batch")}),
    ]]


def _strict_export_flags_its_trace() -> bool:
    """Does torch.export's strict (dynamo) capture run with the flag ``_graph_op._exporting`` reads set? Not
    in torch 2.7, which sets it for the later AOT stage only (``_exporting`` asks its dynamo translator)."""
    class Probe(torch.nn.Module):
        def forward(self, x):
            return x + 1 if torch.compiler._is_exporting_flag else x - 1

    return torch.export.export(Probe(), (torch.zeros(1),), strict=True).module()(torch.zeros(1)).item() == 1


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("module, shape, dims", _modules())
def test_export_with_a_dynamic_batch(module, shape, dims, strict):
    """torch.export of every module, its batch size (and a spectral layer's grid) left dynamic: the program
    holds the opforge nodes and gives the module's output on other sizes. Non-strict and strict (dynamo)
    capture, each torch's default in turn; the modules' parameters need a gradient, so that the capture must
    be recognised as an export (``_graph_op._exporting``), which torch 2.7's strict capture is by its dynamo
    translator, not by the flag. There the batch alone is dynamic: that dynamo guards the grid sizes above
    the minimums given here."""
    module = module.double()
    x = torch.randn(shape, dtype=F64)
    if strict and not _strict_export_flags_its_trace():
        dims = {0: dims[0]}
    program = torch.export.export(module, (x,), dynamic_shapes=(dims,), strict=strict)
    nodes = [str(n.target) for n in program.graph.nodes if str(n.target).startswith("opforge.")]
    assert nodes and all(n in {"opforge.spectral_conv.default", "opforge.kan_linear.default"} for n in nodes)
    other = [s + 3 if i in dims else s for i, s in enumerate(shape)]
    for size in (shape, other):
        xs = torch.randn(size, dtype=F64)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(xs), module(xs))


def test_opcheck():
    """torch.library's own checks of each node: schema, fake tensors, autograd registration, AOT dispatch
    with dynamic shapes."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, dtype=F64):
        return torch.randn(shape, generator=g, dtype=dtype).requires_grad_()

    knots = torch.linspace(-2.2, 2.2, 10, dtype=F64).expand(3, -1).contiguous()
    torch.library.opcheck(torch.ops.opforge.kan_linear.default,
                          (r(5, 3), r(4, 3, 6), "bspline", r(4, 3), r(4), knots, 3, None, None, None))
    for width_tensor, width in ((None, 0.8), (torch.tensor(0.8, dtype=F64), None)):
        torch.library.opcheck(torch.ops.opforge.kan_linear.default,
                              (r(2, 5, 3), r(4, 3, 5), "rbf", None, None, None, 3, torch.linspace(-2, 2, 5, dtype=F64),
                               width_tensor, width))
    torch.library.opcheck(torch.ops.opforge.kernel_matvec.default,
                          (r(6, 3), r(7, 3), r(7, 2), "matern52", r(3).exp().detach().requires_grad_(), 1.0, None, 1.5))
    torch.library.opcheck(torch.ops.opforge.spectral_conv.default,
                          (r(2, 2, 7, 6), r(2, 3, 4, 3, dtype=torch.complex128), r(3), [7, 6], 2, "forward"))
    torch.library.opcheck(torch.ops.opforge.spectral_conv.default,
                          (r(2, 2, 7, 6), r(2, 3, 4, 3, dtype=torch.complex128), r(3), [9, 5], 2, "ortho"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cuda_inductor_fullgraph(case, monkeypatch):
    """On CUDA, compiled by inductor: the node runs the dispatched Triton variant inside inductor's code,
    under CUDA graphs too (mode="reduce-overhead"), and trains with OPFORGE_COMPILE=op (float32)."""
    f, inputs = _make(case, torch.float32, "cuda")
    with torch.no_grad():
        want = f(*inputs)
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            compiled = torch.compile(f, fullgraph=True, mode=mode)
            for _ in range(3):  # CUDA graphs record on a later call than the first
                got = compiled(*inputs)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    monkeypatch.setenv("OPFORGE_COMPILE", "op")
    torch._dynamo.reset()
    got = _loss_and_grads(torch.compile(lambda *a: f(*a).sin().sum(), fullgraph=True), inputs)[1:]
    want = _loss_and_grads(lambda *a: f(*a).sin().sum(), inputs)[1:]
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 2e-4 * max(float(w.abs().max()), 1.0)


@pytest.mark.parametrize("fft_norm", ["backward", "ortho"])
def test_fft_norm_scaling_stays_inside_the_node(fft_norm, monkeypatch):
    """A resampling layer under another ``fft_norm``: the weight's scaling is done inside the one node (no
    complex op in the graph around it, which inductor cannot generate code for), inference and training."""
    monkeypatch.setenv("OPFORGE_COMPILE", "op")
    torch.manual_seed(0)
    layer = SpectralConv(3, 2, (4, 6), fft_norm=fft_norm).double()
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    graphs = []
    compiled = torch.compile(lambda x: layer(x, output_shape=(12, 10)).sin().sum(), fullgraph=True,
                             backend=_recording(graphs))
    eager = lambda x: layer(x, output_shape=(12, 10)).sin().sum()  # noqa: E731
    for got, want in zip(_loss_and_grads(compiled, (x,)), _loss_and_grads(eager, (x,))):
        torch.testing.assert_close(got, want)
    assert _opforge_nodes(graphs) == ["opforge.spectral_conv.default"]
    complex_ops = [str(n.target) for gm in graphs for n in gm.graph.nodes
                   if n.op != "placeholder" and str(n.target) != "opforge.spectral_conv.default"
                   and isinstance(n.meta.get("example_value"), torch.Tensor) and n.meta["example_value"].is_complex()]
    assert not complex_ops



_GRID = torch.linspace(-2, 2, 7).expand(3, -1).contiguous()
_BOOLEAN_CALLS = {  # (call on x [5, 3], the eager check's message)
    "spline_order": (lambda x: kan_linear(x, torch.ones(2, 3, 5), "bspline", grid=_GRID, spline_order=True),
                     "spline_order must be an int >= 0"),
    "width": (lambda x: kan_linear(x, torch.ones(2, 3, 4), "rbf", centers=torch.linspace(-1, 1, 4), width=True),
              "width must be a number, got bool"),
    "lengthscale": (lambda x: kernel_matvec(x, torch.ones(4, 3), torch.ones(4, 1), lengthscale=True),
                    "lengthscale must be a number, got bool"),
    "outputscale": (lambda x: kernel_matvec(x, torch.ones(4, 3), torch.ones(4, 1), outputscale=True),
                    "outputscale must be a number, got bool"),
}


@pytest.mark.parametrize("arg", list(_BOOLEAN_CALLS))
def test_a_boolean_is_refused_when_traced_too(arg):
    """A boolean for a number or a count under torch.compile: the graph-node paths read ``spline_order=True``
    as order 1 (``isinstance(True, int)``) and ``width``, ``lengthscale`` or ``outputscale=True`` as 1.0, and
    gave a result where the eager call raises; they now read them as the eager checks do and raise alike."""
    call, message = _BOOLEAN_CALLS[arg]
    x = torch.randn(5, 3)
    with pytest.raises((TypeError, ValueError), match=message):
        call(x)
    with torch.no_grad(), pytest.raises(Exception, match=message):
        torch.compile(call, fullgraph=True, backend="eager")(x)


_CENTERS = torch.linspace(-1, 1, 4, dtype=F64)
_KAN_W = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
_NUMPY_CALLS = {  # name -> (call on x [5, 3] and a scale s, the scale as NumPy gives it)
    "lengthscale": (lambda x, s: kernel_matvec(x, x.flip(0), x[:, :2], "matern32", lengthscale=s), np.float64(0.7)),
    "outputscale": (lambda x, s: kernel_matvec(x, x, x[:, :1], "gaussian", outputscale=s), np.float32(2.5)),
    "integer lengthscale": (lambda x, s: kernel_matvec(x, x, x[:, :1], "imq", lengthscale=s), np.int64(2)),
    "width": (lambda x, s: kan_linear(x, _KAN_W, "rbf", centers=_CENTERS, width=s), np.float64(0.6)),
}


@pytest.mark.parametrize("name", list(_NUMPY_CALLS))
def test_numpy_scalars_trace_into_the_graph_node(name, monkeypatch):
    """A NumPy scalar lengthscale, outputscale or width (what np.median gives) under torch.compile: dynamo
    traces it as a 0-d array, which the graph-node paths did not take (``fullgraph=True`` failed: "torch.*
    op returned non-Tensor", "RuntimeError when making fake tensor call"). It joins the node as a 0-d
    tensor now, inference and training (OPFORGE_COMPILE=op) alike, with the eager call's results, for
    every value it takes."""
    call, scale = _NUMPY_CALLS[name]
    x = torch.rand(5, 3, dtype=F64)
    graphs = []
    compiled = torch.compile(call, fullgraph=True, backend=_recording(graphs))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, scale), call(x, scale))
        for k in (2, 3):
            torch.testing.assert_close(compiled(x, scale * k), call(x, scale * k))
    # the node in each graph: dynamo's automatic dynamic may compile once more when the value first changes
    nodes = _opforge_nodes(graphs)
    op = "kan_linear" if name == "width" else "kernel_matvec"
    assert 1 <= len(nodes) <= 2 and set(nodes) == {f"opforge.{op}.default"}
    monkeypatch.setenv("OPFORGE_COMPILE", "op")
    torch._dynamo.reset()
    loss = torch.compile(lambda x: call(x, scale).sin().sum(), fullgraph=True, backend="aot_eager")
    for got, want in zip(_loss_and_grads(loss, (x,)), _loss_and_grads(lambda x: call(x, scale).sin().sum(), (x,))):
        torch.testing.assert_close(got, want)


def test_numpy_scalars_are_checked_as_eagerly():
    """A NumPy boolean or a non-positive value is refused when the compiled graph runs, as eagerly."""
    x = torch.rand(5, 3, dtype=F64)
    with torch.no_grad():
        with pytest.raises(Exception, match="lengthscale must be"):
            torch.compile(_NUMPY_CALLS["lengthscale"][0], fullgraph=True, backend="eager")(x, np.bool_(True))
        with pytest.raises(ValueError, match="lengthscale must be positive"):
            torch.compile(_NUMPY_CALLS["lengthscale"][0], fullgraph=True, backend="eager")(x, np.float64(-1.0))
        with pytest.raises(ValueError, match="width must be positive"):
            torch.compile(_NUMPY_CALLS["width"][0], fullgraph=True, backend="eager")(x, np.float64(0.0))


def test_a_cpu_tensor_width_joins_the_graph_node(monkeypatch):
    """A CPU tensor RBF width is a node input (read on the host, no sync): inference in one node, and with
    OPFORGE_COMPILE=op a width that requires grad gets the eager call's gradient (the plain math, which
    warns, in the node's recomputing backward)."""
    x = torch.rand(5, 3, dtype=F64)
    call = _NUMPY_CALLS["width"][0]
    width = torch.tensor(0.6, dtype=F64)
    graphs = []
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(call, fullgraph=True, backend=_recording(graphs))(x, width),
                                   call(x, width))
    assert _opforge_nodes(graphs) == ["opforge.kan_linear.default"]
    monkeypatch.setenv("OPFORGE_COMPILE", "op")
    torch._dynamo.reset()
    loss = lambda x, w: call(x, w).sin().sum()  # noqa: E731
    with pytest.warns(RuntimeWarning, match="width requires grad"):
        got = _loss_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager"), (x, width))
        want = _loss_and_grads(loss, (x, width))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
