"""Kernel sums: NumPy reference vs the blocked torch variant vs the flash Triton variant (interpreter),
forward and backward (x, y, b, lengthscale), coincident points, edge sizes, the operator, CG and bad input.

The solves here are conjugate gradients (``method="cg"``, which "auto" takes only above 800 points); their
Cholesky path is tested in test_gp_cholesky.py."""
import functools

import numpy as np
import pytest
import torch

from opforge import kernels
from opforge.kernels import KERNELS, KernelOperator, get_op, kernel_matvec, use_backend
from opforge.reference import assert_close, assert_rounded_once
from opforge.reference import kernel_sum as ref

kernel_solve = functools.partial(kernels.kernel_solve, method="cg")
gp_posterior_mean = functools.partial(kernels.gp_posterior_mean, method="cg")

OP = get_op("kernel_sum")


def np64(t):
    return t.detach().double().numpy()


def points(n, m, d, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 0.3 * np.sqrt(d)
    x = (torch.rand(n, d, generator=g, dtype=torch.float64) / s).to(dtype)
    y = (torch.rand(m, d, generator=g, dtype=torch.float64) / s).to(dtype)
    b = torch.randn(m, r, generator=g, dtype=torch.float64).to(dtype)
    return x, y, b


def check(backend, kernel, n, m, d, r, dtype=torch.float32, ard=False, coincide=False):
    x, y, b = points(n, m, d, r, dtype)
    if coincide:
        y[: min(n, m)] = x[: min(n, m)]
    ls = (torch.linspace(0.7, 1.3, d, dtype=torch.float64) if ard else torch.tensor(0.9, dtype=torch.float64))
    ls = ls.to(torch.float64 if dtype == torch.float64 else torch.float32)
    os_ = torch.tensor(1.7, dtype=ls.dtype)
    for t in (x, y, b, ls, os_):
        t.requires_grad_(True)
    g = torch.randn(n, r, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with use_backend(backend):
        out = kernel_matvec(x, y, b, kernel, ls, os_)
        (out * g.to(dtype)).sum().backward()
    red = m * d
    assert_close(out, ref.kernel_matvec(np64(x), np64(y), np64(b), kernel, np64(ls), 1.7), dtype, red, "forward")
    dx, dy, db, dl = ref.kernel_matvec_vjp(np64(x), np64(y), np64(b), g.numpy(), kernel, np64(ls), 1.7)
    for name, got, want in (("x", x.grad, dx), ("y", y.grad, dy), ("b", b.grad, db), ("lengthscale", ls.grad, dl)):
        assert torch.isfinite(got).all(), f"non-finite grad {name}"
        assert_close(got, want, dtype, red * n, f"{backend} {kernel} grad {name}")
    want_os = float((np64(out) / 1.7 * g.numpy()).sum())
    assert abs(os_.grad.item() - want_os) <= 1e-3 * max(1.0, abs(want_os))


@pytest.mark.parametrize("kernel", KERNELS)
def test_torch_float64_matches_reference(kernel):
    check("torch", kernel, 13, 11, 3, 2, torch.float64, ard=True)
    check("torch", kernel, 9, 12, 17, 1, torch.float64)


@pytest.mark.parametrize("kernel", KERNELS)
def test_torch_in_place_blocks_match_reference(kernel, monkeypatch):
    """The torch variant's no-graph loops of calls past 2^15 pairs (temporaries made in place in buffers
    reused from block to block, ``_Scratch``; kernel values and derivatives sharing their exponentials),
    forced on small calls of several row blocks, the last one shorter: forward and every gradient."""
    from opforge.kernels import kernel_sum as ks

    monkeypatch.setattr(ks, "_pays", lambda p, q: True)
    monkeypatch.setattr(ks, "_chunk_rows", lambda m, device: 4)
    check("torch", kernel, 13, 11, 3, 2, torch.float64, ard=True)
    check("torch", kernel, 9, 12, 17, 1, torch.float64)
    check("torch", kernel, 10, 7, 2, 1, torch.float64, coincide=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("d, r", [(3, 1), (4, 2), (5, 3), (17, 5), (1, 16)])
def test_flash_matches_reference(kernel, d, r):
    check("triton", kernel, 37, 29, d, r, ard=(d == 3))


@pytest.mark.parametrize("d, r, kernel", [(3, 1, "gaussian"), (17, 5, "laplacian"), (24, 16, "imq")])
def test_flash_column_splits(d, r, kernel):
    """SPLIT_M > 1 (few row blocks on a big GPU): the columns are cut into splits whose float32 partials
    are summed after the kernels; forward and every gradient agree with the unsplit run (the
    last split is shorter)."""
    from opforge.kernels._registry import Case

    case = Case("split", {"n": 19, "m": 45, "d": d, "r": r, "kernel": kernel})
    p, (x, y, b) = OP.make_inputs(case, "cpu", torch.float32, requires_grad=True)
    g = torch.randn(1, 19, r, generator=torch.Generator().manual_seed(1))
    results = []
    for split in (1, 3):
        cfg = {"BLOCK_N": 16, "BLOCK_M": 16, "num_warps": 4, "num_stages": 2, "SPLIT_M": split}
        out = OP.run_variant("flash", p, x, y, b, config=cfg)
        results.append([out.detach()] + list(torch.autograd.grad(out, (x, y, b), g)))
    for one, split in zip(*results):
        torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)
    assert_close(results[1][0][0], ref.kernel_matvec(np64(x[0]), np64(y[0]), np64(b[0]), kernel), torch.float32,
                 45 * d, "split forward")


@pytest.mark.parametrize("d, r, kernel", [(20, 1, "gaussian"), (20, 16, "imq"), (129, 3, "gaussian"),
                                          (72, 16, "cauchy")])
def test_flash_float32_under_tf32_tensor_cores(d, r, kernel, tf32_tensor_cores):
    """float32 forward and every gradient within float32's tolerance when each dot product is computed as the
    tensor cores compute it (conftest's tf32_tensor_cores): with the points split for 3xTF32 on the host
    (PRESPLIT) and with Triton's own split, and, for D > 64, the grad kernel holding every coordinate or
    one program per 64-coordinate block (GRAD_SPLIT_D), whatever the defaults at this D."""
    from opforge.kernels._registry import Case

    case = Case("tc", {"n": 21, "m": 35, "d": d, "r": r, "kernel": kernel})
    p, (x, y, b) = OP.make_inputs(case, "cpu", torch.float32, requires_grad=True)
    x.data.mul_(1.0 / (0.3 * d ** 0.5))  # distances of order 1: the kernel values and gradients are not all ~0
    y.data.mul_(1.0 / (0.3 * d ** 0.5))
    g = torch.randn(1, 21, r, generator=torch.Generator().manual_seed(2))
    x64, y64, b64 = np64(x[0]), np64(y[0]), np64(b[0])
    want = [ref.kernel_matvec(x64, y64, b64, kernel)]
    want += list(ref.kernel_matvec_vjp(x64, y64, b64, g[0].double().numpy(), kernel, 1.0, 1.0)[:3])
    base = OP.variants["flash"].default_config(p)
    layouts = [{"PRESPLIT": pre, "GRAD_SPLIT_D": gs} for pre in (0, 1) for gs in ((0, 1) if d > 64 else (0,))]
    for extra in layouts:
        cfg = dict(base, BLOCK_N=16, BLOCK_M=16, **extra)
        out = OP.run_variant("flash", p, x, y, b, config=cfg)
        got = [out.detach()] + list(torch.autograd.grad(out, (x, y, b), g))
        for name, a, w in zip(("forward", "grad x", "grad y", "grad b"), got, want):
            assert_close(a[0], w, torch.float32, 35 * d * (21 if name != "forward" else 1), f"{extra} {name}")
    assert "TF32" in {str(t).rsplit(".", 1)[-1] for t in tf32_tensor_cores}, "no TF32 dot product ran"


@pytest.mark.parametrize("d, r, kernel", [(3, 1, "gaussian"), (3, 3, "matern32"), (20, 16, "imq"),
                                          (5, 2, "laplacian")])
def test_flash_backward_for_any_subset_of_inputs(d, r, kernel):
    """The flash backward computes what is asked for, and that right: grad b summed in grad y's pass
    (GRAD_B_FUSED, the default, when both are asked for) or in a pass of its own, with one and two column
    splits (the second output's partial sums)."""
    from opforge.kernels._registry import Case

    case = Case("subsets", {"n": 23, "m": 31, "d": d, "r": r, "kernel": kernel})
    p, (x0, y0, b0) = OP.make_inputs(case, "cpu", torch.float32)
    g = torch.randn(1, 23, r, generator=torch.Generator().manual_seed(3))
    want = ref.kernel_matvec_vjp(np64(x0[0]), np64(y0[0]), np64(b0[0]), g[0].double().numpy(), kernel, 1.0, 1.0)
    base = OP.variants["flash"].default_config(p)
    for wants in ((True, False, False), (False, True, False), (False, False, True), (False, True, True),
                  (True, False, True), (True, True, True)):
        for extra in ({"SPLIT_M": 1}, {"SPLIT_M": 2}, {"SPLIT_M": 1, "GRAD_B_FUSED": 0}):
            x, y, b = (t.clone().requires_grad_(w) for t, w in zip((x0, y0, b0), wants))
            out = OP.run_variant("flash", p, x, y, b, config=dict(base, BLOCK_N=16, BLOCK_M=16, **extra))
            got = torch.autograd.grad(out, [t for t in (x, y, b) if t.requires_grad], g)
            names = [n for n, w in zip(("x", "y", "b"), wants) if w]
            wanted = [w for w, on in zip(want[:3], wants) if on]
            for name, a, w in zip(names, got, wanted):
                assert_close(a[0], w, torch.float32, 23 * 31 * d, f"{wants} {extra} grad {name}")


@pytest.mark.parametrize("d, r, kernel", [(3, 1, "gaussian"), (3, 2, "matern32"), (20, 16, "imq"),
                                          (17, 5, "laplacian"), (129, 3, "gaussian")])
def test_flash_one_tensor_of_points(d, r, kernel, monkeypatch):
    """K(X, X) with x and y one tensor: the flash backward takes the points' whole gradient (as rows and as
    columns) in one grad pass (SYM), grad b in it where grad y would hold it, and agrees with the reference's
    grad x + grad y, the lengthscale's gradient too."""
    from opforge.kernels import kernel_sum as ks

    syms = []
    real = ks._launch
    monkeypatch.setattr(ks, "_launch", lambda *a, **k: (syms.append(k.get("sym", False)), real(*a, **k))[1])
    x, _, b = points(27, 27, d, r, seed=4)
    ls = torch.tensor(0.9, requires_grad=True)
    for t in (x, b):
        t.requires_grad_(True)
    g = torch.randn(27, r, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with use_backend("triton"):
        out = kernel_matvec(x, x, b, kernel, ls)
        (out * g.float()).sum().backward()
    assert True in syms and len(syms) == (2 if d <= 128 else 3), syms  # forward, one grad pass (+ grad b's)
    x64, b64 = np64(x), np64(b)
    assert_close(out, ref.kernel_matvec(x64, x64, b64, kernel, 0.9), torch.float32, 27 * d, "forward")
    dx, dy, db, dl = ref.kernel_matvec_vjp(x64, x64, b64, g.numpy(), kernel, 0.9, 1.0)
    assert_close(x.grad, dx + dy, torch.float32, 27 * 27 * d, "grad of the points")
    assert_close(b.grad, db, torch.float32, 27, "grad b")
    assert abs(ls.grad.item() - float(dl)) <= 1e-3 * max(1.0, abs(float(dl))), (ls.grad.item(), float(dl))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kernel", ["laplacian", "matern32", "matern52"])
@pytest.mark.parametrize("d", [2, 24])
def test_coincident_points_have_finite_gradients(backend, kernel, d):
    check(backend, kernel, 10, 8, d, 2, coincide=True)


def test_gradcheck_torch_path():
    x, y, b = points(5, 4, 3, 2, torch.float64)
    ls = torch.tensor([0.8, 1.1, 1.4], dtype=torch.float64)
    for t in (x, y, b, ls):
        t.requires_grad_(True)
    for kernel in KERNELS:
        assert torch.autograd.gradcheck(lambda x, y, b, ls: kernel_matvec(x, y, b, kernel, ls), (x, y, b, ls))


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)])
def test_torch_backward_for_any_subset_of_inputs(wants, monkeypatch):
    """The one-pass blocked backward computes only what is asked for, and that right (batched, R = 2, rows
    spanning several blocks of the torch variant)."""
    from opforge.kernels import kernel_sum as ks

    x, y, b = points(9, 7, 3, 2, torch.float64)
    x, y, b = x.expand(2, -1, -1).clone(), y.expand(2, -1, -1).clone(), b.expand(2, -1, -1).clone()
    ts = [t.requires_grad_(w) for t, w in zip((x, y, b), wants)]
    g = torch.randn(2, 9, 2, dtype=torch.float64)
    monkeypatch.setattr(ks, "_chunk_rows", lambda m, device: 4)  # several row blocks
    with use_backend("torch"):
        got = torch.autograd.grad(kernel_matvec(x, y, b, "matern52", 0.7), [t for t in ts if t.requires_grad], g)
    xd, yd, bd = (t.detach().requires_grad_(w) for t, w in zip((x, y, b), wants))
    r = torch.cdist(xd, yd) / 0.7
    kmat = (1 + 5 ** 0.5 * r + 5 / 3 * r ** 2) * torch.exp(-(5 ** 0.5) * r)
    want = torch.autograd.grad(kmat @ bd, [t for t in (xd, yd, bd) if t.requires_grad], g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)


def test_flash_says_why_it_cannot_run():
    """Calls past the flash kernel's limits name the limit when Triton is asked for (auto takes torch)."""
    for shape_x, shape_b, dtype, match in (((4, 257), (5, 1), torch.float32, "D <= 256, got 257"),
                                            ((4, 3), (5, 129), torch.float32, "R <= 128"),
                                            ((4, 3), (5, 1), torch.float64, "float64 runs on torch")):
        x = torch.randn(shape_x, dtype=dtype)
        y = torch.randn(5, shape_x[1], dtype=dtype)
        b = torch.randn(shape_b, dtype=dtype)
        with use_backend("triton"), pytest.raises(ValueError, match=match):
            kernel_matvec(x, y, b)
        assert kernel_matvec(x, y, b).shape == (4, shape_b[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_sizes_d129_and_tiny(backend):
    with use_backend(backend):
        check(backend, "gaussian", 19, 21, 129, 3)  # distances by blocks of 64 coordinates, grad by blocks
        check(backend, "laplacian", 19, 21, 129, 3)  # exact differences, grad by coordinate blocks
        for n, m in ((1, 1), (1, 7), (6, 1)):
            check(backend, "matern52", n, m, 2, 1)
        x, y, b = points(0, 5, 3, 2)
        assert kernel_matvec(x, y, b).shape == (0, 2)
        x, y, b = points(4, 0, 3, 2)
        out = kernel_matvec(x, y, b)
        assert out.shape == (4, 2) and not out.any()
        # no coordinates: every distance is 0, so out = sum_j b_j; gradients of their shapes, D = 0 included
        x, y, b = (torch.randn(s, requires_grad=True) for s in ((4, 0), (5, 0), (5, 2)))
        for kernel in KERNELS:
            out = kernel_matvec(x, y, b, kernel)
            torch.testing.assert_close(out, b.detach().sum(0).expand(4, 2))
            gx, gy, gb = torch.autograd.grad(out.sum(), (x, y, b))
            assert gx.shape == (4, 0) and gy.shape == (5, 0)
            torch.testing.assert_close(gb, torch.full((5, 2), 4.0))


def test_flash_bfloat16():
    x, y, b = points(33, 45, 3, 4, torch.bfloat16)
    with use_backend("triton"):
        out = kernel_matvec(x, y, b, "gaussian", 0.8)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref.kernel_matvec(np64(x), np64(y), np64(b), "gaussian", 0.8), torch.bfloat16, 45 * 3)


@pytest.mark.parametrize("kernel, r", [("gaussian", 1), ("cauchy", 16)])
def test_flash_16bit_distances_are_3xtf32(kernel, r, tf32_tensor_cores, bf16_round_to_nearest):
    """bfloat16 data far from its centre (3 lengthscales per coordinate, D = 64) in pairs 0.1 apart: |x|^2 ~ 600
    against r^2 ~ 0.6. The kernels take the points centred and scaled in float32; with TF32 distances (what
    16-bit data had before) the sums came out 40% off (truncated operands err alike in the 64 products of
    x_d ~ y_d: ~1 in r^2). 3xTF32 keeps each output within half a bfloat16 step of the float64 sum (tensor-core
    dot products and round-to-nearest bfloat16 casts as a GPU makes them: conftest's tf32_tensor_cores and
    bf16_round_to_nearest)."""
    gen = torch.Generator().manual_seed(5)
    y = (3 * torch.randn(40, 64, generator=gen)).bfloat16()
    x = (y[:24].float() + 0.1 * torch.randn(24, 64, generator=gen)).bfloat16()
    b = torch.rand(40, r, generator=gen).bfloat16()  # (positive: no cancellation in the sums)
    want = torch.from_numpy(ref.kernel_matvec(np64(x), np64(y), np64(b), kernel))
    with use_backend("triton"):
        got = kernel_matvec(x, y, b, kernel).double()
    assert tf32_tensor_cores, "no dot product ran"
    step = (got - want).abs() / want.abs()
    assert step.max() <= 2.0 ** -8, f"{kernel}: {step.max():.2e} of the sum, past half a bfloat16 step"


@pytest.mark.parametrize("variant", ["torch", "flash"])
def test_16bit_results_are_rounded_once(variant):
    """float16 data with an outputscale and ARD lengthscales: the output and every gradient within one rounding
    (2^-11) of their float64 values on the same float16 inputs (plus float32's own error). The sum was rounded
    to 16 bits, then times the outputscale rounded again, and the backward rounded g * outputscale to 16 bits
    before the kernels (float16: the interpreter rounds float32 -> bfloat16 by truncation, unlike a GPU)."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(29, 5, generator=gen).half(), torch.randn(23, 5, generator=gen).half()
    b, g = torch.randn(23, 3, generator=gen).half(), torch.randn(29, 3, generator=gen).half()
    ls, os_ = (torch.rand(5, generator=gen) + 0.5).half(), torch.tensor(1.7).half()

    def run(dtype, backend, **pin):
        ins = [t.to(dtype).requires_grad_() for t in (x, y, b, ls, os_)]
        with use_backend(backend, **pin):
            out = kernel_matvec(*ins[:3], "matern52", lengthscale=ins[3], outputscale=ins[4])
        return [out, *torch.autograd.grad(out, ins, g.to(dtype))]

    want = run(torch.float64, "torch")
    got = run(torch.float16, "torch") if variant == "torch" else run(torch.float16, "triton", kernel_sum=variant)
    for name, a, e in zip(("out", "grad x", "grad y", "grad b", "grad lengthscale", "grad outputscale"), got, want):
        assert a.dtype == torch.float16
        assert_rounded_once(a, e, 1e-5, f"{variant} {name}")


def test_vector_b_batches_and_broadcast():
    x, y, b = points(6, 5, 3, 2)
    torch.testing.assert_close(kernel_matvec(x, y, b[:, 0]), kernel_matvec(x, y, b)[:, 0])
    xb = torch.stack([x, x + 0.5])
    out = kernel_matvec(xb, y, b)  # y and b broadcast over the batch
    assert out.shape == (2, 6, 2)
    torch.testing.assert_close(out[1], kernel_matvec(x + 0.5, y, b))
    with use_backend("triton"):
        torch.testing.assert_close(kernel_matvec(xb, y, b), out, rtol=1e-5, atol=1e-6)
    # batched y with b [M, R] or [M] shared by the batch (b with fewer leading dims than y)
    yb = torch.stack([y, y - 0.25])
    for bs in (b, b[:, 0]):
        for backend in ("torch", "triton"):
            with use_backend(backend):
                got = kernel_matvec(xb, yb, bs)
            want = torch.stack([kernel_matvec(xb[i], yb[i], bs) for i in range(2)])
            assert got.shape == want.shape == (2, 6) + bs.shape[1:]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # more leading dims on b than on the points: they broadcast too
    assert kernel_matvec(x, y, torch.randn(3, 5, 2)).shape == (3, 6, 2)
    # b [M, M] with batched points: R = M columns unless its leading dim batches vectors
    sq = torch.randn(5, 5)
    got = kernel_matvec(xb, yb, sq)  # batch 2 against b's leading 5: columns
    assert got.shape == (2, 6, 5)
    torch.testing.assert_close(got[1], kernel_matvec(xb[1], yb[1], sq))
    y5 = torch.randn(5, 5, 3)
    got = kernel_matvec(x, y5, sq)  # y batch 5 against b's leading 5: vectors, one per batch entry
    assert got.shape == (5, 6)
    torch.testing.assert_close(got[2], kernel_matvec(x, y5[2], sq[2]))


@pytest.mark.parametrize("d", [3, 6, 8, 17])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_keep_float32_accuracy_at_coincident_points(backend, d):
    """K(X, X): every point meets itself, with the largest weight k'(0) of its row, but contributes nothing
    to its own gradient. Computed as x_i sum_j w_ij - sum_j w_ij y_j, the two terms cancel and leave an
    error of eps |x_i| sum_j |w_ij| (1e-4 relative at D = 8, points spread over 6 lengthscales, before);
    with differences x_i - y_j it stays at float32 rounding. (D = 17, a square-root kernel: flash keeps
    that form on exact distances there and leaves the coincident pairs, whose term is 0, out of it.)"""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(150, d, generator=g, dtype=torch.float64) * 6
    b = torch.randn(150, 1, generator=g, dtype=torch.float64)
    grads = {}
    for dt in (torch.float64, torch.float32):
        xx = x.to(dt).requires_grad_()
        with use_backend("torch" if dt == torch.float64 else backend):
            (grads[dt],) = torch.autograd.grad(kernel_matvec(xx, xx, b.to(dt), "matern52").sum(), xx)
    err = (grads[torch.float32].double() - grads[torch.float64]).abs().max() / grads[torch.float64].abs().max()
    assert err < 5e-6



@pytest.mark.parametrize("d, kernel", [(3, "gaussian"), (16, "gaussian"), (16, "imq")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_points_far_from_the_origin_keep_float32_accuracy(backend, d, kernel):
    """Data 100 away from the origin (1 apart): the points are centred, then divided by the lengthscale.
    Divided first, their rounding at magnitude 100 / l put eps 100 / l into every distance (flash's D = 3
    grad x: 2e-5 relative error), and the lengthscale's gradient by autograd, -(sum x.gx + sum y.gy) / l^2,
    held centre . (sum gx + sum gy), zero in exact arithmetic but in float32 the point gradients' rounding
    times 100 (1e-5 to 7e-5 relative error, both variants). Centred first, all stay under 1e-6 (seeds 0-3).
    The data are float32 values, so that the float64 reference sees the points the float32 call sees."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, d, generator=g, dtype=torch.float64) + 100
    y = torch.randn(45, d, generator=g, dtype=torch.float64) + 100
    b = torch.randn(45, 2, generator=g, dtype=torch.float64)
    v = torch.randn(60, 2, generator=g, dtype=torch.float64)
    x, y, b = (t.float().double() for t in (x, y, b))
    ls0 = 0.5 if d == 3 else 3.0
    grads = {}
    for dt in (torch.float64, torch.float32):
        xx = x.to(dt).requires_grad_()
        ls = torch.full((d,), ls0, dtype=dt, requires_grad=True)
        with use_backend("torch" if dt == torch.float64 else backend):
            out = kernel_matvec(xx, y.to(dt), b.to(dt), kernel, lengthscale=ls)
        grads[dt] = torch.autograd.grad((out * v.to(dt)).sum(), (xx, ls))
    for name, got, want in zip(("x", "lengthscale"), grads[torch.float32], grads[torch.float64]):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 2e-6, f"grad {name}: relative error {err:.1e}"

@pytest.mark.parametrize("d", [3, 6, 20])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_points_give_nan_sums(backend, d):
    """A NaN coordinate makes its row of the output NaN, and NaN everywhere when it is in y (every row sums
    over it); a clamp of the squared distances at 0 must not turn NaN into 'coincident' (k = 1)."""
    x, y, b = points(5, 6, d, 2)
    with use_backend(backend):
        clean = kernel_matvec(x, y, b)
        x[2, d - 1] = float("nan")
        out = kernel_matvec(x, y, b)
        assert torch.isnan(out[2]).all()
        torch.testing.assert_close(out[[0, 1, 3, 4]], clean[[0, 1, 3, 4]])
        y[4, 0] = float("nan")
        assert torch.isnan(kernel_matvec(x, y, b)).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_operator_16bit_rounded_once(backend):
    """float16 points: ``A @ b`` with noise and ``A.diag()`` off the diagonal of K(X, X) within one rounding
    (2^-11) of their float64 values on the same inputs, plus float32's error (the noise term was added to the
    16-bit kernel sum, two roundings; the diagonal was computed in float16 throughout)."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(31, 4, generator=gen).half(), torch.randn(31, 4, generator=gen).half()
    b = torch.randn(31, 2, generator=gen).half()
    kw = dict(kernel="cauchy", lengthscale=0.7, outputscale=1.3, noise=0.37)
    want_mv = KernelOperator(x.double(), y.double(), **kw) @ b.double()
    want_d = KernelOperator(x.double(), y.double(), **kw).diag()
    with use_backend(backend):
        got_mv = KernelOperator(x, y, **kw) @ b
        got_d = KernelOperator(x, y, **kw).diag()
    for name, a, e in (("A @ b", got_mv, want_mv), ("diag", got_d, want_d)):
        assert a.dtype == torch.float16
        assert_rounded_once(a, e, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_solve_16bit_solves_in_float32(dtype):
    """16-bit points and targets: alpha within one 16-bit rounding of the float64 solve on the same inputs
    (normalised), and y's gradient comes back in y's dtype. Solved in 16 bits, CG reported a converged
    residual of 7e-7 for a bfloat16 alpha 6% off."""
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(200, 2, generator=gen).to(dtype)
    y = torch.sin(6 * x[:, 0].float()).to(dtype).requires_grad_()
    alpha, info = kernel_solve(x, y, noise=0.05, lengthscale=0.3, return_info=True)
    want = kernel_solve(x.double(), y.detach().double(), noise=0.05, lengthscale=0.3)
    assert alpha.dtype == dtype and info["converged"]
    err = float((alpha.detach().double() - want).abs().max() / want.abs().max())
    assert err <= 2.0 ** -(8 if dtype == torch.bfloat16 else 11), err
    (gy,) = torch.autograd.grad(alpha.sum(), y)
    assert gy.dtype == dtype and torch.isfinite(gy.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gp_posterior_mean_16bit_rounded_once(dtype):
    """16-bit GP data: the posterior mean within one 16-bit rounding of the float64 mean on the same inputs
    (normalised). With alpha rounded to bfloat16 between the solve and the kernel sum it was 8% off."""
    gen = torch.Generator().manual_seed(9)
    x, xt = torch.rand(300, 2, generator=gen), torch.rand(100, 2, generator=gen)
    y = torch.sin(6 * x[:, 0]) + 0.1 * torch.randn(300, generator=gen)
    x, y, xt = (t.to(dtype) for t in (x, y, xt))
    got = gp_posterior_mean(x, y, xt, noise=0.01, lengthscale=0.2)
    want = gp_posterior_mean(x.double(), y.double(), xt.double(), noise=0.01, lengthscale=0.2)
    assert got.dtype == dtype
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= 2.0 ** -(8 if dtype == torch.bfloat16 else 11), err


def test_operator_and_cg_solve():
    x, _, _ = points(40, 1, 2, 1, torch.float64)
    A = KernelOperator(x, kernel="matern52", lengthscale=0.5, outputscale=2.0, noise=0.1)
    K = 2.0 * ref.kernel_matrix(np64(x), np64(x), "matern52", 0.5) + 0.1 * np.eye(40)
    v = torch.randn(40, dtype=torch.float64)
    np.testing.assert_allclose((A @ v).numpy(), K @ v.numpy(), rtol=1e-10)
    np.testing.assert_allclose((A.T @ v).numpy(), K.T @ v.numpy(), rtol=1e-10)
    np.testing.assert_allclose((v @ A).numpy(), v.numpy() @ K, rtol=1e-10)  # v @ A, as A.T @ v
    np.testing.assert_allclose(A.to_dense().numpy(), K, rtol=1e-10)
    xb = torch.randn(3, 7, 2, dtype=torch.float64)
    Ab = KernelOperator(xb, x[:5], kernel="imq")
    assert Ab.shape == (3, 7, 5) and Ab.T.shape == (3, 5, 7) and Ab.to_dense().shape == (3, 7, 5)
    torch.testing.assert_close(Ab.to_dense() @ v[:5], Ab @ v[:5])
    vb = torch.randn(3, 4, 7, dtype=torch.float64)  # batched rows on the left: [3, 4, 7] @ [3, 7, 5]
    torch.testing.assert_close(vb @ Ab, vb @ Ab.to_dense())
    torch.testing.assert_close(v[:7] @ Ab, v[:7] @ Ab.to_dense())
    np.testing.assert_allclose(A.diag().numpy(), np.diag(K), rtol=1e-12)
    assert A.shape == (40, 40)
    assert repr(A) == ("KernelOperator(kernel='matern52', shape=(40, 40), lengthscale=0.5, outputscale=2, noise=0.1, "
                       "dtype=torch.float64, device=cpu)")
    assert "lengthscale=tensor[2]" in repr(KernelOperator(x, lengthscale=torch.ones(2, dtype=torch.float64)))
    rhs = torch.randn(40, 3, dtype=torch.float64)
    alpha, info = kernel_solve(x, rhs, "matern52", noise=0.1, lengthscale=0.5, outputscale=2.0, tol=1e-10,
                               return_info=True)
    np.testing.assert_allclose(alpha.numpy(), np.linalg.solve(K, rhs.numpy()), rtol=1e-6, atol=1e-8)
    assert info["iterations"] < 200  # converged well before max_iter (CG in floating point may pass N)
    assert info["converged"]
    with pytest.warns(RuntimeWarning, match="did not converge in max_iter=3"):  # never silently unconverged
        _, info = kernel_solve(x, rhs, "matern52", noise=0.1, lengthscale=0.5, outputscale=2.0, tol=1e-10,
                               max_iter=3, return_info=True, precond_rank=0)
    assert not info["converged"] and info["iterations"] == 3
    xg = x.clone().requires_grad_()  # the backward's solve is checked as well: it warns on its own
    with pytest.warns(RuntimeWarning) as caught:
        kernel_solve(xg, rhs, "matern52", noise=0.1, lengthscale=0.5, tol=1e-10, max_iter=3, precond_rank=0
                     ).square().sum().backward()
    heads = [str(w.message).split(" (")[0] for w in caught]  # the forward's solve, then the backward's
    assert len(heads) == 2 and heads[0].endswith("max_iter=3 iterations"), heads
    assert heads[1].endswith("max_iter=3 iterations in the backward pass"), heads
    zero, info = kernel_solve(x, torch.zeros(40, 2, dtype=torch.float64), "matern52", noise=0.1, return_info=True)
    assert not zero.any() and info["converged"] and info["iterations"] == 0  # b = 0: solved before any step


def test_solve_of_non_finite_inputs_is_an_error_and_its_gradient_nan(monkeypatch):
    """A NaN or inf in a solve's points or targets is an error naming them (it used to reach conjugate
    gradients: an inf y "converged" before any step and came back as zeros, a NaN one ran max_iter kernel
    sums, a NaN x failed in the preconditioner's Cholesky); an overflow within the solve stops it with a
    message; a non-finite incoming gradient gives NaN gradients without a CG solve."""
    from opforge.kernels import kernel_sum as ks

    x, _, _ = points(30, 1, 2, 1, torch.float64)
    y = torch.randn(30, dtype=torch.float64)
    for bad_x, bad_y, names in ((True, False, "x"), (False, True, "y"), (True, True, "x and y")):
        for poison in (float("nan"), float("inf")):
            xb, yb = x.clone(), y.clone()
            if bad_x:
                xb[3, 1] = poison
            if bad_y:
                yb[7] = -poison
            with pytest.raises(ValueError, match=f"^{names} must be finite for a solve"):
                kernel_solve(xb, yb, "matern52", noise=0.1)
            with pytest.raises(ValueError, match=f"^{names.replace('x', 'x_train').replace('y', 'y_train')} must"):
                gp_posterior_mean(xb, yb, x[:3], "matern52", noise=0.1)
    with pytest.raises(ValueError, match=r"x_test must be \[\.\.\., N_test, D=2\] points like x_train"):
        gp_posterior_mean(x, y, torch.randn(4, 3, dtype=torch.float64), noise=0.1)
    with pytest.raises(ValueError, match=r"y_train must be \[\.\.\., N=30\] vectors or \[\.\.\., N=30, R\] columns"):
        gp_posterior_mean(x, y[:5], x, noise=0.1)
    with pytest.raises(TypeError, match="x must be a real floating tensor, got list"):
        kernel_solve([[0.0, 1.0]], y[:1])
    with pytest.raises(ValueError, match="overflow in torch.float32"):  # |y|^2 past float32's range
        kernel_solve(x.float(), y.float() * 1e30, noise=0.1)
    calls = []
    real_cg = ks._cg
    monkeypatch.setattr(ks, "_cg", lambda *a, **k: calls.append(1) or real_cg(*a, **k))
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    for poison in (float("nan"), float("inf")):
        sol = kernel_solve(xg, yg, "matern52", noise=0.1)
        n = len(calls)
        gx, gy = torch.autograd.grad(sol, (xg, yg), torch.full_like(sol, poison))
        assert len(calls) == n and gx.isnan().all() and gy.isnan().all()


def test_kernel_solve_warm_start():
    """x0 (scipy's x0, GPyTorch's initial_guess): the last alpha as the start of a solve whose lengthscale
    moved a little takes fewer iterations to the same answer; the exact answer takes none; batched and
    16-bit forms; the gradients do not depend on it."""
    torch.manual_seed(0)
    x = torch.rand(300, 2, dtype=torch.float64)
    y = torch.randn(300, dtype=torch.float64)
    kw = dict(kernel="matern52", noise=1e-2, precond_rank=0, tol=1e-8, return_info=True)
    a, _ = kernel_solve(x, y, lengthscale=0.2, **kw)
    cold, info_cold = kernel_solve(x, y, lengthscale=0.21, **kw)
    warm, info_warm = kernel_solve(x, y, lengthscale=0.21, x0=a, **kw)
    assert info_warm["converged"] and info_warm["iterations"] < info_cold["iterations"]
    torch.testing.assert_close(warm, cold, rtol=1e-6, atol=1e-6 * float(cold.abs().max()))
    _, info = kernel_solve(x, y, lengthscale=0.2, **kw, x0=a)
    assert info["iterations"] == 0 and info["converged"]
    ys = torch.randn(2, 300, 3, dtype=torch.float64)  # batched columns; x0 [300, 3] broadcasts to [2, 300, 3]
    want = kernel_solve(x, ys, "gaussian", noise=0.1, lengthscale=0.3)
    got = kernel_solve(x, ys, "gaussian", noise=0.1, lengthscale=0.3, x0=want[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    got16 = kernel_solve(x.float().bfloat16(), y.float().bfloat16(), "gaussian", noise=0.1, lengthscale=0.3,
                         x0=torch.zeros(300, dtype=torch.bfloat16))
    assert got16.dtype == torch.bfloat16
    grads = []
    for start in (None, a):
        ls = torch.tensor(0.21, dtype=torch.float64, requires_grad=True)
        xg = x.clone().requires_grad_()
        alpha = kernel_solve(xg, y, "matern52", noise=1e-2, lengthscale=ls, tol=1e-10, x0=start)
        grads.append(torch.autograd.grad(alpha.square().sum(), [ls, xg]))
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6 * float(g0.abs().max()))


@pytest.mark.parametrize("kernel", ["matern52", "gaussian", "laplacian"])
def test_pivoted_cholesky_preconditioner(kernel):
    """The preconditioned solve gives the dense solution, with batched ARD lengthscales too, in far fewer
    iterations than plain CG (the gaussian's low-rank kernel matrix most of all)."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 300, 2, generator=g, dtype=torch.float64)
    rhs = torch.randn(2, 300, 2, generator=g, dtype=torch.float64)
    ls = torch.tensor([[[0.2, 0.3]], [[0.3, 0.25]]], dtype=torch.float64)
    r = torch.cdist(x / ls, x / ls, compute_mode="donot_use_mm_for_euclid_dist")  # exact 0 on the diagonal
    K = {"gaussian": torch.exp(-r ** 2 / 2), "laplacian": torch.exp(-r),
         "matern52": (1 + 5 ** 0.5 * r + 5 / 3 * r ** 2) * torch.exp(-(5 ** 0.5) * r)}[kernel]
    want = torch.linalg.solve(1.5 * K + 1e-2 * torch.eye(300, dtype=x.dtype), rhs)
    its = {}
    for rank in (0, 16, 64):
        alpha, info = kernel_solve(x, rhs, kernel, noise=1e-2, lengthscale=ls, outputscale=1.5, tol=1e-10,
                                   return_info=True, precond_rank=rank)
        torch.testing.assert_close(alpha, want, rtol=1e-6, atol=1e-6)
        assert info["converged"] and info["precond_rank"] == rank
        its[rank] = info["iterations"]
    assert its[64] < its[16] < its[0] and its[64] <= its[0] // 3, its


def test_preconditioner_with_a_low_rank_batch_entry():
    """A batch entry whose kernel matrix has rank 1 (all its points coincide) runs out of pivots long before
    the rank: its further factor rows are zero (not a rounding-level column over the square root of a
    rounding-level, possibly negative, pivot) while the other entry goes on; both solves are exact."""
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 50, 3, generator=g, dtype=torch.float64)
    x[1] = x[1, :1]  # 50 copies of one point
    rhs = torch.randn(2, 50, generator=g, dtype=torch.float64)
    r = torch.cdist(x / 0.3, x / 0.3, compute_mode="donot_use_mm_for_euclid_dist")
    want = torch.linalg.solve(torch.exp(-r ** 2 / 2) + 0.1 * torch.eye(50, dtype=x.dtype), rhs.unsqueeze(-1))[..., 0]
    alpha, info = kernel_solve(x, rhs, "gaussian", noise=0.1, lengthscale=0.3, tol=1e-12, return_info=True,
                               precond_rank=16)
    assert info["converged"]
    torch.testing.assert_close(alpha, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_hyperparameters(backend):
    """GPyTorch's layout: lengthscale [..., 1, D] or [..., 1, 1], outputscale [...]; their batch dims
    broadcast with the points'. Each batch entry (and its gradients) is the unbatched call with its own
    hyperparameters. Before, a [1, 1, 1] lengthscale raised torch's expand error and a [1, 1, 1]
    outputscale silently added dims to the output."""
    g = torch.Generator().manual_seed(5)
    x, y, b = torch.randn(2, 9, 3, generator=g), torch.randn(11, 3, generator=g), torch.randn(11, 2, generator=g)
    cases = [(torch.rand(2, 1, 3, generator=g) + 0.5, torch.rand(2, generator=g) + 0.5),  # one per batch entry
             (torch.rand(3, 2, 1, 1, generator=g) + 0.5, torch.tensor(1.3)),  # an ensemble over the batch
             (torch.tensor([0.8, 1.1, 0.9]), torch.rand(3, 1, generator=g) + 0.5)]
    for ls0, os0 in cases:
        xs, ls, os_ = (t.clone().requires_grad_() for t in (x, ls0, os0))
        with use_backend(backend):
            out = kernel_matvec(xs, y, b, "matern32", lengthscale=ls, outputscale=os_)
        lead = torch.broadcast_shapes((2,), ls0.shape[:-2] if ls0.dim() >= 2 else (), os0.shape)
        assert out.shape == lead + (9, 2)
        w = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad((out * w).sum(), (xs, ls, os_))
        want_out, want_gx, want_ls, want_os = torch.zeros(out.shape), torch.zeros(x.shape), 0 * ls0, 0 * os0
        ls_e = ls0.expand(lead + ls0.shape[-2:]) if ls0.dim() >= 2 else ls0.expand(lead + (1, 3))
        os_e = os0.expand(lead)
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in lead]).reshape(-1, len(lead)).tolist():
            idx = tuple(idx)
            xi, li, oi = x[idx[-1]].clone().requires_grad_(), ls_e[idx].clone().requires_grad_(), \
                os_e[idx].clone().requires_grad_()
            o = kernel_matvec(xi, y, b, "matern32", lengthscale=li.reshape(-1), outputscale=oi)
            want_out[idx] = o.detach()
            gx, gl, go = torch.autograd.grad((o * w[idx]).sum(), (xi, li, oi))
            want_gx[idx[-1]] += gx
            want_ls = want_ls + torch.zeros_like(ls_e).index_put_((*[torch.tensor([i]) for i in idx],), gl[None]) \
                .sum_to_size(ls0.shape)
            want_os = want_os + torch.zeros_like(os_e).index_put_((*[torch.tensor([i]) for i in idx],), go[None]) \
                .sum_to_size(os0.shape)
        for a, e in zip((out, *got), (want_out, want_gx, want_ls, want_os)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernel_solve_is_differentiable(backend):
    """Gradients of a CG solve (and of a GP posterior mean through it) for y, x, ARD lengthscales,
    outputscale and noise agree with autograd through a dense solve. Before, the solve ran under no_grad
    and its result carried no gradient: hyperparameters got only the prediction's share, silently."""
    dt = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(3)
    x0, y0, xt0 = torch.rand(30, 2, generator=g), torch.randn(30, 2, generator=g), torch.rand(7, 2, generator=g)
    ls0, os0, nz0 = torch.tensor([0.4, 0.7]), torch.tensor(1.5), torch.tensor(0.2)

    def leaves():
        return [t.to(dt).requires_grad_() for t in (x0, y0, xt0, ls0, os0, nz0)]

    def loss(alpha, x, xt, ls, os_):
        return (kernel_matvec(xt, x, alpha, "matern52", ls, os_) ** 2).sum() + (alpha ** 3).sum()

    x, y, xt, ls, os_, nz = ins = leaves()
    with use_backend(backend):
        alpha = kernel_solve(x, y, "matern52", noise=nz, lengthscale=ls, outputscale=os_, tol=1e-12 if
                             dt == torch.float64 else 1e-7)
        got = torch.autograd.grad(loss(alpha, x, xt, ls, os_), ins)
    x, y, xt, ls, os_, nz = ins = [t.detach().double().requires_grad_() for t in leaves()]
    r = torch.cdist(x / ls, x / ls)
    K = os_ * (1 + 5 ** 0.5 * r + 5 / 3 * r ** 2) * torch.exp(-(5 ** 0.5) * r) + nz * torch.eye(30, dtype=x.dtype)
    want = torch.autograd.grad(loss(torch.linalg.solve(K, y), x, xt, ls, os_), ins)
    for name, a, w in zip(["x", "y", "x_test", "lengthscale", "outputscale", "noise"], got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-6 if dt == torch.float64 else 2e-3,
                                   atol=1e-8 if dt == torch.float64 else 2e-3, msg=name)
    # the operator keeps a tensor noise's gradient too
    v = torch.randn(30, dtype=dt, generator=torch.Generator().manual_seed(4))
    nz = nz0.to(dt).requires_grad_()
    (KernelOperator(x0.to(dt), noise=nz) @ v).sum().backward()
    torch.testing.assert_close(nz.grad, v.sum())


@pytest.mark.parametrize("bad, err, match", [
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 2), torch.randn(5, 1)), ValueError, "dimension mismatch"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(6, 1)), ValueError, "b must be"),
    (lambda: kernel_matvec(torch.randn(2, 4, 3), torch.randn(2, 5, 3), torch.randn(6)), ValueError, "b must be"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 2)[:, :1].t()), ValueError,
     "b must be"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), "rbf"), ValueError,
     "valid: .*gaussian.*cauchy"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), lengthscale=0.0), ValueError,
     "lengthscale must be positive"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), lengthscale=torch.tensor([1., -1, 1])),
     ValueError, "lengthscale must be positive"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), lengthscale=torch.ones(2)),
     ValueError, r"\[D=3\]"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), lengthscale=torch.ones(2, 2, 3)),
     ValueError, r"batched lengthscale must be \[\.\.\., 1, D=3\]"),
    (lambda: kernel_matvec(torch.randn(2, 4, 3), torch.randn(5, 3), torch.randn(5, 1),
                           lengthscale=torch.ones(3, 1, 3)), ValueError, "lengthscale \\(3,\\) .*do not broadcast"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), outputscale=-1.0), ValueError,
     "outputscale"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1)), TypeError,
     "share a dtype"),
    (lambda: kernel_matvec(torch.randn(4, 3, dtype=torch.complex64), torch.randn(5, 3), torch.randn(5, 1)), TypeError,
     "real floating"),
    (lambda: kernel_matvec([[0.0]], torch.randn(5, 3), torch.randn(5, 1)), TypeError, "x must be a torch.Tensor"),
    (lambda: kernel_matvec(torch.randn(3), torch.randn(5, 3), torch.randn(5, 1)), ValueError,
     r"x and y must be \[\.\.\., N, D\]"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3, device="meta"), torch.randn(5, 1)), ValueError,
     "y is on meta but x is on cpu"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), lengthscale="1"), TypeError,
     "lengthscale must be a number, got str"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), noise="0.1"), TypeError, "noise must be a number, got str"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), noise=float("inf")), ValueError, "noise must be > 0 and finite"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.ones(4, dtype=torch.int64), noise=0.1), TypeError,
     "y must be a real floating tensor, got torch.int64"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), noise=0.1, tol=-1e-6), ValueError,
     "tol must be positive and finite"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), noise=0.1, max_iter=0), ValueError,
     "max_iter must be an int >= 1"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), noise=0.1, precond_rank=True), ValueError,
     "precond_rank must be an int >= 0"),  # (True was read as rank 1)
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), lengthscale=torch.ones(3, dtype=torch.int64)),
     TypeError, "lengthscale must be a real floating tensor"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), outputscale=torch.ones((), device="meta")),
     ValueError, "outputscale is on meta but x is on cpu"),
    (lambda: KernelOperator(torch.randn(4, 3), noise=-1.0), ValueError, "noise must be >= 0"),
    (lambda: KernelOperator(torch.randn(4, 3), noise=float("inf")), ValueError, "noise must be >= 0 and finite"),
    (lambda: KernelOperator(torch.randn(4, 3), torch.randn(5, 3), noise=0.1), ValueError, "square operator"),
    (lambda: KernelOperator(torch.randn(4, 3), torch.randn(5, 3)).diag(), ValueError, "diag\\(\\) needs a square"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), noise=0.0), ValueError, "noise"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), noise=torch.ones(2)), ValueError, "noise"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(5)), ValueError, "N=4"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), precond_rank=-1), ValueError, "precond_rank"),
    # used to fail inside Python (an AttributeError, list indexing) or to take True as 1.0
    (lambda: KernelOperator([[0.0, 1.0]]), TypeError, "x must be a torch.Tensor, got list"),
    (lambda: KernelOperator(torch.randn(4, 3), [[0.0] * 3]), TypeError, "y must be a torch.Tensor, got list"),
    (lambda: KernelOperator(torch.randn(4)), ValueError, "x must be \\[..., N, D\\] points"),
    (lambda: KernelOperator(torch.randn(4, 3), torch.tensor(1.0)), ValueError, "y must be \\[..., N, D\\] points"),
    (lambda: KernelOperator(torch.randn(4, 3), noise=0.1) @ [1.0] * 4, TypeError,
     "KernelOperator @ b: b must be a torch.Tensor, got list"),
    (lambda: [1.0] * 4 @ KernelOperator(torch.randn(4, 3)), TypeError,
     "v @ KernelOperator: v must be a torch.Tensor, got list"),
    (lambda: KernelOperator(torch.randn(4, 3), noise=0.1).matmul(KernelOperator(torch.randn(4, 3))), TypeError,
     "b must be a torch.Tensor, got KernelOperator"),
    (lambda: gp_posterior_mean(torch.randn(4, 3), torch.randn(4), torch.randn(2, 3, dtype=torch.float64)),
     TypeError, "x_test must have x_train's dtype and device \\(torch.float32 on cpu\\), got torch.float64"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), x0=torch.zeros(3)), ValueError,
     "x0 must be shaped like the solution \\(4,\\) \\(or broadcast to it\\), got \\(3,\\)"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4, 2), x0=torch.zeros(4)), ValueError,
     "x0 must be shaped like the solution \\(4, 2\\)"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), x0=torch.zeros(4, dtype=torch.float64)), TypeError,
     "x0 must have y's dtype and device \\(torch.float32 on cpu\\), got torch.float64"),
    (lambda: kernel_solve(torch.randn(4, 3).bfloat16(), torch.randn(4).bfloat16(), x0=torch.zeros(4)), TypeError,
     "x0 must have y's dtype and device \\(torch.bfloat16 on cpu\\), got torch.float32"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), x0=[0.0] * 4), TypeError,
     "x0 must be None or a real floating tensor, got list"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), x0=torch.zeros(4, dtype=torch.int64)), TypeError,
     "x0 must be None or a real floating tensor, got torch.int64"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), x0=torch.full((4,), float("nan"))), ValueError,
     "x0 must be finite"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), lengthscale=True), TypeError,
     "lengthscale must be a number, got bool"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), lengthscale=np.ones(3)),
     TypeError, "lengthscale must be a number or a tensor \\(a \\[D\\] tensor for ARD\\), got a ndarray"),
    (lambda: kernel_matvec(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 1), outputscale=[1.0]),
     TypeError, "outputscale must be a number or a tensor, got a list"),
    (lambda: kernel_solve(torch.randn(4, 3), torch.randn(4), noise=np.True_), TypeError,
     "noise must be a number, got bool"),
])
def test_bad_input_is_a_clear_error(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_flash_matches_reference(kernel, dtype):
    for n, m, d, r in ((1000, 777, 3, 1), (513, 700, 64, 16), (300, 200, 72, 16), (300, 200, 129, 3)):
        x, y, b = (t.cuda().requires_grad_() for t in points(n, m, d, r, dtype))
        ls = torch.tensor(0.9, device="cuda", requires_grad=True)
        with use_backend("triton"):
            out = kernel_matvec(x, y, b, kernel, ls)
        args = (np64(x.detach().cpu()), np64(y.detach().cpu()), np64(b.detach().cpu()))
        assert_close(out.cpu(), ref.kernel_matvec(*args, kernel, 0.9), dtype, m * d, f"{kernel} {n}x{m} d={d}")
        g = torch.randn_like(out)
        (out * g).sum().backward()
        dx, dy, db, dl = ref.kernel_matvec_vjp(*args, np64(g.cpu()), kernel, 0.9)
        assert_close(x.grad.cpu(), dx, dtype, m * d, f"{kernel} d={d} grad x")
        assert_close(y.grad.cpu(), dy, dtype, n * d, f"{kernel} d={d} grad y")
        assert_close(b.grad.cpu(), db, dtype, n, f"{kernel} d={d} grad b")
        assert_close(ls.grad.cpu(), dl, dtype, n * m * d, f"{kernel} d={d} grad lengthscale")


def test_gp_posterior_mean_matches_dense_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 2, generator=g, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + 0.05 * torch.randn(300, generator=g, dtype=torch.float64)
    xt = torch.rand(50, 2, generator=g, dtype=torch.float64)
    mean = gp_posterior_mean(x, y, xt, "matern52", noise=0.01, lengthscale=0.3, tol=1e-10)
    K = ref.kernel_matrix(np64(x), np64(x), "matern52", 0.3) + 0.01 * np.eye(300)
    want = ref.kernel_matrix(np64(xt), np64(x), "matern52", 0.3) @ np.linalg.solve(K, y.numpy())
    np.testing.assert_allclose(mean.numpy(), want, rtol=1e-6, atol=1e-7)
    truth = torch.sin(6 * xt[:, 0]) * torch.cos(4 * xt[:, 1])
    assert (mean - truth).pow(2).mean().sqrt() < 0.1  # it actually regresses the function


@pytest.mark.parametrize("yshape, out", [((7,), (2, 7)), ((1, 7), (2, 7)), ((7, 3), (2, 7, 3)), ((1, 7, 3), (2, 7, 3)),
                                        ((2, 7), (2, 7))])
def test_solve_targets_broadcast_over_batched_points(yshape, out):
    """Targets shared by a batch of point sets, read as kernel_matvec reads b (y [N] or [N, R] serves x [B, N, D]):
    y [N] and [N, R] were refused with "must have N=7 rows" (they have 7) and y [1, N] failed inside CG's
    in-place updates. Each batch entry's solve against the dense one, and y's gradient summed over the batch."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(yshape, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = kernel_solve(x, y, "matern32", noise=0.1, tol=1e-12)
    assert alpha.shape == out
    vec = len(out) == 2
    rhs = (y.unsqueeze(-1) if vec else y).detach().expand(out + (() if not vec else (1,)))
    K = torch.stack([torch.from_numpy(ref.kernel_matrix(np64(xb), np64(xb), "matern32", 1.0)) for xb in x])
    want = torch.linalg.solve(K + 0.1 * torch.eye(7, dtype=torch.float64), rhs)
    torch.testing.assert_close(alpha, want.squeeze(-1) if vec else want, rtol=1e-9, atol=1e-10)
    (gy,) = torch.autograd.grad(alpha.sum(), y)
    gwant = torch.linalg.solve(K + 0.1 * torch.eye(7, dtype=torch.float64), torch.ones_like(rhs))  # (K symmetric)
    gwant = gwant.squeeze(-1) if vec else gwant
    torch.testing.assert_close(gy, gwant.sum_to_size(yshape), rtol=1e-8, atol=1e-9)
    mean = gp_posterior_mean(x, y.detach(), x[:, :3], "matern32", noise=0.1, tol=1e-12)
    torch.testing.assert_close(mean, kernel_matvec(x[:, :3], x, alpha.detach(), "matern32"), rtol=1e-9, atol=1e-10)


def test_solve_over_a_batch_of_hyperparameters():
    """kernel_solve and gp_posterior_mean take a batch of lengthscales and outputscales, as kernel_matvec does
    (an ensemble over the same points); they failed inside CG ("output with shape [6, 1] doesn't match the
    broadcast shape [2, 6, 1]"). Each entry against its own unbatched call, values and gradients."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ls = torch.tensor([0.5, 1.3], dtype=torch.float64).reshape(2, 1, 1).requires_grad_()
    os_ = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).reshape(3, 1).requires_grad_()  # [3, 1] x [2]: [3, 2]
    alpha = kernel_solve(x, y, "matern52", noise=0.1, lengthscale=ls, outputscale=os_, tol=1e-12)
    mean = gp_posterior_mean(x, y, xt, "matern52", noise=0.1, lengthscale=ls, outputscale=os_, tol=1e-12)
    assert alpha.shape == (3, 2, 6) and mean.shape == (3, 2, 4)
    gl, go = torch.autograd.grad((alpha.sum() + mean.sum()), (ls, os_))
    want_gl, want_go = torch.zeros_like(gl), torch.zeros_like(go)  # each entry's gradients, summed as they share
    for i, j in np.ndindex(3, 2):
        li, oj = ls[j].detach().requires_grad_(), os_[i].detach().requires_grad_()
        a = kernel_solve(x, y, "matern52", noise=0.1, lengthscale=li, outputscale=oj, tol=1e-12)
        m = gp_posterior_mean(x, y, xt, "matern52", noise=0.1, lengthscale=li, outputscale=oj, tol=1e-12)
        torch.testing.assert_close(alpha[i, j], a, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(mean[i, j], m, rtol=1e-9, atol=1e-11)
        dl, do = torch.autograd.grad(a.sum() + m.sum(), (li, oj))
        want_gl[j] += dl
        want_go[i] += do
    torch.testing.assert_close(gl, want_gl, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(go, want_go, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("n, m, d", [(41, 33, 17), (7, 5, 3), (300, 200, 8), (300, 200, 3)])
def test_exact_distances_by_cdist_or_by_coordinate_agree(n, m, d):
    """The torch variant's exact squared distances come from torch.cdist (D >= 8, or tiny calls) or from one
    difference per coordinate; either way coincident points are exactly 0 and near ones keep their relative
    accuracy (no |x|^2 + |y|^2 - 2 x.y cancellation), and a recorded graph (create_graph, transforms) takes
    the coordinate loop, whose second derivative at r = 0 is right."""
    from opforge.kernels.kernel_sum import _sqdist

    g = torch.Generator().manual_seed(5)
    p = torch.randn(1, n, d, generator=g) * 50
    q = torch.cat([p[:, :3], p[:, 3:m] + 1e-3 * torch.randn(1, min(m, n) - 3, d, generator=g)], 1)
    want = ((p.double()[:, :, None] - q.double()[:, None]) ** 2).sum(-1)
    with torch.no_grad():
        got = _sqdist(p, q, True)
    assert (got[0, [0, 1, 2], [0, 1, 2]] == 0).all()
    rel = ((got.double() - want).abs() / want.clamp_min(1e-30)).max()
    assert rel < 1e-5
    with torch.enable_grad():
        torch.testing.assert_close(_sqdist(p, q, True), got, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kernel", ["gaussian", "matern52", "laplacian"])
def test_torch_double_backward_past_the_tiny_product(kernel):
    """A gradient taken with create_graph=True on a call whose grad loop goes one coordinate at a time
    (rows x M x D past 2^15: the recorded, out-of-place branch), differentiated again: against autograd
    through the dense kernel matrix, float64, no coincident points."""
    x, y, b = points(70, 60, 8, 2, torch.float64)
    v = torch.randn(70, 8, dtype=torch.float64)
    g = torch.randn(70, 2, dtype=torch.float64)

    def dense(x, y, b):
        r2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / 0.8 ** 2
        return _dense_phi(r2, kernel) @ b

    got, want = [], []
    for f, out in ((lambda *a: kernel_matvec(*a, kernel, 0.8), got), (dense, want)):
        xs, ys, bs = (t.clone().requires_grad_() for t in (x, y, b))
        with use_backend("torch"):
            gx, = torch.autograd.grad((f(xs, ys, bs) * g).sum(), xs, create_graph=True)
            out.extend(torch.autograd.grad((gx * v).sum(), (xs, ys, bs)))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)


def _dense_phi(s, kernel):
    r = s.sqrt()
    if kernel == "gaussian":
        return torch.exp(-s / 2)
    if kernel == "laplacian":
        return torch.exp(-r)
    return (1 + 5 ** 0.5 * r + 5 / 3 * s) * torch.exp(-(5 ** 0.5) * r)
