"""Seeded random calls of the public functions, the way users make them: random shapes (leading dims,
non-contiguous views, broadcasting), bases and orders, knots uniform or not, kernels, ARD lengthscales,
vector right-hand sides, coincident points, resampled outputs, optional bias and base paths.

Each call is checked twice, forward and every gradient:
- every Triton variant (interpreter, float32) against the torch variant in float64, within ten times the
  error of the torch variant itself in float32 (float32's own rounding is the yardstick) or 1e-4 (beyond
  D = 8 both expand squared distances as |x|^2 + |y|^2 - 2 x.y, whose error of eps |x|^2 reaches
  exp(-s / 2) far out, with rounding that differs between them). For kernel sums the yardstick is the
  larger error of two summation orders (the points of y forward and reversed): a lengthscale's gradient
  sums terms of both signs that can cancel by 1e4, and one order's error can be a lucky tenth of another's
  (seed 11 drew such a call). Both orders can be lucky alike, so the gradients of the scalar parameters
  also get a floor: 2^-24 times the sum of the magnitudes of the terms they add up (grad outputscale sums
  out * g / outputscale; grad lengthscale_d the terms of -(x_d gx_d + y_d gy_d) / lengthscale_d, since the
  output depends on x / lengthscale and y / lengthscale alone), what rounding each term once can move the
  sum by: seed 23 drew an IMQ call whose outputscale gradient cancelled 13,000-fold (2e-5 and 3e-4 errors
  for the torch variant and flash, both within the 8e-4 that floor gives). Beyond D = 8 (kernels without a
  square root) every result also gets the expansion form's bound (``_expansion_bounds``): seed 1 drew a
  Gaussian (D = 17, ARD) with a point of x on a point of y and every other pair 150 squared lengthscales
  apart, so the true gradients were 1e-24; flash's grad x, 2 (p_i sum_j w_ij - sum_j w_ij q_j) on tensor
  cores, came out 1e-6, a 2^-22 rounding of |p_i| w_ii that does not cancel (the torch variant's float32
  GEMM rounded both sides alike there and cancelled exactly, by luck of the coincidence); the bound was
  4e-6. The same bound covers what a distance's error does to k: with D = 65 among the draws (the distances
  in coordinate chunks), seed 7 drew Cauchy calls with a point of x on a point of y some 30 lengthscales
  from the centre, whose out and grad b flash got to 1e-4 (the pair's squared distance, 0, came out 6e-4:
  |p|^2 + |q|^2 ~ 2000 rounded) where the torch variant's clamp at 0 happened to make it exact. A 0.1% error
  put into flash's forward or point gradients beyond D = 8 still fails seed 7, in ten calls or more;
- ``vmap(grad)`` per-example gradients (the plain math under torch.func) against one autograd pass
  through the usual path, in float64, within 1e-7 or, for kernel sums, ten times the error of that pass
  summing over y in reverse order (seed 2026 drew a Gaussian whose gradients in x, at 3e-15, were all
  cancellation: a point of x on a point of y, every other point ~60 lengthscales away; their rounding,
  6e-16, differed with the row blocking and the summation order alike).

With ``OPFORGE_FUZZ_DTYPE=bfloat16`` (or ``float16``) the same calls are made with 16-bit data: the real inputs
are rounded to that dtype first (knots, centres and widths stay float32, as a module's buffers would not
round onto each other), the references are float64 on the rounded values, and the torch variant and every
Triton variant then run on the 16-bit inputs (the output gradient rounded alike; the interpreter's
float32 -> bfloat16 casts, which truncate, rounded to nearest as a GPU rounds them). Every opforge path
accumulates 16-bit data in float32 (``opforge.reference.tolerance``), so each result element must be its
float64 value rounded once to the 16-bit dtype: within u |ref| (u = 2^-8 bfloat16, 2^-11 float16) plus
twice the error the float32 computation may carry (the float32 check's allowance, max(10 yardstick, 1e-4),
times max |ref|). That is elementwise, so a 16-bit intermediate (a partial sum stored in bfloat16, a
basis rounded before its dot) fails where a normalised bound would let it pass. The float32 Triton runs and
the ``vmap(grad)`` check are the float32 mode's, not repeated there.

With ``OPFORGE_FUZZ_TC=1`` the interpreter's dot products are made as a GPU's tensor cores make them
(conftest's ``tf32_tensor_cores``: TF32 operands truncated, 3xTF32 as Triton splits), in either mode. That
found float16 data computed with TF32 (``dft_gemm`` 10x the torch variant's error, past float16's
tolerance), which now takes 3xTF32 like float32.

This kind of search found a crash (b [M, M] with batched points), a cancellation (kernel-sum gradients at
coincident points, D = 8) and the plain Matern math losing its tail. Slow (minutes on 2 cores):
``python -m pytest -m slow tests/test_api_fuzz.py``; ``OPFORGE_FUZZ_SEED=<n>`` draws another set of calls
(the default, 7, is the set CI-style runs repeat).
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from opforge.kernels import KERNELS, get_op, kan_linear, kernel_matvec, spectral_conv, use_backend
from opforge.kernels.kernel_sum import _exact
from opforge.reference import kan as kan_ref
from opforge.reference import kernel_sum as kernel_ref

pytestmark = pytest.mark.slow
F64 = torch.float64


def _kan(rng: random.Random):
    basis = rng.choice(["bspline", "rbf", "chebyshev", "fourier"])
    cin, cout = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.2:  # past one 16- or 32-feature tile
        cin, cout = rng.randint(17, 40), rng.randint(17, 40)
    lead = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 3)))
    x = torch.randn(lead + (cin,)) * rng.choice([0.5, 1.0, 2.5])
    if rng.random() < 0.3:
        x = x.movedim(-1, 0).contiguous().movedim(0, -1)  # a strided view
    kw = {}
    if basis == "bspline":
        order, G = rng.randint(0, 4), rng.randint(1, 6)
        nk = G + 2 * order + 1
        if rng.random() < 0.5:
            knots = torch.linspace(-2, 2, nk).expand(cin, -1).contiguous()
        else:
            knots = torch.sort(torch.rand(cin, nk) * 5 - 2.5, dim=1).values + torch.arange(nk) * 1e-3
        K, kw = G + order, dict(grid=knots, spline_order=order)
    elif basis == "rbf":
        K = rng.randint(2, 9)
        kw = dict(centers=torch.linspace(-2, 2, K), width=rng.choice([0.3, 0.57, 1.0]))
    elif basis == "chebyshev":
        K = rng.randint(1, 17)
    else:
        K = 2 * rng.randint(1, 8)
    w = torch.randn(cout, cin, K)
    wb = torch.randn(cout, cin) if rng.random() < 0.5 else None
    bias = torch.randn(cout) if rng.random() < 0.5 else None

    def f(x, w, wb, bias):
        return kan_linear(x, w, basis, base_weight=wb, bias=bias, **kw)

    ref_kw = {"bspline": lambda: dict(grid=kw["grid"].double().numpy(), order=kw["spline_order"]),
              "rbf": lambda: dict(centers=kw["centers"].double().numpy(), width=kw["width"]),
              "chebyshev": lambda: dict(degree=K - 1), "fourier": lambda: dict(grid_size=K // 2)}[basis]()

    def tf32_sums(inputs):
        """Per result element (float64, in the order of ``_run``'s results), the sum of the magnitudes of the
        products it adds up on the tensor cores, with the basis (and silu) as the float32 operand TF32
        truncates: a TF32 product of bfloat16 data is off by under 2^-10 of that sum. y: |W| |phi| (+ |Wb|
        |silu|); grad x: |g| |W| |phi'| (+ |g| |Wb| |silu'|); grad W: |g|^T |phi|; grad Wb: |g|^T |silu|;
        grad bias: sums of g alone, no product."""
        x, w, wb, bias = (None if t is None else t.detach().double() for t in inputs)
        lead = x.shape[:-1]
        X = x.reshape(-1, cin).numpy()
        phi = np.abs(kan_ref.basis(X, basis, **ref_kw))
        dphi = np.abs(kan_ref.basis(X, basis, derivative=True, **ref_kw))
        g = np.abs(_cotangent(lead + (cout,)).reshape(-1, cout).numpy())
        W = np.abs(w.numpy())
        my, mx = np.einsum("bik,oik->bo", phi, W), np.einsum("bo,oik,bik->bi", g, W, dphi)
        res = [np.einsum("bo,bik->oik", g, phi)]
        if wb is not None:
            Wb, s = np.abs(wb.numpy()), np.abs(kan_ref.silu(X))
            my, mx = my + s @ Wb.T, mx + (g @ Wb) * np.abs(kan_ref.dsilu(X))
            res.append(g.T @ s)
        if bias is not None:
            res.append(np.zeros(cout))
        return [torch.from_numpy(a) for a in [my.reshape(lead + (cout,)), mx.reshape(lead + (cin,))] + res]

    return (f"{basis} x{tuple(x.shape)} K={K} {kw.get('spline_order', '')}", f, [x, w, wb, bias],
            dict(tf32_sums=tf32_sums))


def _ksum(rng: random.Random):
    kernel = rng.choice(list(KERNELS))
    D = rng.choice([1, 2, 3, 5, 8, 9, 17, 65])  # 65: past 64, the distances in coordinate chunks (BLOCK_D)
    N, M, R = rng.randint(1, 70), rng.randint(1, 70), rng.randint(1, 4)
    bx = rng.choice([(), (2,), (2, 1)])
    x = torch.randn(bx + (N, D)) * rng.choice([0.3, 1, 3])
    y = torch.randn((M, D)) * rng.choice([0.3, 1, 3])
    if rng.random() < 0.3:  # a point of x among the y: r = 0
        y = torch.cat([y, x.reshape(-1, D)[:1]])
        M += 1
    b = torch.randn((M,) if rng.random() < 0.3 else (M, R))
    ard = rng.random() < 0.5
    ls = torch.rand(D) + 0.4 if ard else torch.tensor(0.9)
    os_ = torch.tensor(1.3)

    def f(x, y, b, ls, os_):
        return kernel_matvec(x, y, b, kernel, lengthscale=ls, outputscale=os_)

    def reorder(inputs):  # the same sum over the points of y taken in reverse order (y, b flipped on M)
        x, y, b, ls, os_ = inputs
        back = [None, None, -2, 0, None, None]  # out, gx, gy, gb, g ls, g os: the M axis of each, or None

        def unflip(res):
            return [t if t is None or d is None else t.flip(d) for t, d in zip(res, back)]

        return [x, y.flip(-2), b.flip(0), ls, os_], unflip

    def floors(want):  # what float32 rounding alone can do to each result (see the top)
        out, gx, gy, gb, gls, gos = (t.detach() for t in want)
        if out.numel() == 0:
            return [0.0] * 6
        xd, yd, lsd = x.double(), y.double(), ls.double()
        # grad os sums out * g / os; grad ls_d sums the terms of -(x_d gx_d + y_d gy_d) / ls_d (out depends on
        # x / ls and y / ls alone); each term rounded by float32's unit roundoff moves the sum by up to this
        u = 2.0 ** -24
        e_os = u * (out * _cotangent(out.shape) / os_.double()).abs().sum()
        e_ls = u * ((xd * gx).abs().reshape(-1, D).sum(0) + (yd * gy).abs().reshape(-1, D).sum(0)) / lsd
        e_out = e_gx = e_gy = e_gb = 0.0
        if not _exact(D, kernel):  # the expansion form's rounding, on top
            e_out, e_gx, e_gy, e_gb, x_os, x_ls = _expansion_bounds(xd, yd, b.double(), lsd, float(os_), kernel,
                                                                    out.shape)
            e_os, e_ls = e_os + x_os, e_ls + x_ls
        if lsd.dim() == 0:
            e_ls = e_ls.sum()

        def rel(err, ref):
            return float(err / ref.abs().max().clamp_min(1e-300))

        return [rel(e_out, out), rel(e_gx, gx), rel(e_gy, gy), rel(e_gb, gb), rel(e_ls.max(), gls), rel(e_os, gos)]

    return (f"{kernel} x{tuple(x.shape)} y{tuple(y.shape)} b{tuple(b.shape)} ard={ard}", f, [x, y, b, ls, os_],
            dict(reorder=reorder, floors=floors))


def _expansion_bounds(x, y, b, ls, os_, kernel, out_shape):
    """Absolute error bounds (float64) of a kernel sum whose squared distances and point gradients take the
    expansion form beyond D = 8 (no square root): s_ij = |p_i|^2 + |q_j|^2 - 2 p.q and grad p_i =
    2 (p_i sum_j w_ij - sum_j w_ij q_j), p, q the centred scaled points (x - c) / ls, (y - c) / ls (c: y's mean,
    as ``kernel_matvec`` centres), w_ij = k'(s_ij) os <g_i, b_j>. A product is good to eps = 2^-22 of its
    magnitude (3xTF32, flash's tensor-core form) and a distance, a sum of D of them, to
    es = eps + sqrt(D) 2^-24 (float32 sums' typical growth) of 2 (|p_i|^2 + |q_j|^2). So, with
    e_ij = es 2 (|p_i|^2 + |q_j|^2) |k'(s_ij)| os, what a distance's error does to k: out_i within
    sum_j e_ij |b_j|, grad b_j within sum_i e_ij |g_i|, grad os within sum_ij e_ij <|g_i|, |b_j|> / os;
    grad x_i,d within eps 2 sum_j |w_ij| (|p_id| + |q_jd|) / ls_d, grad y likewise over i; grad ls_d within
    what those point-gradient errors carry into -(sum p_d gp_d + sum q_d gq_d) / ls_d ([D]). Where a point of
    x is a point of y and no other point is near, the true gradients are ~0 and these bounds are the whole
    story. Returns (out, grad x, grad y, grad b, grad os) as numbers and grad ls as a [D] tensor."""
    eps = 2.0 ** -22
    D = x.shape[-1]
    es = eps + D ** 0.5 * 2.0 ** -24
    c = y.mean(0)
    p = ((x - c) / ls).reshape(-1, x.shape[-2], D)  # [B, N, D]
    q = (y - c) / ls  # [M, D]
    bb = b.reshape(b.shape[0], -1).abs()  # [M, R]
    g = _cotangent(out_shape).reshape(p.shape[0], p.shape[1], -1).abs()  # [B, N, R]
    s = ((p.unsqueeze(-2) - q) ** 2).sum(-1)  # [B, N, M]
    dk = torch.from_numpy(kernel_ref.dphi(s.numpy(), kernel)).abs()
    e = es * 2 * ((p * p).sum(-1).unsqueeze(-1) + (q * q).sum(-1)) * dk * os_  # [B, N, M]
    e_out = (e @ bb).max()
    e_gb = (e.transpose(-1, -2) @ g).sum(0).max()
    e_gos = (e * (g @ bb.T)).sum() / os_
    w = dk * os_ * (g @ bb.T)  # |w_ij| [B, N, M]
    wm = w.unsqueeze(-1) * (p.abs().unsqueeze(-2) + q.abs())  # |w_ij| (|p_id| + |q_jd|) [B, N, M, D]
    ex = eps * 2 * wm.sum(-2)  # [B, N, D] (the scaled points' gradients)
    ey = eps * 2 * wm.sum((0, 1))  # [M, D]
    e_ls = ((p.abs() * ex).sum((0, 1)) + (q.abs() * ey).sum(0)) / ls  # [D]
    ls_d = ls if ls.dim() else ls.expand(D)
    return e_out, (ex / ls_d).max(), (ey / ls_d).max(), e_gb, e_gos, e_ls


def _spectral(rng: random.Random):
    d = rng.randint(1, 3)
    grid = tuple(rng.randint(3, 13 if d < 3 else 8) for _ in range(d))
    modes = tuple(rng.randint(1, max(1, g - 1)) for g in grid[:-1]) + (rng.randint(1, grid[-1] // 2 + 1),)
    cin, cout, B = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
    if rng.random() < 0.2:  # past one 16-channel tile
        cin, cout = rng.randint(17, 36), rng.randint(17, 36)
    x = torch.randn((B, cin) + grid)
    w = torch.randn((cin, cout) + modes, dtype=torch.complex64)
    bias = torch.randn(cout) if rng.random() < 0.5 else None
    out = None
    if rng.random() < 0.4:
        out = tuple(max(m + 1, g + rng.randint(-2, 4)) for g, m in zip(grid[:-1], modes[:-1]))
        out += (max(2 * modes[-1], grid[-1] + rng.randint(-2, 4)),)

    def f(x, w, bias):
        return spectral_conv(x, w, bias, output_shape=out)

    return f"d={d} x{tuple(x.shape)} modes={modes} out={out}", f, [x, w, bias], {}


MAKERS = {"kan": _kan, "kernel_sum": _ksum, "spectral_conv": _spectral}
CALLS = {"kan": 300, "kernel_sum": 300, "spectral_conv": 100}
SEED = int(os.environ.get("OPFORGE_FUZZ_SEED", "7"))
TENSOR_CORES = os.environ.get("OPFORGE_FUZZ_TC", "0") == "1"
LOW = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[os.environ.get("OPFORGE_FUZZ_DTYPE",
                                                                                          "float32")]


def _cast(t, dtype):
    if not isinstance(t, torch.Tensor):
        return t
    dt = (torch.complex128 if dtype == F64 else torch.complex64) if t.is_complex() else dtype
    return t.detach().to(dt).requires_grad_()


def _cotangent(shape):
    """The output gradient every call's backward gets (float64; the same for every variant; in a 16-bit
    mode rounded to that dtype, so that it is the same there too)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    return _round(g)


def _round(t):
    """A real tensor rounded to the 16-bit dtype of the run (LOW), kept in its own dtype; else as it is."""
    if LOW is None or not isinstance(t, torch.Tensor) or t.is_complex():
        return t
    return t.to(LOW).to(t.dtype)


def _low_excess(got, want, allow, interpreted: bool, tf32_sums=None) -> float:
    """How far past its bound a 16-bit result is (> 0 fails): every element within u |ref| of its float64
    reference (rounded once to the 16-bit dtype) plus 2 * allow * max |ref| (the float32 computation's own
    error), u the dtype's unit roundoff; float16's subnormal spacing, 2^-24, or float32's smallest normal
    number added for underflow.
    ``interpreted``: a Triton kernel run by the interpreter. Under tensor-core emulation (OPFORGE_FUZZ_TC=1)
    bfloat16 data's TF32 products (truncated operands) get what they can add: where the call gives
    ``tf32_sums`` (KAN: per element, the sum of the magnitudes of the products it adds up), 2^-10 of it, each
    product's truncated operand being within 2^-10 of itself; elsewhere (``dft_gemm``'s up to four chained
    GEMM stages) a bfloat16 step, 2^-7, of max |ref|. The magnitudes matter where the products cancel: seed
    1208 drew a Fourier layer (x [1, 7], G = 2) whose output, 0.0168, summed 28 products with magnitudes adding
    to 11.1, and TF32 moved it by 3% (float16 and float32 data take 3xTF32). The interpreter's float32 ->
    bfloat16 casts truncate (Triton 3.6-3.9; compiled, they round to nearest even): the test rounds them to nearest
    (conftest's ``bf16_round_to_nearest``), so bfloat16 results are held to the same half step as float16's."""
    if want.numel() == 0:
        return 0.0
    tc = interpreted and TENSOR_CORES and LOW == torch.bfloat16
    tf32 = 2.0 ** -7 if tc and tf32_sums is None else 0.0
    if want.is_complex():  # a complex weight's gradient: the weight stays complex64, and so does its gradient,
        # as good as in a float32 call (bar bfloat16 data's TF32 products)
        return _err(got, want) - allow - tf32 if got.dtype == torch.complex64 else float("inf")
    if got.dtype != LOW:
        return float("inf")
    a, w = got.detach().double(), want.detach().double()
    u = 2.0 ** -8 if LOW == torch.bfloat16 else 2.0 ** -11
    # (and float32's underflow: seed 23 drew a Gaussian whose every value was ~1e-199, 0 in float32). The
    # allowances are relative to max |ref|, floored at 1e-300 as the kernel sums' floors divide by it: seed 1602
    # drew a Gaussian (D = 17) whose grad x was exactly 0 (a point of x on a point of y, the others so far that
    # k underflowed), where flash's expansion-form rounding, 9e-7 in bfloat16 as in float32, met a bound of 0
    bound = (u * w.abs() + (2 * allow + tf32) * w.abs().max().clamp_min(1e-300)
             + (2.0 ** -24 if LOW == torch.float16 else torch.finfo(torch.float32).tiny))
    if tc and tf32_sums is not None:
        bound = bound + 2.0 ** -10 * tf32_sums
    return float(((a - w).abs() - bound).max() / w.abs().max().clamp_min(1e-30))


def _run(f, inputs, dtype, **backend):
    """Output and the gradient of every tensor input, under ``use_backend(**backend)``."""
    ins = [_cast(t, dtype) for t in inputs]
    with use_backend(**backend):
        y = f(*ins)
        g = _cotangent(y.shape).to(y.dtype)
        leaves = [t for t in ins if isinstance(t, torch.Tensor)]
        return [y, *torch.autograd.grad((y * g).sum(), leaves, allow_unused=True)]


def _err(a, b) -> float:
    a, b = a.detach(), b.detach()
    if a.is_complex() or b.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


@pytest.mark.parametrize("op", list(MAKERS))
def test_random_calls_agree_across_variants_and_transforms(op, request):
    if TENSOR_CORES:  # the interpreter's dot products as a GPU's tensor cores compute them (conftest)
        request.getfixturevalue("tf32_tensor_cores")
    if LOW == torch.bfloat16:  # its float32 -> bfloat16 casts rounded to nearest, as compiled (conftest)
        request.getfixturevalue("bf16_round_to_nearest")
    variants = [v.name for v in get_op(op).triton_variants()]
    bad = []
    for i in range(CALLS[op]):
        rng = random.Random(1000 * i + SEED)
        torch.manual_seed(1000 * i + SEED)
        tag, f, inputs, extra = MAKERS[op](rng)  # extra: kernel sums' reorder and floors, KAN's tf32_sums
        inputs = [_round(t) for t in inputs]  # (16-bit mode: the data on the 16-bit grid, in float32)
        reorder = extra.get("reorder")
        want = _run(f, inputs, F64, backend="torch")
        yard = [_err(a, b) for a, b in zip(_run(f, inputs, torch.float32, backend="torch"), want)]
        if "floors" in extra:  # a floor per result: the rounding its sums are bound to carry in float32
            yard = [max(e, fl) for e, fl in zip(yard, extra["floors"](want))]
        if reorder:  # a second float32 sample: the torch variant summing in another order
            flipped, unflip = reorder(inputs)
            other = unflip(_run(f, flipped, torch.float32, backend="torch"))
            yard = [max(e, _err(a, b)) for e, a, b in zip(yard, other, want)]
        allow = [max(10 * y, 1e-4) for y in yard]  # what a float32 result may be off by, normalised
        if LOW is not None:
            sums = extra["tf32_sums"](inputs) if TENSOR_CORES and "tf32_sums" in extra else [None] * len(want)
            for v in ["torch"] + variants:
                try:
                    got = _run(f, inputs, LOW, backend="torch" if v == "torch" else "triton",
                               **({} if v == "torch" else {op: v}))
                except ValueError as e:
                    assert "cannot run here" in str(e), f"{tag}: {e}"
                    continue
                over = [_low_excess(a, b, al, v != "torch", m) for a, b, al, m in zip(got, want, allow, sums)]
                if any(o > 0 for o in over):
                    bad.append(f"{tag} {v} {LOW}: past the bound by {over} (of max |ref|)")
            continue
        for v in variants:
            try:
                got = _run(f, inputs, torch.float32, backend="triton", **{op: v})
            except ValueError as e:  # the variant does not take this call (order > 3, say)
                assert "cannot run here" in str(e), f"{tag}: {e}"
                continue
            errs = [_err(a, b) for a, b in zip(got, want)]
            if any(e > al for e, al in zip(errs, allow)):
                bad.append(f"{tag} {v}: errors {errs} vs float32 torch {yard}")
        # per-example gradients of the first input under vmap(grad): the plain math
        x, rest = _cast(inputs[0], F64).detach(), [_cast(t, F64) for t in inputs[1:]]
        v = torch.randn(f(x, *rest).shape, generator=torch.Generator().manual_seed(2), dtype=F64)
        xg = x.clone().requires_grad_()
        (ref,) = torch.autograd.grad((f(xg, *rest) * v).sum(), xg)
        per = vmap(grad(lambda xi, vi: (f(xi.unsqueeze(0), *rest).squeeze(0) * vi).sum()))(x, v)
        noise = 0.0
        if reorder:  # float64's own rounding: the usual path summing over y in reverse order (x is not flipped)
            flipped, _ = reorder([x] + rest)
            xf = x.clone().requires_grad_()
            (other,) = torch.autograd.grad((f(xf, *flipped[1:]) * v).sum(), xf)
            noise = _err(other, ref)
        if _err(per, ref) > max(1e-7, 10 * noise):
            bad.append(f"{tag} vmap(grad): error {_err(per, ref):.1e} (float64 summation-order noise {noise:.1e})")
    assert not bad, "\n".join(bad[:10])
