"""KAN layers: NumPy reference vs the torch variant vs the fused Triton variant (interpreter) for all four
bases, forward and backward, odd sizes, inputs outside the grid, non-uniform knots, modules and bad input."""
import dataclasses

import numpy as np
import pytest
import torch

from opforge.kernels import (BASES, KAN, ChebyKANLayer, FastKAN, FastKANLayer, FourierKANLayer, KANLinear, get_op,
                             interpreter_enabled, kan_linear, use_backend)
from opforge.reference import assert_close, assert_rounded_once
from opforge.reference import kan as ref

OP = get_op("kan")
SMALL = [c for c in OP.cases if "small" in c.tags]


def npf(t):
    return None if t is None else t.detach().double().numpy()


def check(variant, case, dtype=torch.float32, config=None):
    p, (x, w, wb, bias, b) = OP.make_inputs(case, "cpu", dtype, requires_grad=True, seed=3)
    basis_args = dict(grid=npf(b.grid), order=b.order, centers=npf(b.centers), width=b.width, degree=p.k - 1,
                      grid_size=b.grid_size)
    g = torch.randn(p.rows, p.cout, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = OP.run_variant(variant, p, x, w, wb, bias, b, config=config)
    assert y.shape == (p.rows, p.cout) and y.dtype == dtype
    red = OP.reduction(p)
    assert_close(y, ref.kan_linear(npf(x), npf(w), p.basis, npf(wb), npf(bias), **basis_args), dtype, red, "forward")
    (y * g.to(dtype)).sum().backward()
    dx, dw, dwb = ref.kan_linear_vjp(npf(x), npf(w), p.basis, g.numpy(), npf(wb), **basis_args)
    assert_close(x.grad, dx, dtype, p.cout * p.k, f"{variant} grad x")
    assert_close(w.grad, dw, dtype, p.rows, f"{variant} grad weight")
    if wb is not None:
        assert_close(wb.grad, dwb, dtype, p.rows, f"{variant} grad base_weight")
    if bias is not None:
        assert_close(bias.grad, g.sum(0).numpy(), dtype, p.rows, f"{variant} grad bias")


@pytest.mark.parametrize("variant", ["torch", "fused", "staged"])
@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_variants_match_reference(variant, case):
    check(variant, case)


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_torch_variant_row_blocks(case, monkeypatch):
    """The torch variant's layers of more rows than one block (kan._block_rows; 4 MB of basis per block in
    use): several blocks and a ragged last one, forward and every gradient, bases not kept from the forward."""
    from opforge.kernels import kan as kan_mod

    monkeypatch.setattr(kan_mod, "_block_rows", lambda cin, K: 4)  # 13 or 9 rows: 4 + 4 + 4 + 1, 4 + 4 + 1
    monkeypatch.setattr(kan_mod, "_KEEP_BASIS_MAX", 0)
    check("torch", case)


@pytest.mark.parametrize("per_k", [True, False])
@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_fused_both_grad_w_kernels(case, per_k, monkeypatch):
    """grad W per basis function (dy^T phi_k) and on the [rows, in-block x K] basis tile: which one runs
    depends on the basis and the row tile (kan._dw_per_k); here every basis goes through both."""
    from opforge.kernels import kan as kan_mod

    monkeypatch.setattr(kan_mod, "_dw_per_k", lambda p, cfg: per_k)
    p, _ = OP.make_inputs(case, "cpu", torch.float32)
    check("fused", case, config=dict(OP.variants["fused"].default_config(p), BLOCK_IF=16))


@pytest.mark.parametrize("bi", [1, 2])
@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_fused_grad_x_feature_blocks(case, bi):
    """Grad x takes BLOCK_I * KP // K whole features per program on unpadded (i, k) columns: narrow tiles
    here, so every basis runs several feature blocks, the last one ragged (7 input features)."""
    p, _ = OP.make_inputs(case, "cpu", torch.float32)
    check("fused", case, config=dict(OP.variants["fused"].default_config(p), BLOCK_I=bi))


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_non_finite_inputs_stay_in_their_feature(case):
    """A NaN or infinite x is NaN (or what its formula gives) in its own output gradient only: the fused
    grad x sums a feature's columns by a 0/1 matrix, where a NaN column used to spread NaN * 0 over every
    feature of the row's block. Forward and every gradient agree with the torch variant, NaNs included."""
    p, (x, w, wb, bias, b) = OP.make_inputs(case, "cpu", torch.float32, seed=5)
    x = x.detach().clone()
    x[1, 2], x[2, 0], x[2, 5] = float("nan"), float("inf"), -float("inf")
    g = torch.randn(p.rows, p.cout, generator=torch.Generator().manual_seed(6))
    got = {}
    for variant in ("torch", "fused", "staged"):
        ins = [t if t is None else t.detach().clone().requires_grad_() for t in (x, w, wb, bias)]
        y = OP.run_variant(variant, p, *ins, b)
        grads = torch.autograd.grad((y * g).nansum(), [t for t in ins if t is not None], allow_unused=True)
        got[variant] = [y, *grads]
    for variant in ("fused", "staged"):
        for name, a, want in zip(["y", "x", "w", "wb", "bias"], got[variant], got["torch"]):
            if name == "x":  # finite rows keep every feature finite
                assert torch.isfinite(a[0]).all() and torch.isfinite(a[3:]).all()
            torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-4, equal_nan=True,
                                       msg=f"{variant} {case.name} {name}")


def test_grad_w_kernel_choice():
    p, _ = OP.make_inputs(SMALL[0], "cpu", torch.float32)
    from opforge.kernels import kan as kan_mod

    def per_k(basis, bb):
        return kan_mod._dw_per_k(dataclasses.replace(p, basis=basis), {"BLOCK_B": bb})

    assert per_k("chebyshev", 64) and per_k("bspline", 32) and not per_k("bspline", 64)
    assert not per_k("rbf", 32) and not per_k("fourier", 32)


@pytest.mark.parametrize("per_k", [True, False], ids=["dw-per-k", "dw-tile"])
@pytest.mark.parametrize("case", [c for c in SMALL if c.params["basis"] == "bspline"],
                         ids=lambda c: c.name)
def test_fused_in_kernel_base_path(case, per_k, monkeypatch):
    """The base path inside the kernels (off by default: wrong compiled on an H100, see kernels/kan.py),
    its weight's gradient summed by either grad-W kernel (the tile one also with 16-feature blocks, where
    it takes a dot product rather than a sum)."""
    from opforge.kernels import kan as kan_mod

    monkeypatch.setenv("OPFORGE_KAN_FUSED_BASE", "1")
    monkeypatch.setattr(kan_mod, "_dw_per_k", lambda p, cfg: per_k)
    check("fused", case)
    if not per_k:
        p, _ = OP.make_inputs(case, "cpu", torch.float32)
        check("fused", case, config=dict(OP.variants["fused"].default_config(p), BLOCK_I=16))


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_torch_float64(case):
    check("torch", case, torch.float64)


def test_reference_bspline_is_a_partition_of_unity_and_matches_finite_differences():
    grid = (np.arange(-3, 5 + 3 + 1) * 0.4 - 1.0)[None].repeat(2, 0)
    x = np.random.default_rng(0).uniform(-0.99, 0.99, (50, 2))
    B = ref.bspline_basis(x, grid, 3)
    np.testing.assert_allclose(B.sum(-1), 1.0, atol=1e-12)  # inside [t_p, t_{G+p}) the bases sum to one
    eps = 1e-6
    fd = (ref.bspline_basis(x + eps, grid, 3) - ref.bspline_basis(x - eps, grid, 3)) / (2 * eps)
    np.testing.assert_allclose(ref.bspline_basis(x, grid, 3, derivative=True), fd, atol=1e-6)
    for kind, kw in (("rbf", dict(centers=np.linspace(-2, 2, 5), width=1.0)), ("chebyshev", dict(degree=5)),
                     ("fourier", dict(grid_size=4))):
        d = ref.basis(x, kind, True, **kw)
        fd = (ref.basis(x + eps, kind, **kw) - ref.basis(x - eps, kind, **kw)) / (2 * eps)
        np.testing.assert_allclose(d, fd, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonuniform_knots_and_inputs_outside(backend):
    torch.manual_seed(0)
    I, O, G, k = 7, 5, 3, 3
    base = torch.sort(torch.rand(I, G + 2 * k + 1) * 4 - 2, dim=1).values
    grid = base + torch.arange(G + 2 * k + 1) * 1e-2  # strictly increasing, not uniform
    w = torch.randn(O, I, G + k, requires_grad=True)
    x = (torch.randn(19, I) * 2).requires_grad_(True)  # many points outside the knots
    with use_backend(backend):
        y = kan_linear(x, w, "bspline", grid=grid, spline_order=k)
    want = ref.kan_linear(npf(x), npf(w), "bspline", grid=npf(grid), order=k)
    assert_close(y, want, torch.float32, I * (G + k))
    y.sum().backward()
    dx, dw, _ = ref.kan_linear_vjp(npf(x), npf(w), "bspline", np.ones((19, O)), grid=npf(grid), order=k)
    assert_close(x.grad, dx, torch.float32, O * (G + k))
    assert_close(w.grad, dw, torch.float32, 19)


@pytest.mark.parametrize("I, K, bi, kp", [(16, 8, 4, 8), (13, 8, 4, 8), (16, 11, 4, 16), (7, 3, 8, 4), (8, 1, 16, 2)])
def test_blocked_weight_layout(I, K, bi, kp):
    """grad x's weight layout [O, feature blocks, BLOCK_C] (features of a block, (i, k) contiguous, zeros
    after them): a copy where padding is needed, W's own memory (a view) where it is not."""
    from opforge.kernels.kan import _blocked_weight

    w = torch.randn(5, I, K)
    bc = bi * kp
    fpb = bc // K
    got = _blocked_weight(w, fpb, bc)
    nb = -(-I // fpb)
    want = torch.zeros(5, nb, bc)
    for i in range(I):
        want[:, i // fpb, (i % fpb) * K:(i % fpb + 1) * K] = w[:, i]
    assert torch.equal(got, want)
    assert (got.data_ptr() == w.data_ptr()) == (fpb * K == bc and nb * fpb == I)


@pytest.mark.parametrize("graph", [False, True], ids=["no-graph", "graph"])
@pytest.mark.parametrize("full", [False, "binary", True], ids=["local", "local-binary-search", "full"])
@pytest.mark.parametrize("order", [0, 1, 2, 3, 5])
def test_torch_bspline_bases_and_derivatives_match_reference(order, full, graph, monkeypatch):
    """The torch variant's two forms -- local de Boor (interval by counting the knots below x, or by binary
    search past _COUNT_KNOTS knots; order + 1 bases, scattered) and the recursion over all knots (small
    inputs) -- against the reference, float64: x on every knot, between them and outside; with x requiring
    grad (the differentiable scatter) and not (bases put in place)."""
    from opforge.kernels import kan

    if full == "binary":
        monkeypatch.setattr(kan, "_COUNT_KNOTS", 0)
        full = False
    with torch.set_grad_enabled(graph):
        _bspline_bases_match_reference(order, full, graph)


def _bspline_bases_match_reference(order, full, graph=False):
    from opforge.kernels.kan import _bspline_both

    gen = torch.Generator().manual_seed(order)
    I, G = 4, 3
    grid = torch.sort(torch.rand(I, G + 2 * order + 1, generator=gen, dtype=torch.float64) * 4 - 2, dim=1).values
    grid = grid + torch.arange(G + 2 * order + 1) * 1e-2  # strictly increasing, not uniform
    x = torch.cat([grid.t(), torch.rand(40, I, generator=gen, dtype=torch.float64) * 6 - 3,
                   torch.full((1, I), float("inf")), torch.full((1, I), -float("inf"))]).requires_grad_(graph)
    phi, dphi = _bspline_both(x, grid, order, value=True, derivative=True, full=full)
    assert phi.shape == dphi.shape == (x.shape[0], I, G + order)
    assert _bspline_both(x, grid, order, value=False, derivative=True, full=full)[0] is None
    torch.testing.assert_close(_bspline_both(x, grid, order, full=full)[0], phi)
    nan = _bspline_both(torch.full((1, I), float("nan"), dtype=torch.float64), grid, order, derivative=True, full=full)
    assert (nan[0] == 0).all() and (nan[1] == 0).all()  # NaN lies in no interval: every basis and slope is 0
    assert phi.requires_grad == (graph and order > 0)  # with x requiring grad, differentiable (order 0: constant)
    phi, dphi, finite = phi.detach(), dphi.detach(), x[:-2].detach().numpy()
    np.testing.assert_allclose(phi[:-2].numpy(), ref.bspline_basis(finite, grid.numpy(), order), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dphi[:-2].numpy(), ref.bspline_basis(finite, grid.numpy(), order, derivative=True),
                               rtol=0, atol=1e-9)
    assert (phi[-2:] == 0).all() and (dphi[-2:] == 0).all()  # +-inf lie outside every knot interval


def test_torch_bspline_form_choice_follows_graph_and_grid(monkeypatch):
    """The default form: the full recursion for 8192 values at G = 5, order 3 (ratio 2.75) without a graph,
    the local form when a graph is recorded (its backward is the dearer one there) or at G = 12 (ratio 4.5);
    each choice gives the other form's values."""
    from opforge.kernels import kan

    calls = []
    full = kan._bspline_full
    monkeypatch.setattr(kan, "_bspline_full", lambda *a, **k: calls.append(1) or full(*a, **k))

    def form(G, graph):
        grid = (torch.arange(-3, G + 4, dtype=torch.float32) * (2.0 / G) - 1).expand(8, -1)
        x = (torch.rand(1024, 8) * 2.2 - 1.1).requires_grad_(graph)
        calls.clear()
        with torch.set_grad_enabled(graph):
            got = kan._bspline_both(x, grid, 3, derivative=True)
        took = "full" if calls else "local"
        want = kan._bspline_both(x.detach(), grid, 3, derivative=True, full=took == "local")
        torch.testing.assert_close(got, want)
        return took

    assert form(5, graph=False) == "full"
    assert form(5, graph=True) == "local"
    assert form(12, graph=False) == "local"


def test_torch_bspline_cardinal_form_where_it_measured_faster(monkeypatch):
    """Evenly spaced knots, no graph: the cardinal form at orders 2-5 up to 12 bases per input (G = 5 and 8 at
    order 3, every size), not at G = 12 (15 bases), order 6, with a graph, or knots not known to be even; the
    layer's forward and backward give the same as the local form's."""
    from opforge.kernels import KANLinear, kan

    calls = []
    card = kan._bspline_cardinal
    monkeypatch.setattr(kan, "_bspline_cardinal", lambda *a, **k: calls.append(1) or card(*a, **k))

    def took(G, order, rows=64, graph=False, even=True):
        grid = (torch.arange(-order, G + order + 1, dtype=torch.float32) * (2.0 / G) - 1).expand(8, -1)
        x = (torch.rand(rows, 8) * 2.2 - 1.1).requires_grad_(graph)
        calls.clear()
        with torch.set_grad_enabled(graph):
            kan._bspline_both(x, grid, order, derivative=True, even=even)
        return bool(calls)

    assert took(5, 3) and took(8, 3) and took(5, 3, rows=20000) and took(5, 2) and took(5, 5)
    assert not took(12, 3) and not took(5, 6) and not took(5, 1)
    assert not took(5, 3, graph=True) and not took(5, 3, even=False)

    torch.manual_seed(0)
    layer = KANLinear(6, 5, grid_size=5)
    x = torch.rand(300, 6) * 2.4 - 1.2
    outs = []
    for cardinal in (True, False):
        monkeypatch.setattr(kan, "_CARDINAL_MAX_BASES", 12 if cardinal else 0)
        calls.clear()
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.square().sum().backward()
        assert bool(calls) == cardinal
        outs.append((y.detach(), xg.grad, layer.spline_weight.grad.clone()))
        layer.zero_grad()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cardinal", [False, True], ids=["local", "cardinal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_torch_bspline_even_knots_by_arithmetic(order, dtype, cardinal):
    """Evenly spaced knots, no graph: the local form finds each interval as floor((x - t_0) / h), no search,
    or the cardinal form evaluates every basis as M_p((x - t_0) / h - m); either gives the search's bases and
    slopes (x on every knot, between them, outside, NaN and +-inf); with a graph recorded the flag is ignored."""
    from opforge.kernels import kan

    I, G = 3, 6
    grid = (torch.arange(-order, G + order + 1, dtype=dtype) * 0.3 - 0.9).expand(I, -1).contiguous()
    gen = torch.Generator().manual_seed(order)
    x = torch.cat([grid.t(), (torch.rand(200, I, generator=gen, dtype=torch.float64) * 6 - 3).to(dtype),
                   torch.tensor([[float("nan"), float("inf"), -float("inf")]], dtype=dtype)])
    searches, fulls = [], []
    real, full = torch.searchsorted, kan._bspline_full
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "searchsorted", lambda *a, **k: searches.append(1) or real(*a, **k))
        mp.setattr(kan, "_bspline_full", lambda *a, **k: fulls.append(1) or full(*a, **k))
        mp.setattr(kan, "_COUNT_KNOTS", 0)  # the search form by torch.searchsorted, which the spy sees
        with torch.no_grad():
            got = kan._bspline_both(x, grid, order, derivative=True, full=False, even=True, cardinal=cardinal)
            assert not searches and not fulls
            kan._bspline_both(x.repeat(100, 1), grid, order, even=True)  # the default form past 2^16 values (n x in x knots)
            assert not searches and not fulls
        want = kan._bspline_both(x, grid, order, derivative=True, full=False)
        assert searches
    tol = dict(rtol=0, atol=1e-12 if dtype == torch.float64 else 2e-6)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **{**tol, "atol": tol["atol"] * 10 / 0.3})
    assert (got[0][-1] == 0).all() and (got[1][-1] == 0).all()  # NaN and +-inf lie in no interval
    xg = x[:-1].clone().requires_grad_(True)
    phi = kan._bspline_both(xg, grid, order, even=True)[0]  # a graph: the differentiable search form
    assert phi.requires_grad
    torch.testing.assert_close(phi.detach(), want[0][:-1], **tol)


def test_knot_spacing_levels():
    """How evenly knots are spaced, as dispatch reads it: float64 arange knots to float64's precision,
    efficient-kan's float32 knots (and those cast to float64) to float32's, knots moved by data not at all."""
    from opforge.kernels.kan import _validate_knots

    def knots(dtype, G=5, p=3, lo=-1.0, hi=1.0):
        return (torch.arange(-p, G + p + 1, dtype=dtype) * ((hi - lo) / G) + lo).expand(4, -1)

    assert _validate_knots(knots(torch.float64)) == 2
    assert _validate_knots(knots(torch.float64, G=1000, lo=-50.0, hi=70.0)) == 2
    assert _validate_knots(knots(torch.float32)) >= 1
    assert _validate_knots(knots(torch.float32, G=32)) >= 1
    assert _validate_knots(knots(torch.float32, G=7, lo=0.1, hi=0.3).double()) >= 1
    moved = knots(torch.float64).clone()
    moved[:, 4] += 1e-3
    assert _validate_knots(moved) == 0
    layer = KANLinear(4, 2, grid_size=5)
    layer.update_grid(torch.randn(64, 4) ** 3)
    assert _validate_knots(layer.grid) == 0


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uniform_knots_every_order(backend, order):
    """Uniform knots take the closed-form cardinal-B-spline path in the fused kernel (order >= 1)."""
    torch.manual_seed(order)
    I, O, G = 5, 3, 4
    h = 0.4
    grid = (torch.arange(-order, G + order + 1) * h - 0.8).repeat(I, 1)  # efficient-kan's extended knots
    w = torch.randn(O, I, G + order, requires_grad=True)
    x = (torch.rand(23, I) * 3.2 - 1.6).requires_grad_(True)  # inside and outside the knots
    with use_backend(backend):
        y = kan_linear(x, w, "bspline", grid=grid, spline_order=order)
    want = ref.kan_linear(npf(x), npf(w), "bspline", grid=npf(grid), order=order)
    assert_close(y, want, torch.float32, I * (G + order), f"order {order} forward")
    y.sum().backward()
    dx, dw, _ = ref.kan_linear_vjp(npf(x), npf(w), "bspline", np.ones((23, O)), grid=npf(grid), order=order)
    assert_close(x.grad, dx, torch.float32, O * (G + order), f"order {order} grad x")
    assert_close(w.grad, dw, torch.float32, 23, f"order {order} grad weight")


@pytest.mark.parametrize("per_k", [True, False], ids=["dw-per-k", "dw-tile"])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "nonuniform"])
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_fused_bspline_every_order_knots_and_grad_w_kernel(order, uniform, per_k, monkeypatch):
    """The fused kernels' B-spline forms at every order they take: cardinal polynomials on uniform knots,
    the search and local de Boor triangle (values and derivatives) on others, in the forward, grad x and
    both grad W kernels (the tile one evaluates the whole basis tile); inputs inside and outside."""
    from opforge.kernels import kan as kan_mod

    monkeypatch.setattr(kan_mod, "_dw_per_k", lambda p, cfg: per_k)
    torch.manual_seed(10 * order + uniform)
    I, O, G, B = 5, 3, 3, 17
    n = G + 2 * order + 1
    if uniform:
        grid = (torch.arange(-order, G + order + 1) * 0.5 - 0.75).repeat(I, 1)
    else:
        grid = torch.sort(torch.rand(I, n) * 3 - 1.5, dim=1).values + torch.arange(n) * 2e-2
    w = torch.randn(O, I, G + order, requires_grad=True)
    x = (torch.rand(B, I) * 4 - 2).requires_grad_(True)
    g = torch.randn(B, O, dtype=torch.float64)
    with use_backend("triton"):
        y = kan_linear(x, w, "bspline", grid=grid, spline_order=order)
        (y * g.float()).sum().backward()
    args = dict(grid=npf(grid), order=order)
    assert_close(y, ref.kan_linear(npf(x), npf(w), "bspline", **args), torch.float32, I * (G + order), "forward")
    dx, dw, _ = ref.kan_linear_vjp(npf(x), npf(w), "bspline", g.numpy(), **args)
    assert_close(x.grad, dx, torch.float32, O * (G + order), "grad x")
    assert_close(w.grad, dw, torch.float32, B, "grad weight")


def test_fused_bfloat16_and_leading_dims():
    layer = KANLinear(6, 4, grid_size=4)
    x = torch.rand(2, 5, 6) * 2 - 1
    with use_backend("torch"):
        want = layer(x)
    with use_backend("triton"):
        got = layer(x)
        got16 = layer(x.bfloat16())
    assert got.shape == (2, 5, 4) and got16.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_close(got16.float(), want.double(), torch.bfloat16, 6 * 8)


@pytest.mark.parametrize("variant", ["torch", "fused", "staged"])
def test_16bit_results_are_rounded_once(variant):
    """float16 data with the SiLU base path: the output and grad x each within one rounding (2^-11, half a
    float16 step) of their float64 values on the same float16 inputs (plus float32's own error), so no 16-bit
    intermediate. The fused variant added the base path to its float16 output and summed the two float16
    grad x's, two and three roundings (1.5 steps off, seen). float16, not bfloat16: the interpreter rounds
    float32 -> float16 to nearest, as the GPU does, but truncates float32 -> bfloat16."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 11, generator=gen) * 1.5).half()
    w = (torch.randn(9, 11, 6, generator=gen) * 0.5).half()
    wb = torch.randn(9, 11, generator=gen).half()
    g = torch.randn(37, 9, generator=gen).half()
    kw = dict(base_weight=wb, centers=torch.linspace(-2, 2, 6), width=0.8)

    def run(dtype, backend, **pin):
        xs, ws, wbs = (t.to(dtype).requires_grad_() for t in (x, w, kw["base_weight"]))
        with use_backend(backend, **pin):
            y = kan_linear(xs, ws, "rbf", **dict(kw, base_weight=wbs))
        return [y, *torch.autograd.grad(y, (xs, ws, wbs), g.to(dtype))]

    want = run(torch.float64, "torch")
    got = run(torch.float16, "torch") if variant == "torch" else run(torch.float16, "triton", kan=variant)
    for name, a, e in zip(("out", "grad x", "grad weight", "grad base_weight"), got, want):
        assert a.dtype == torch.float16
        assert_rounded_once(a, e, 1e-5, f"{variant} {name}")


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f64", ["weight", "base_weight", "bias"])
def test_float64_weights_compute_in_float64(f64, xdtype):
    """A float64 layer given lower-precision x (nn.Linear raises on the mix): computed in float64, as on
    float64 x, and rounded once to x's dtype (it used to run in float32, the float64 weights' precision
    dropped); each gradient in its own input's dtype."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(7, 5, generator=gen) * 2 - 1).to(xdtype)
    ts = {"weight": torch.randn(3, 5, 8, generator=gen), "base_weight": torch.randn(3, 5, generator=gen),
          "bias": torch.randn(3, generator=gen)}
    grid = torch.linspace(-1.3, 1.3, 12, dtype=torch.float64).expand(5, 12).contiguous()
    g = torch.randn(7, 3, generator=gen).to(xdtype)

    def run(xin, **dt):
        xs = xin.detach().requires_grad_()
        w = {k: v.to(dt.get(k, torch.float32)).requires_grad_() for k, v in ts.items()}
        y = kan_linear(xs, w["weight"], base_weight=w["base_weight"], bias=w["bias"], grid=grid)
        grads = torch.autograd.grad(y, [xs, *w.values()], g.to(y.dtype))
        return y, grads

    y, grads = run(x, **{f64: torch.float64})
    want, want_grads = run(x.double(), **{f64: torch.float64})
    assert y.dtype == xdtype and torch.equal(y, want.to(xdtype))
    for name, a, e in zip(("x", *ts), grads, want_grads):
        assert a.dtype == (xdtype if name == "x" else torch.float64 if name == f64 else torch.float32), name
        assert torch.equal(a, e.to(a.dtype)), name


def test_kanlinear_loads_efficient_kan_state_dict_and_update_grid():
    torch.manual_seed(0)
    layer = KANLinear(5, 3, grid_size=5, spline_order=3)
    names = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert names == {"grid": (5, 12), "base_weight": (3, 5), "spline_weight": (3, 5, 8), "spline_scaler": (3, 5)}
    sd = {"grid": layer.grid.clone(), "base_weight": torch.randn(3, 5), "spline_weight": torch.randn(3, 5, 8),
          "spline_scaler": torch.rand(3, 5) + 0.5}
    layer.load_state_dict(sd)
    x = torch.rand(64, 5) * 1.6 - 0.8
    silu = x / (1 + torch.exp(-x))
    basis = torch.from_numpy(ref.bspline_basis(x.double().numpy(), sd["grid"].double().numpy(), 3))
    want = silu.double() @ sd["base_weight"].double().T + torch.einsum(
        "bik,oik->bo", basis, (sd["spline_weight"] * sd["spline_scaler"][..., None]).double())
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    before = layer(x)
    layer.update_grid(x)
    assert not torch.allclose(layer.grid, sd["grid"])  # knots moved to the data: non-uniform now
    after_t = layer(x)
    with use_backend("triton"):
        after_f = layer(x)
    torch.testing.assert_close(after_f, after_t, rtol=1e-4, atol=1e-4)
    assert (after_t - before).abs().max() < 0.1 * before.abs().max()  # the refit keeps the function
    assert torch.isfinite(layer.regularization_loss())
    # a zero spline_scaler (a pruned edge) keeps its weight through an update: no inf / NaN in the output
    with torch.no_grad():
        layer.spline_scaler[1, 2] = 0.0
    before = layer(x)
    layer.update_grid(x * 0.9)
    assert torch.isfinite(layer.spline_weight).all() and torch.isfinite(layer(x)).all()
    assert (layer(x) - before).abs().max() < 0.1 * before.abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kanlinear_other_base_activation_and_no_standalone_scaler(backend):
    """efficient-kan's options off their defaults: a base activation other than SiLU (its linear term added
    beside the op, which fuses only SiLU) and enable_standalone_scale_spline=False (no spline_scaler;
    spline_weight used as it is, initialised times scale_spline); then update_grid keeps the function."""
    torch.manual_seed(0)
    dtype = torch.float64 if backend == "torch" else torch.float32
    layer = KANLinear(5, 3, grid_size=4, spline_order=2, base_activation=torch.nn.GELU,
                      enable_standalone_scale_spline=False).to(dtype)
    assert set(layer.state_dict()) == {"grid", "base_weight", "spline_weight"}
    assert layer.scaled_spline_weight is layer.spline_weight
    x = (torch.rand(17, 5, dtype=dtype) * 2.4 - 1.2).requires_grad_()
    g = torch.randn(17, 3, dtype=dtype)
    with use_backend(backend):
        y = layer(x)
        grads = torch.autograd.grad((y * g).sum(), (x, layer.base_weight, layer.spline_weight))
    x64, w64, wb64 = (t.detach().double() for t in (x, layer.spline_weight, layer.base_weight))
    basis = torch.from_numpy(ref.bspline_basis(x64.numpy(), layer.grid.double().numpy(), 2))
    dbasis = torch.from_numpy(ref.bspline_basis(x64.numpy(), layer.grid.double().numpy(), 2, derivative=True))
    gelu = torch.nn.functional.gelu
    assert_close(y, (gelu(x64) @ wb64.T + torch.einsum("bik,oik->bo", basis, w64)).numpy(), dtype, 5 * 6, "forward")
    xr = x64.clone().requires_grad_()
    dgelu, = torch.autograd.grad(gelu(xr).sum(), xr)
    g64 = g.double()
    want = (dgelu * (g64 @ wb64) + torch.einsum("bo,oik,bik->bi", g64, w64, dbasis),
            g64.T @ gelu(x64), torch.einsum("bo,bik->oik", g64, basis))
    for got, exp, name, red in zip(grads, want, ("x", "base_weight", "spline_weight"), (3 * 6, 17, 17)):
        assert_close(got, exp.numpy(), dtype, red, f"grad {name}")
    with torch.no_grad(), use_backend(backend):
        before = layer(x)
        layer.update_grid(x)
        assert (layer(x) - before).abs().max() < 0.1 * before.abs().max()


def test_fastkan_radial_basis_submodule_and_fourier_repr():
    """FastKAN's ``rbf`` submodule called on its own gives its bases (the layer never calls it: fused), and
    FourierKANLayer reprs as the peer's layer does."""
    fk = FastKANLayer(4, 2, grid_min=-1.5, grid_max=2.5, num_grids=6)
    x = torch.randn(3, 4)
    c = torch.linspace(-1.5, 2.5, 6)
    torch.testing.assert_close(fk.rbf(x), torch.exp(-(((x[..., None] - c) / 0.8) ** 2)))
    fo = FourierKANLayer(3, 2, gridsize=4, addbias=False)
    assert repr(fo) == "FourierKANLayer(inputdim=3, outdim=2, gridsize=4, addbias=False)"
    assert fo(torch.randn(5, 3)).shape == (5, 2)


def test_fastkan_chebykan_fourierkan_modules():
    torch.manual_seed(0)
    x = torch.randn(9, 6)
    fk = FastKANLayer(6, 4, num_grids=5)
    assert {"layernorm.weight", "layernorm.bias", "rbf.grid", "spline_linear.weight", "base_linear.weight",
            "base_linear.bias"} == set(fk.state_dict())
    xn = torch.nn.functional.layer_norm(x, (6,), fk.layernorm.weight, fk.layernorm.bias)
    phi = torch.exp(-((xn[..., None] - fk.rbf.grid) / fk.rbf.denominator) ** 2)
    want = phi.reshape(9, -1) @ fk.spline_linear.weight.T + fk.base_linear(torch.nn.functional.silu(x))
    torch.testing.assert_close(fk(x), want, rtol=1e-5, atol=1e-5)
    ck = ChebyKANLayer(6, 4, degree=4)
    assert set(ck.state_dict()) == {"cheby_coeffs", "arange"}
    assert repr(ck) == "ChebyKANLayer(input_dim=6, output_dim=4, degree=4)"
    assert "RadialBasisFunction(num_grids=5" in repr(fk)
    t = torch.tanh(x)[..., None]
    want = torch.einsum("bid,iod->bo", torch.cos(torch.arange(5) * torch.acos(t)), ck.cheby_coeffs)
    torch.testing.assert_close(ck(x), want, rtol=1e-5, atol=1e-5)
    fo = FourierKANLayer(6, 4, gridsize=3)
    fo.bias.data.normal_()
    k = torch.arange(1, 4)
    c, s = torch.cos(k * x[..., None]), torch.sin(k * x[..., None])
    want = (torch.einsum("bik,oik->bo", c, fo.fouriercoeffs[0]) + torch.einsum("bik,oik->bo", s, fo.fouriercoeffs[1])
            + fo.bias)
    torch.testing.assert_close(fo(x), want, rtol=1e-5, atol=1e-5)
    for layer in (fk, ck, fo):
        with use_backend("torch"):
            on_torch = layer(x)
        with use_backend("triton"):
            torch.testing.assert_close(layer(x), on_torch, rtol=1e-4, atol=1e-5)
        layer(x).square().sum().backward()
        assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("spread", [1.3, 0.01])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_grid_on_a_16_bit_layer(dtype, spread):
    """sort and lstsq take no 16-bit dtypes: the refit runs in float32 and stores the coefficients in the
    layer's dtype. The knots stay float32 under the cast: fitted to data clustered near 1 (spread 0.01)
    they would round onto each other in bfloat16 (and lstsq failed on the NaN bases)."""
    torch.manual_seed(3)
    layer = KANLinear(4, 3, grid_size=5).to(dtype)
    assert layer.grid.dtype == torch.float32 and layer.spline_weight.dtype == dtype
    x = (torch.randn(128, 4) * spread + (1.0 if spread < 1 else 0.0)).to(dtype)
    before = layer(x).float()
    layer.update_grid(x)
    assert layer.grid.dtype == torch.float32 and layer.spline_weight.dtype == dtype
    after = layer(x).float()
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() < 0.05 * before.abs().max()  # the refit keeps the function
    assert layer.double().grid.dtype == torch.float64 and layer.half().grid.dtype == torch.float32


@pytest.mark.parametrize("order", [0, 1, 2, 5])
def test_kanlinear_builds_and_refits_at_every_order(order):
    """Order 0 (piecewise constant) is an order too: efficient-kan's initial fit sliced the knots [p:-p], which
    is empty for p = 0, and the constructor failed in least squares. The layer matches the reference."""
    torch.manual_seed(order)
    layer = KANLinear(4, 3, grid_size=3, spline_order=order)
    x = torch.rand(50, 4) * 2 - 1
    y = layer(x)
    w = layer.scaled_spline_weight.detach()
    want = ref.kan_linear(npf(x), npf(w), "bspline", npf(layer.base_weight.detach()), grid=npf(layer.grid),
                          order=order)
    assert_close(y.detach(), want, torch.float32, 4 * (3 + order + 1), f"order {order}")
    layer.update_grid(x)
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("case", ["empty", "nan", "inf", "narrow", "wrong-width", "few-values", "constant"])
def test_update_grid_refuses_data_it_cannot_fit_and_keeps_the_layer(case):
    """No samples, non-finite samples (a diverged batch), knots that the layer's dtype cannot hold apart (a
    range of 1 at 1e8 in float32), with grid_eps=0 (knots at x's quantiles) fewer distinct values than knots,
    or a constant feature with margin 0: a clear error naming the features and the cause, before anything is
    written (the knots were written first, so a failed least squares left NaN knots behind and the next
    forward pass raised)."""
    torch.manual_seed(4)
    layer = KANLinear(3, 2, grid_size=4, grid_eps=0.0 if case == "few-values" else 0.02)
    few = torch.randn(20, 3)
    few[:, 1] = torch.tensor([0.0, 1.0]).repeat(10)
    x = {"empty": torch.randn(0, 3), "nan": torch.randn(20, 3).index_fill_(1, torch.tensor([2]), float("nan")),
         "inf": torch.randn(20, 3).index_fill_(1, torch.tensor([0]), float("inf")),
         "narrow": torch.rand(20, 3) + 1e8, "wrong-width": torch.randn(20, 4), "few-values": few,
         "constant": torch.randn(20, 3).index_fill_(1, torch.tensor([0]), 0.5)}[case]
    want = {"empty": "at least one sample", "nan": r"feature\(s\) \[2\]", "inf": r"feature\(s\) \[0\]",
            "narrow": r"strictly increasing in torch.float32 for input feature\(s\) \[0, 1, 2\] \(x's range",
            "wrong-width": "in_features=3", "few-values": r"feature\(s\) \[1\] \(grid_eps=0 takes x's quantiles",
            "constant": r"feature\(s\) \[0\] \(x is constant there and margin is 0\)"}[case]
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=want):
        layer.update_grid(x, margin=0.0 if case == "constant" else 0.01)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    if case == "narrow":  # float64 holds those knots apart
        layer.double().update_grid(x.double())
        assert torch.isfinite(layer(x.double())).all()


def test_knots_written_through_data_are_seen():
    """Knots rewritten through ``.data`` (its own version counter: the layer's buffer keeps its version) after a
    call had checked them as evenly spaced: the next call used the even-knots form on uneven knots (5e-3
    off) and took NaN knots. A CPU tensor's checked values are now compared too."""
    torch.manual_seed(0)
    layer = KANLinear(3, 2, grid_size=5)
    x = torch.rand(8, 3) * 2 - 1
    layer(x)  # knots checked (evenly spaced) and remembered
    uneven = torch.sort(torch.rand(3, layer.grid.shape[1]) * 2.4 - 1.2, dim=1).values
    layer.grid.data.copy_(uneven)
    want = kan_linear(x, layer.scaled_spline_weight, grid=uneven.clone(), base_weight=layer.base_weight)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    layer.grid.data[0, 3] = float("nan")
    with pytest.raises(ValueError, match="grid \\(knots\\) must be finite"):
        layer(x)


def test_regularization_loss_is_efficient_kans_and_finite_at_zero_weights():
    """efficient-kan's L1 + entropy surrogate where it is defined; a feature whose weights are all zero (pruned,
    or the layer built with scale_noise=0) adds 0 log 0 = 0, where the formula gave NaN loss and gradients."""
    torch.manual_seed(5)
    layer = KANLinear(4, 3, grid_size=3).double()
    w = layer.spline_weight.detach()
    l1 = w.abs().mean(-1)
    p = l1 / l1.sum()
    want = 0.7 * l1.sum() + 1.3 * -(p * p.log()).sum()  # efficient-kan's formula
    torch.testing.assert_close(layer.regularization_loss(0.7, 1.3), want)
    with torch.no_grad():
        layer.spline_weight[1, 2] = 0.0
    loss = layer.regularization_loss()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(layer.spline_weight.grad).all()
    l1 = layer.spline_weight.detach().abs().mean(-1)
    p = (l1 / l1.sum()).flatten()
    p = p[p > 0]
    torch.testing.assert_close(loss.detach(), l1.sum() - (p * p.log()).sum())
    zero = KANLinear(4, 3, scale_noise=0.0)
    loss = zero.regularization_loss()
    loss.backward()
    assert loss.item() == 0 and torch.equal(zero.spline_weight.grad, torch.zeros_like(zero.spline_weight))


def test_kan_and_fastkan_models_stack_their_layers_under_the_peers_names():
    torch.manual_seed(2)
    x = torch.rand(40, 3) * 1.6 - 0.8
    kan = KAN([3, 5, 2], grid_size=4)
    assert "in_features=5, out_features=2, grid_size=4, spline_order=3" in repr(kan)
    assert set(kan.state_dict()) == {f"layers.{i}.{n}" for i in (0, 1)
                                     for n in ("grid", "base_weight", "spline_weight", "spline_scaler")}
    other = KAN([3, 5, 2], grid_size=4)
    other.load_state_dict(kan.state_dict())  # an efficient-kan checkpoint loads the same way
    torch.testing.assert_close(other(x), kan.layers[1](kan.layers[0](x)))
    want_reg = kan.layers[0].regularization_loss() + kan.layers[1].regularization_loss()
    torch.testing.assert_close(kan.regularization_loss(), want_reg)
    y = kan(x, update_grid=True)  # each layer's knots refit to its own input first
    assert not torch.equal(kan.layers[0].grid, other.layers[0].grid)
    assert not torch.equal(kan.layers[1].grid, other.layers[1].grid)
    torch.testing.assert_close(y, kan(x))
    fast = FastKAN([3, 5, 2], num_grids=6)
    assert set(fast.state_dict()) == {f"layers.{i}.{n}" for i in (0, 1) for n in (
        "layernorm.weight", "layernorm.bias", "rbf.grid", "spline_linear.weight", "base_linear.weight",
        "base_linear.bias")}
    torch.testing.assert_close(fast(x), fast.layers[1](fast.layers[0](x)))
    for bad in ([3], [3, 0, 2], (3.0, 2)):
        with pytest.raises(ValueError, match="layers_hidden"):
            KAN(bad)
        with pytest.raises(ValueError, match="layers_hidden"):
            FastKAN(bad)
    # ints of any integer kind: NumPy's too (a width read from a config array), as Python ints
    assert [layer.out_features for layer in KAN([np.int64(3), np.int32(5), 2]).layers] == [5, 2]
    built = {KANLinear(np.int64(4), np.int32(3), np.int64(5), np.int64(2)): ("in_features", "out_features",
                                                                             "grid_size", "spline_order"),
             ChebyKANLayer(np.int64(4), 3, np.int64(2)): ("inputdim", "degree"),
             FourierKANLayer(4, np.int64(3), np.int64(2)): ("outdim", "gridsize")}
    for layer, sizes in built.items():
        assert all(type(getattr(layer, a)) is int for a in sizes), layer
        assert layer(torch.randn(2, 4)).shape == (2, 3)


def test_kanlinear_base_activation_class_module_or_function():
    """efficient-kan passes a module class (built by the layer); a module or a function is taken as it is.
    SiLU in any of the three forms is the fused base path, and the same layer."""
    torch.manual_seed(2)
    ref_layer = KANLinear(4, 3)
    x = torch.randn(6, 4)
    for act in (torch.nn.SiLU(), torch.nn.functional.silu, torch.nn.Tanh, torch.nn.Tanh(), torch.tanh):
        layer = KANLinear(4, 3, base_activation=act)
        layer.load_state_dict(ref_layer.state_dict())
        tanh = act in (torch.nn.Tanh, torch.tanh) or isinstance(act, torch.nn.Tanh)
        want = ref_layer(x) if not tanh else (
            kan_linear(x, ref_layer.scaled_spline_weight, grid=ref_layer.grid)
            + torch.tanh(x) @ ref_layer.base_weight.t())
        torch.testing.assert_close(layer(x), want, msg=repr(act))


@pytest.mark.parametrize("bad, err, match", [
    (lambda: KANLinear(4, 3)(torch.randn(2, 5)), ValueError, "in_features=4"),
    (lambda: kan_linear(torch.randn(2, 5), torch.randn(3, 4, 6), "chebyshev"), ValueError, "in_features=4"),
    (lambda: KANLinear(4, 3, spline_order=-1), ValueError, "spline_order"),
    (lambda: KANLinear(4, 3, grid_size=0), ValueError, "grid_size"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "bspline", spline_order=1,
                        grid=torch.tensor([[0.0, 1, float("nan"), 3, 4, 5]] * 2)), ValueError, "finite"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "bspline", spline_order=1,
                        grid=torch.tensor([[0.0, 1, 1, 3, 4, 5]] * 2)), ValueError, "strictly increasing"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 5), "bspline", spline_order=1,
                        grid=torch.tensor([[0.0, 1, 2, 3, 4, 5]] * 2)), ValueError, "K=5"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "wavelet"), ValueError, "valid: .*bspline"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 3), "fourier"), ValueError, "2 \\* grid_size"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "rbf", centers=torch.zeros(4), width=0.0),
     ValueError, "width"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "rbf", centers=torch.tensor([0.0, 1, float("inf"), 3]),
                        width=1.0), ValueError, "centres\\) must be finite"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "rbf", centers=[0.0, 1, 2, 3], width=1.0),
     TypeError, "centers must be a torch.Tensor or None, got list"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "rbf", centers=torch.zeros(5), width=1.0),
     ValueError, "centers must be a \\[K=4\\] tensor, got \\(5,\\)"),
    (lambda: kan_linear(torch.randn(2, 2, dtype=torch.complex64), torch.randn(3, 2, 4), "chebyshev"), TypeError,
     "real floating"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 0), "chebyshev"), ValueError, "K >= 1"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4, dtype=torch.complex64), "chebyshev"), TypeError,
     "weight must be a real floating tensor, got torch.complex64"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "chebyshev", bias=torch.ones(3, dtype=torch.int64)),
     TypeError, "bias must be a real floating tensor"),
    (lambda: kan_linear(torch.randn(2, 2), [[0.0]], "chebyshev"), TypeError, "torch.Tensors"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 8), "chebyshev"), ValueError, "\\[out, in, K\\]"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4, device="meta"), "chebyshev"), ValueError,
     "weight is on meta but x is on cpu"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "chebyshev", base_weight=torch.randn(2, 3)),
     ValueError, "base_weight must be \\[out=3, in=2\\]"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "chebyshev", bias=torch.randn(2)), ValueError,
     "bias must have out=3"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "bspline", spline_order=1.0,
                        grid=torch.linspace(0, 1, 6).expand(2, -1)), ValueError, "spline_order must be an int"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "bspline", spline_order=1), ValueError,
     "needs grid="),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "bspline", spline_order=1,
                        grid=torch.linspace(0, 1, 6).expand(3, -1)), ValueError, "in_features=2"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 1), "bspline", spline_order=2,
                        grid=torch.linspace(0, 1, 4).expand(2, -1)), ValueError, "order 2 needs at least 6"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "rbf", width=1.0), ValueError, "needs centers="),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "rbf", centers=torch.zeros(4), width="1"), TypeError,
     "width must be a number, got str"),
    (lambda: KANLinear(0, 3), ValueError, "in_features must be a positive int"),
    (lambda: KANLinear(4, 3, grid_range=(1, -1)), ValueError, "grid_range"),
    (lambda: KANLinear(4, 3, spline_order=2.0), ValueError, "spline_order"),
    (lambda: FastKANLayer(4, 3, num_grids=1), ValueError, "num_grids must be an int >= 2"),
    (lambda: FastKANLayer(0, 3, use_layernorm=False), ValueError, "input_dim must be a positive int, got 0"),
    (lambda: ChebyKANLayer(0, 3, 2), ValueError, "input_dim must be a positive int, got 0"),
    (lambda: ChebyKANLayer("3", 3, 2), ValueError, "input_dim must be a positive int, got '3'"),
    (lambda: FourierKANLayer(3, -1, 2), ValueError, "outdim must be a positive int, got -1"),
    (lambda: FastKANLayer(4, 3)(torch.randn(2, 5)), ValueError, "input_dim=4"),
    (lambda: ChebyKANLayer(4, 3, degree=-1), ValueError, "degree must be an int >= 0"),
    (lambda: ChebyKANLayer(4, 3, degree=2)(torch.randn(2, 5)), ValueError, "input_dim=4"),
    (lambda: FourierKANLayer(4, 3, gridsize=0), ValueError, "gridsize must be an int >= 1"),
    (lambda: FourierKANLayer(4, 3, gridsize=2)(torch.randn(2, 5)), ValueError, "inputdim=4"),
    (lambda: FastKANLayer(1, 3), ValueError, "use_layernorm=False"),
    (lambda: FastKANLayer(4, 3, grid_min=2.0, grid_max=-2.0), ValueError, "grid_max > grid_min"),
    # module settings and inputs that used to fail inside torch (unpacking, lstsq's internal assert, x.shape)
    (lambda: KANLinear(4, 3, grid_range=(-1, 0, 1)), ValueError, "grid_range must be two finite numbers"),
    (lambda: KANLinear(4, 3, scale_noise=float("nan")), ValueError, "scale_noise must be a finite number"),
    (lambda: KAN([4, 3], grid_eps=float("inf")), ValueError, "grid_eps must be a finite number"),
    (lambda: KANLinear(4, 3, grid_size=True), ValueError, "grid_size must be a positive int, got True"),
    (lambda: KANLinear(4, 3, base_activation=None), TypeError, "base_activation must be a module class"),
    (lambda: KANLinear(4, 3)([[0.0] * 4]), TypeError, "x must be a torch.Tensor, got list"),
    (lambda: KANLinear(4, 3)(torch.tensor(1.0)), ValueError, "in_features=4, got \\(\\)"),
    (lambda: KANLinear(4, 3).update_grid(torch.randn(8, 4), margin=-1.0), ValueError,
     "margin must be a finite number >= 0"),
    (lambda: KANLinear(4, 3).update_grid(torch.randn(8, 4), margin=float("nan")), ValueError, "margin"),
    (lambda: KAN(4), ValueError, "layers_hidden must list"),
    (lambda: KAN([4, True]), ValueError, "layers_hidden must list"),
    (lambda: KANLinear(4, 3, grid_range=(True, 2)), ValueError, "grid_range must be two finite numbers"),
    (lambda: FastKANLayer(4, 3, spline_weight_init_scale=float("nan")), ValueError,
     "spline_weight_init_scale must be a finite number"),
    (lambda: FastKANLayer(4, 3, spline_weight_init_scale=0), ValueError, "spline_weight_init_scale must be > 0"),
    (lambda: FastKANLayer(4, 3, grid_min="a"), TypeError, "grid_min must be a number, got str"),
    (lambda: FastKANLayer(4, 3, base_activation="silu"), TypeError, "base_activation must be a function"),
    (lambda: ChebyKANLayer(4, 3, degree=True), ValueError, "degree must be an int >= 0, got True"),
    (lambda: ChebyKANLayer(4, 3, 2)("x"), TypeError, "x must be a torch.Tensor, got str"),
    (lambda: FastKANLayer(4, 3)(torch.ones(2, 4, dtype=torch.int64)), TypeError,
     "x must be a real floating tensor, got torch.int64"),
    (lambda: KANLinear(4, 3).b_splines(torch.randn(2, 3, 4)), ValueError, "x must be \\[rows, in_features=4\\]"),
    (lambda: KANLinear(4, 3).curve2coeff(torch.randn(5, 4), torch.randn(5, 4)), ValueError,
     "y must be \\[n=5, in=4, out\\]"),
    (lambda: KANLinear(4, 3).curve2coeff(torch.randn(5, 4), torch.full((5, 4, 2), float("nan"))), ValueError,
     "curve2coeff fits finite values"),
    (lambda: FourierKANLayer(4, 3, gridsize=2)(None), TypeError,
     "x must be a torch.Tensor, got NoneType"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "chebyshev", base_weight=[[1.0, 2.0]] * 3),
     TypeError, "base_weight must be a torch.Tensor or None, got list"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "chebyshev", bias=[0.0] * 3), TypeError,
     "bias must be a torch.Tensor or None, got list"),
    (lambda: kan_linear(torch.randn(2, 2), torch.randn(3, 2, 4), "bspline", spline_order=True,
                        grid=torch.linspace(0, 1, 6).expand(2, -1)), ValueError, "spline_order must be an int"),
])
def test_bad_input_is_a_clear_error(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows, cin", [(0, 2), (3, 0), (0, 0)])
def test_empty_batch_or_no_inputs(backend, rows, cin):
    """Nothing to contract gives nn.Linear's answer: zeros plus the bias, with a gradient for every input."""
    if backend == "triton" and not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    x = torch.randn(2, rows, cin, requires_grad=True)
    w, wb, bias = (torch.randn(s, requires_grad=True) for s in ((3, cin, 4), (3, cin), (3,)))
    with use_backend(backend):
        y = kan_linear(x, w, "chebyshev", base_weight=wb, bias=bias)
    assert y.shape == (2, rows, 3)
    torch.testing.assert_close(y, bias.detach().expand(2, rows, 3))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and wb.grad.shape == wb.shape
    torch.testing.assert_close(bias.grad, torch.full((3,), 2.0 * rows))


def test_torch_variant_is_memory_lean():
    """The torch path never keeps the [rows, in, K] basis for backward: saved tensors are x and the weights."""
    layer = KANLinear(16, 8, grid_size=8)
    x = torch.randn(4096, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    assert max(saved) <= 4096 * 16 and sum(saved) < 2 * 4096 * 16 + 8 * 16 * 12 * 4


def test_fused_with_base_path_saves_only_x_and_weights():
    """The fused layer's base path (beside the kernel) keeps x, not silu(x), for its backward."""
    layer = KANLinear(16, 8, grid_size=8)
    rows = 512
    x = torch.randn(rows, 16, requires_grad=True)
    saved = {}
    with use_backend("triton", kan="fused"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.numel()) and t, lambda t: t):
        layer(x).sum().backward()
    assert x.grad is not None and layer.base_weight.grad is not None
    activations = [n for n in saved.values() if n > 8 * 16 * 11]  # the rest are weights: 8 x 16 (x 11)
    assert activations == [rows * 16], saved


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fused", "staged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("basis", BASES)
def test_gpu_variants_match_reference(basis, dtype, variant):
    case = next(c for c in OP.cases if c.params["basis"] == basis and "gpu" in c.tags)
    p, (x, w, wb, bias, b) = OP.make_inputs(case, "cuda", dtype, requires_grad=True)
    reason = OP.variants[variant].why_not(p)
    if reason:
        pytest.xfail(reason)
    y = OP.run_variant(variant, p, x, w, wb, bias, b)
    want = ref.kan_linear(npf(x[:256].cpu()), npf(w.cpu()), p.basis, npf(None if wb is None else wb.cpu()),
                          npf(None if bias is None else bias.cpu()), grid=npf(None if b.grid is None else b.grid.cpu()),
                          order=b.order, centers=npf(None if b.centers is None else b.centers.cpu()), width=b.width,
                          degree=p.k - 1, grid_size=b.grid_size)
    assert_close(y[:256].cpu(), want, dtype, OP.reduction(p), f"{basis} forward")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    # Full-size gradients against the torch variant in float64 on the GPU (itself checked against the
    # NumPy reference in the CPU tests): dW reduces over the whole batch, so a slice would not do.
    args64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, wb, bias)]
    b64 = dataclasses.replace(b, **{k: getattr(b, k).double() for k in ("grid", "centers") if getattr(b, k) is not None})
    y64 = OP.run_variant("torch", p, *args64, b64)
    (y64 * g.double()).sum().backward()
    assert_close(x.grad.cpu(), args64[0].grad.cpu().numpy(), dtype, p.cout * p.k, f"{basis} grad x")
    assert_close(w.grad.cpu(), args64[1].grad.cpu().numpy(), dtype, p.rows, f"{basis} grad weight")
    if wb is not None:
        assert_close(wb.grad.cpu(), args64[2].grad.cpu().numpy(), dtype, p.rows, f"{basis} grad base_weight")


@pytest.mark.gpu
@pytest.mark.parametrize("make", [lambda: KANLinear(96, 40, grid_size=8), lambda: FastKANLayer(96, 40, num_grids=8)],
                         ids=["KANLinear", "FastKANLayer"])
def test_gpu_modules_with_a_base_path(make):
    """Layers with a SiLU base path on the GPU (the path that was wrong inside the forward kernel) against
    the same layer on the torch backend, forward and gradients."""
    torch.manual_seed(0)
    layer = make().cuda()
    x = torch.randn(300, 96, device="cuda", requires_grad=True)
    g = torch.randn(300, 40, device="cuda")
    got = {}
    for backend in ("torch", "triton"):
        layer.zero_grad()
        x.grad = None
        with use_backend(backend):
            y = layer(x)
        (y * g).sum().backward()
        got[backend] = [y.detach()] + [x.grad] + [q.grad for q in layer.parameters() if q.requires_grad]
    for a, b in zip(got["triton"], got["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_knot_validation_is_redone_after_an_in_place_change():
    grid = torch.tensor([[0.0, 1, 2, 3, 4, 5]] * 2)
    w = torch.randn(3, 2, 4)
    kan_linear(torch.rand(4, 2), w, "bspline", grid=grid, spline_order=1)
    grid[0, 2] = 1.0  # now repeated knots
    with pytest.raises(ValueError, match="strictly increasing"):
        kan_linear(torch.rand(4, 2), w, "bspline", grid=grid, spline_order=1)


@pytest.mark.parametrize("splits", [0, 1, 3])
def test_fused_grad_w_is_the_same_for_any_batch_split(splits):
    """grad W is reduced over batch splits (per-split float32 partials, summed in a fixed order): the
    automatic choice (SPLITS 0), one split and several give the reference's gradient."""
    case = next(c for c in SMALL if c.params["basis"] == "chebyshev")
    p, (x, w, wb, bias, b) = OP.make_inputs(case, "cpu", torch.float32, requires_grad=True, seed=5)
    cfg = {**OP.variants["fused"].default_config(p), "BLOCK_B": 4, "SPLITS": splits}  # 13 rows: up to 4 splits
    g = torch.randn(p.rows, p.cout, generator=torch.Generator().manual_seed(6))
    (OP.run_variant("fused", p, x, w, wb, bias, b, config=cfg) * g).sum().backward()
    _, dw, _ = ref.kan_linear_vjp(npf(x), npf(w), p.basis, g.double().numpy(), npf(wb), degree=p.k - 1,
                                  grid_size=b.grid_size)
    assert_close(w.grad, dw, torch.float32, p.rows, f"grad weight with SPLITS={splits}")


@pytest.mark.parametrize("cin", [16, 37])
def test_forward_weight_layout_pads_rows_to_16_features(cin):
    """The forward's [K, O, I] weight has rows of a multiple of 16 features (16-byte loads on a GPU) and its
    padding, which the kernel reads as weights, is zero."""
    from opforge.kernels.kan import _w3

    w = torch.randn(5, cin, 3)
    w3 = _w3(w)
    ip = -(-cin // 16) * 16
    assert w3.shape == (3, 5, ip) and w3.is_contiguous()
    assert torch.equal(w3[..., :cin], w.permute(2, 0, 1)) and not w3[..., cin:].any()


WIDE = [dataclasses.replace(c, name=c.name + "-in37", params={**c.params, "cin": 37}) for c in SMALL]


@pytest.mark.parametrize("splits", [0, 2, 3])
@pytest.mark.parametrize("case", WIDE, ids=[c.name for c in WIDE])
def test_fused_forward_feature_splits(case, splits, monkeypatch):
    """The forward's feature sum split over programs (SPLIT_I; 0 = automatic, here 3 splits of 16 features
    with the interpreter's 4 SMs): float32 partials summed in a fixed order, the bias added once, the in-kernel
    base path split with the features, and 16-bit outputs cast after the sum."""
    from opforge.kernels import kan as kan_mod

    p, _ = OP.make_inputs(case, "cpu", torch.float32)
    cfg = dict(OP.variants["fused"].default_config(p), BLOCK_IF=16, SPLIT_I=splits)
    assert kan_mod._fwd_splits(p, cfg, torch.device("cpu")) == ({0: 3}.get(splits, splits), 16 if splits != 2 else 32)
    check("fused", case, config=cfg)
    if case.params["basis"] == "bspline":
        monkeypatch.setenv("OPFORGE_KAN_FUSED_BASE", "1")
        check("fused", case, config=cfg)
        check("fused", case, torch.bfloat16, config=cfg)


@pytest.mark.parametrize("graph", [False, True], ids=["no-graph", "graph"])
def test_bspline_local_form_in_deterministic_mode(graph):
    """torch.use_deterministic_algorithms(True) (put_ raises there): the local form's in-place placement
    switches to scatter_ and gives the same bases; the layer trains."""
    from opforge.kernels.kan import _bspline_both

    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(-1, 1, 18).expand(10, -1).contiguous()  # G = 11, order 3
    x = torch.randn(2000, 10, generator=gen)  # 2e4 values: the local form
    with torch.set_grad_enabled(graph):
        want = _bspline_both(x, grid, 3, value=True, derivative=True, full=False)
        torch.use_deterministic_algorithms(True)
        try:
            got = _bspline_both(x, grid, 3, value=True, derivative=True, full=False)
            y = KANLinear(10, 3, grid_size=11)(x.requires_grad_(graph))  # its forward runs with no graph inside
            if graph:
                y.sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert y.shape == (2000, 3) and (x.grad is not None) == graph


def test_bspline_forms_script_times_both_forms(capsys):
    """perf/kan_bspline_forms.py, which the torch variant's form thresholds cite, runs (tiny sizes): the forms
    alone, with a graph, and in whole layers, one row per setting with a positive full/local ratio."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "perf" / "kan_bspline_forms.py"
    spec = importlib.util.spec_from_file_location("kan_bspline_forms_t", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv, rows in ((["--values", "64,96", "--grids", "3:1"], 2),
                       (["--graph", "--values", "64", "--grids", "3:3"], 1),
                       (["--layers", "5:3", "--grids", "3:2"], 2)):
        mod.main(argv)
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 + rows, out
        ratio_col = 4 if "--layers" not in argv else 5
        assert all(float(line.split()[ratio_col]) > 0 for line in out[1:]), out


def test_fused_training_step_copies_the_weight_only_for_the_forward_layout(big_writes):
    """Torch ops writing a tensor of W's size or more in a fused forward + backward (K = 8: G = 5, order 3,
    feature blocks dividing in), the Triton kernels' own writes aside: the forward's [k, in, out] copy of W,
    and nothing else. Grad x reads W as it is (no padded copy) and one batch split's grad-W partial is the
    gradient (no sum over splits); the base path adds into the kernel's output and never writes [rows, out]
    twice."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(24, 16, 8, generator=g, requires_grad=True)
    wb = torch.randn(24, 16, generator=g, requires_grad=True)
    grid = torch.linspace(-2.2, 2.2, 12).expand(16, -1).contiguous()
    dy = torch.randn(40, 24, generator=g)
    with use_backend("triton", kan="fused"), big_writes(w.numel() * 4) as ops:
        y = kan_linear(x, w, "bspline", grid=grid, spline_order=3, base_weight=wb)
        torch.autograd.grad(y, (x, w, wb), dy)
    assert ops == ["clone"], ops


@pytest.mark.parametrize("K", [1, 2, 3, 8, 9, 33])
@pytest.mark.parametrize("basis", ["chebyshev", "fourier"])
def test_basis_derivatives_fold_into_the_weight(basis, K):
    """The torch variant's grad x for the bases closed under d/dx: dphi_k = sum_j D[k, j] phi_j (chebyshev: plus
    -(K - 1) / 2 T_K for the last), D folded into the weight, against the derivatives written out (float64,
    x saturating tanh and beyond); and its backward evaluates no derivative pass."""
    from opforge.kernels import kan as kan_mod

    if basis == "fourier" and K % 2:
        K += 1  # cos and sin of each k
    b = kan_mod._Basis(basis, grid_size=K // 2) if basis == "fourier" else kan_mod._Basis(basis)
    x = torch.cat([torch.linspace(-4, 4, 41, dtype=torch.float64), torch.tensor([-30.0, 30.0, 1e3])])[:, None]
    with torch.no_grad():
        phi, dphi = kan_mod._basis_both(x, b, K, value=True, derivative=True)
    D = kan_mod._derivative_matrix(basis, K, x.device, x.dtype)
    folded = phi @ D.t()  # [n, 1, K]: sum_j D[k, j] phi_j
    if basis == "chebyshev" and K > 1:
        t = torch.tanh(x)
        folded[..., K - 1] -= (K - 1) / 2 * (2 * t * phi[..., K - 1] - phi[..., K - 2])
    torch.testing.assert_close(folded, dphi, rtol=0, atol=1e-12 * K * K)
    with torch.enable_grad():  # the differentiable forms a recorded graph takes (recurrences, out of place)
        phi_g, dphi_g = kan_mod._basis_both(x, b, K, value=True, derivative=True)
    torch.testing.assert_close(phi_g, phi, rtol=0, atol=1e-12 * K)
    torch.testing.assert_close(dphi_g, dphi, rtol=0, atol=1e-11 * K * K)

    calls = []
    both = kan_mod._basis_both
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kan_mod, "_basis_both", lambda *a, **kw: calls.append(kw.get("derivative")) or both(*a, **kw))
        mp.setattr(kan_mod, "_KEEP_BASIS_MAX", 0)  # the bases evaluated again in the backward
        w = torch.randn(3, 1, K, dtype=torch.float64, requires_grad=True)
        xs = x.clone().requires_grad_()
        y = kan_linear(xs, w, basis)
        gx, gw = torch.autograd.grad(y, (xs, w), torch.ones_like(y))
    assert len(calls) == 2 and not any(calls), calls  # forward, backward: values only
    torch.testing.assert_close(gx, (dphi * w.detach().sum(0)).sum(-1), rtol=1e-12, atol=1e-12 * K * K)


@pytest.mark.parametrize("presplit", [1, 0])
@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_fused_float32_under_tf32_tensor_cores(case, presplit, tf32_tensor_cores, monkeypatch):
    """float32 forward and every gradient within float32's tolerance when each dot product is computed as the
    tensor cores compute it (conftest's tf32_tensor_cores): with the weight and dy split for 3xTF32 on the
    host (PRESPLIT, the default) and with Triton's own split, through both grad-W kernels."""
    from opforge.kernels import kan as kan_mod

    p, _ = OP.make_inputs(case, "cpu", torch.float32)
    for per_k in (True, False):
        monkeypatch.setattr(kan_mod, "_dw_per_k", lambda p, cfg: per_k)
        check("fused", case, config=dict(OP.variants["fused"].default_config(p), PRESPLIT=presplit))
    assert tf32_tensor_cores, "no float32 dot product ran"


def _tf32_gemms(monkeypatch) -> list:
    """The staged variant's GEMMs as cuBLAS makes them under TF32: each operand read at TF32's precision (the
    13 low mantissa bits truncated), float32 sums; each GEMM checks it runs with TF32 allowed."""
    from opforge.kernels import kan as kan_mod
    from opforge.kernels._triton import tf32_allowed

    real, calls = kan_mod._gemm, []

    def trunc(t):
        return (t.contiguous().view(torch.int32) & -8192).view(torch.float32)

    def gemm(out, a, b, accumulate):
        assert tf32_allowed(), "a staged GEMM ran without TF32"
        calls.append((tuple(a.shape), tuple(b.shape)))
        real(out, trunc(a), trunc(b), accumulate)

    monkeypatch.setattr(kan_mod, "_gemm", gemm)
    return calls


@pytest.mark.parametrize("blocks", [1, 4], ids=["one-block", "row-blocks"])
@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_staged_float32_under_tf32_gemms(case, blocks, monkeypatch):
    """The staged variant (basis kernel + GEMMs + grad-x kernel) within float32's tolerance, forward and
    every gradient (the base weight's too: silu(x) is a column of the basis), when its GEMMs read their
    operands as TF32 tensor cores do: the basis, dy and W split for 3xTF32 (three products each, in GEMMs
    that read each basis block once); in one block of rows and in blocks of 4 rows (CHUNK)."""
    from opforge.kernels.kan import _staged_kc

    calls = _tf32_gemms(monkeypatch)
    p, _ = OP.make_inputs(case, "cpu", torch.float32)
    rows = p.rows if blocks == 1 else 4
    check("staged", case, config=dict(OP.variants["staged"].default_config(p), CHUNK=rows * p.cin * _staged_kc(p)))
    sizes = [min(rows, p.rows - r0) for r0 in range(0, p.rows, rows)]
    O, C = p.cout, p.cin * _staged_kc(p)
    fwd = [((n, C), (C, w)) for n in sizes for w in (2 * O, O)]  # phi_hi [W_hi; W_lo]^T, phi_lo W_hi^T
    # per block of the backward: [dy_hi | dy_lo]^T phi_hi, dy_hi^T phi_lo, [dy_hi | dy_lo | dy_hi] [W_hi; W_hi; W_lo]
    bwd = [c for n in sizes for c in (((2 * O, n), (n, C)), ((O, n), (n, C)), ((n, 3 * O), (3 * O, C)))]
    assert calls == fwd + bwd


def test_staged_tf32_and_16_bit_calls_take_one_gemm(monkeypatch):
    """Where the call computes in TF32 (torch's TF32 setting, or bfloat16 data) the staged variant makes one
    GEMM a product, on unsplit operands, within that precision's tolerance."""
    from opforge.kernels._triton import allow_tf32

    case = next(c for c in SMALL if c.params["basis"] == "rbf")
    calls = _tf32_gemms(monkeypatch)
    check("staged", case, torch.bfloat16)
    assert len(calls) == 3
    with allow_tf32(True):
        p, (x, w, wb, bias, b) = OP.make_inputs(case, "cpu", torch.float32, requires_grad=True, seed=3)
        assert p.dtype_name == "float32-tf32"
        y = OP.run_variant("staged", p, x, w, wb, bias, b)
        want = OP.run_variant("torch", p, *(None if t is None else t.detach().double() for t in (x, w, wb, bias)),
                              b)
    assert len(calls) == 4
    assert_close(y, want.numpy(), "float32-tf32", OP.reduction(p), "staged forward under TF32")


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_staged_saves_only_x_and_the_weights(case):
    """Activation memory: the staged forward keeps x and the weights for its backward, never a basis block."""
    p, (x, w, wb, bias, b) = OP.make_inputs(case, "cpu", torch.float32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        OP.run_variant("staged", p, x, w, wb, bias, b)
    assert saved == [x.shape, w.shape] + ([wb.shape] if wb is not None else [])


@pytest.mark.parametrize("want", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True)], ids=lambda w: "".join("xwb"[i] for i in
                                                                                                   range(3) if w[i]))
def test_staged_backward_for_any_subset_of_inputs(want):
    """The staged backward makes only the gradients asked for (grad x without the basis, grad W without the
    grad-x GEMMs), each equal to the one a full backward gives."""
    case = next(c for c in SMALL if c.name == "bspline-small-odd")
    p, (x, w, wb, bias, b) = OP.make_inputs(case, "cpu", torch.float32, seed=8)
    g = torch.randn(p.rows, p.cout, generator=torch.Generator().manual_seed(9))
    full = [t.detach().clone().requires_grad_() for t in (x, w, wb)]
    full_grads = torch.autograd.grad(OP.run_variant("staged", p, *full, bias, b), full, g)
    part = [t.detach().clone().requires_grad_(need) for t, need in zip((x, w, wb), want)]
    leaves = [t for t in part if t.requires_grad]
    got = iter(torch.autograd.grad(OP.run_variant("staged", p, *part, bias, b), leaves, g))
    for need, ref_grad in zip(want, full_grads):
        if need:
            torch.testing.assert_close(next(got), ref_grad, rtol=0, atol=0)
