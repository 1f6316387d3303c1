"""Spectral convolution: NumPy reference vs torch variant vs every Triton variant (interpreter),
forward and backward, odd sizes, resampling, dtypes, modules, neuraloperator parity and bad input."""
import copy
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from opforge.kernels import SpectralConv, get_op, spectral_conv, spectral_conv1d, spectral_conv2d, spectral_conv3d
from opforge.kernels import use_backend
from opforge.reference import assert_close
from opforge.reference import spectral_conv as ref

OP = get_op("spectral_conv")
SMALL = [c for c in OP.cases if "small" in c.tags]
TRITON = [v.name for v in OP.triton_variants()]


def np64(t):
    t = t.detach()
    return t.resolve_conj().to(torch.complex128).numpy() if t.is_complex() else t.double().numpy()


def reduction(p):
    return OP.reduction(p)


def check_variant(variant, case, dtype, config=None):
    p, (x, w, b) = OP.make_inputs(case, "cpu", dtype, requires_grad=True, seed=1)
    g = torch.randn((p.batch, p.cout) + p.out_grid, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = ref.spectral_conv(np64(x), np64(w), np64(b), p.out_grid)
    dx, dw, db = ref.spectral_conv_vjp(np64(x), np64(w), np64(b), g.numpy(), p.out_grid)
    y = OP.run_variant(variant, p, x, w, b, config=config)
    assert y.shape == (p.batch, p.cout) + p.out_grid and y.dtype == dtype
    assert_close(y, expected, dtype, reduction(p), f"{variant} forward")
    (y * g.to(dtype)).sum().backward()
    red_w = p.batch * int(np.prod(p.out_grid))
    assert_close(x.grad, dx, dtype, reduction(p), f"{variant} grad x")
    assert_close(w.grad, dw, dtype, red_w, f"{variant} grad weight")
    assert_close(b.grad, db, dtype, red_w, f"{variant} grad bias")


@pytest.mark.parametrize("variant", TRITON)
def test_triton_variants_with_many_last_axis_modes(variant):
    """More than 32 kept modes on the last axis (over 64 interleaved columns): dft_gemm's last-axis
    stages take 128-column tiles there and halve their rows to keep the accumulators in registers; the
    mixing kernels meet a padded width past one tile. Odd grid, resolution change."""
    from opforge.kernels._registry import Case

    case = Case("wide-last-axis", {"batch": 1, "cin": 2, "cout": 3, "grid": (5, 83), "modes": (3, 40),
                                   "out_grid": (6, 81)}, ())
    check_variant(variant, case, torch.float32)


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_torch_variant_float64_matches_reference(case):
    check_variant("torch", case, torch.float64)


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_torch_variant_float32(case):
    check_variant("torch", case, torch.float32)


@pytest.mark.parametrize("variant", TRITON)
@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_triton_variant_matches_reference(variant, case):
    check_variant(variant, case, torch.float32)


@pytest.mark.parametrize("presplit", [1, 0])
@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_dft_gemm_float32_under_tf32_tensor_cores(case, presplit, tf32_tensor_cores):
    """dft_gemm's float32 forward and gradients within float32's tolerance when each dot product is computed as
    the tensor cores compute it (conftest's tf32_tensor_cores): with the DFT bases split for 3xTF32 on the
    host (PRESPLIT, the default; the basis is one GEMM operand in the last-axis stages, the other in the
    complex ones) and with Triton's own split."""
    p, _ = OP.make_inputs(case, "cpu", torch.float32)
    check_variant("dft_gemm", case, torch.float32, config=dict(OP.variants["dft_gemm"].default_config(p),
                                                                PRESPLIT=presplit))
    assert tf32_tensor_cores, "no float32 dot product ran"


class _Launches:
    """Stands in for a Triton kernel in its module: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("presplit", [1, 0])
@pytest.mark.parametrize("grid, modes, out_grid, tiles", [
    ((5, 33), (4, 17), None, {(32, 16)}),            # 17 kept modes: 48 interleaved columns, 32 + 16
    ((3, 90), (3, 45), (4, 88), {(64, 32)}),         # 45: 96 columns, 64 + 32; grad x's 90 columns too
    ((40,), (20,), None, {(32, 16)}),                # 1D: the real stages alone
], ids=["2d-m17", "2d-m45-resample", "1d-m20"])
def test_dft_gemm_tiles_fitted_to_the_padded_columns(monkeypatch, grid, modes, out_grid, tiles, presplit,
                                                     tf32_tensor_cores):
    """TILE_FIT: a stage whose columns one power-of-2 tile would pad (48 of 64) takes two tiles that share
    each A tile, and a reduction of 48 (the padded last axis) steps of 16, not two of 32; forward and
    gradients as the reference, with the bases split on the host and with Triton's split, the dot products
    computed as tensor cores compute them."""
    import opforge.kernels.spectral_conv  # noqa: F401 (the module, not the function opforge.kernels exports)
    from opforge.kernels._registry import Case

    sc = sys.modules["opforge.kernels.spectral_conv"]
    rec = _Launches(sc._bmm_kernel)
    monkeypatch.setattr(sc, "_bmm_kernel", rec)
    params = {"batch": 2, "cin": 3, "cout": 2, "grid": grid, "modes": modes}
    case = Case("fit", dict(params, out_grid=out_grid) if out_grid else params, ())
    p, _ = OP.make_inputs(case, "cpu", torch.float32)
    cfg = dict(OP.variants["dft_gemm"].default_config(p), TILE_FIT=1, PRESPLIT=presplit)
    check_variant("dft_gemm", case, torch.float32, config=cfg)
    split = {(c["BLOCK_N"], c["BLOCK_N2"]) for c in rec.calls if c["BLOCK_N2"]}
    assert tiles <= split, rec.calls
    assert any(c["BLOCK_K"] == 16 for c in rec.calls), rec.calls
    if modes[-1] == 17:  # the complex stages (SWAP) take the split too where their 48 columns are one padded tile
        assert any(c["SWAP"] and c["BLOCK_N2"] for c in rec.calls), rec.calls
    assert tf32_tensor_cores, "no float32 dot product ran"


def test_dft_gemm_tall_axis():
    """A non-last axis of more than 64 points (67): the complex stage out to the grid spans two 64-row tiles
    (the last one ragged), forward and backward."""
    from opforge.kernels.spectral_conv import _case

    case = _case("2d-tall-odd", 1, 2, 3, (67, 6), (6, 4), ("test",))
    check_variant("dft_gemm", case, torch.float32)


@pytest.mark.parametrize("variant", TRITON)
def test_triton_bfloat16_input(variant):
    case = next(c for c in SMALL if c.name == "2d-small-odd")
    p, (x, w, b) = OP.make_inputs(case, "cpu", torch.bfloat16, seed=3)
    y = OP.run_variant(variant, p, x, w, b)
    assert y.dtype == torch.bfloat16
    expected = ref.spectral_conv(np64(x), np64(w), np64(b), p.out_grid)
    assert_close(y, expected, torch.bfloat16, reduction(p), f"{variant} bf16 forward")


def test_reference_vjp_matches_torch_autograd_float64():
    """The hand-written adjoints of the reference agree with torch's autograd of the torch path."""
    case = next(c for c in SMALL if c.name == "2d-small-resample")
    p, (x, w, b) = OP.make_inputs(case, "cpu", torch.float64, requires_grad=True)
    g = torch.randn((p.batch, p.cout) + p.out_grid, dtype=torch.float64)
    y = OP.run_variant("torch", p, x, w, b)
    gx, gw, gb = torch.autograd.grad((y * g).sum(), (x, w, b))
    dx, dw, db = ref.spectral_conv_vjp(np64(x), np64(w), np64(b), g.numpy(), p.out_grid)
    np.testing.assert_allclose(gx.numpy(), dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gw.numpy(), dw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gb.numpy(), db, rtol=1e-10, atol=1e-12)


def test_gradcheck_torch_path():
    x = torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 4, 2, dtype=torch.complex128, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: spectral_conv2d(x, w, b, output_shape=(9, 6)), (x, w, b))


def test_reference_matches_direct_dft_sum():
    """The reference equals the DFT written as explicit sums on an odd 1D grid (numpy's irfft semantics)."""
    rng = np.random.default_rng(0)
    n, m = 9, 3
    x = rng.standard_normal((1, 1, n))
    w = rng.standard_normal((1, 1, m)) + 1j * rng.standard_normal((1, 1, m))
    t = np.arange(n)
    X = [(x[0, 0] * np.exp(-2j * np.pi * k * t / n)).sum() / n for k in range(m)]
    y = sum((1 if k == 0 else 2) * (X[k] * w[0, 0, k] * np.exp(2j * np.pi * k * t / n)).real for k in range(m))
    np.testing.assert_allclose(ref.spectral_conv(x, w)[0, 0], y, atol=1e-12)


@pytest.mark.parametrize("variant", ["dft_gemm", "fft_mix"])
def test_float16_under_tensor_cores_is_as_good_as_torch(variant, tf32_tensor_cores):
    """float16 data, dot products as tensor cores compute them (conftest's tf32_tensor_cores): forward and every
    gradient within 3x the torch variant's own float16 error on the same inputs. With TF32 dots (what
    float16 had before) dft_gemm erred 10x as much at a call like this one (the tensor cores truncate TF32
    operands, no finer than float16's, and the error compounds over its four GEMM stages); float16 now takes
    3xTF32 (``_triton.dot_precision``)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, 6, 7, generator=gen).half()
    w = torch.randn(3, 4, 4, 4, 2, generator=gen, dtype=torch.complex64)
    bias = torch.randn(4, generator=gen).half()
    g = torch.randn(2, 4, 5, 5, 5, generator=gen).half()

    def run(dtype, backend, **pin):
        ins = [x.to(dtype).requires_grad_(), w.to(torch.complex128 if dtype == torch.float64 else w.dtype)
               .requires_grad_(), bias.to(dtype).requires_grad_()]
        with use_backend(backend, **pin):
            y = spectral_conv3d(ins[0], ins[1], ins[2], output_shape=(5, 5, 5))
        return [y, *torch.autograd.grad(y, ins, g.to(dtype))]

    def err(a, e):
        a, e = (torch.view_as_real(t.resolve_conj()) if t.is_complex() else t for t in (a.detach(), e.detach()))
        return float((a.double() - e.double()).abs().max() / e.double().abs().max())

    want = run(torch.float64, "torch")
    base = [err(a, e) for a, e in zip(run(torch.float16, "torch"), want)]
    got = [err(a, e) for a, e in zip(run(torch.float16, "triton", spectral_conv=variant), want)]
    assert tf32_tensor_cores, "no dot product ran"
    for name, e, b in zip(("out", "grad x", "grad weight", "grad bias"), got, base):
        assert e <= 3 * max(b, 2.0 ** -12), f"{variant} {name}: {e:.2e} against the torch variant's {b:.2e}"


def _assert_hermitian_planes(spec: torch.Tensor, n: int, **tol):
    """The half spectrum's self-conjugate planes (frequency 0, and n/2 for even n) satisfy S(k) = conj(S(-k))
    over the other axes (axes 2 .. -2)."""
    lead = tuple(range(2, spec.dim() - 1))
    for k in [0] + ([n // 2] if n % 2 == 0 and spec.shape[-1] > n // 2 else []):
        plane = spec[..., k]
        mirror = torch.roll(torch.flip(plane, lead), [1] * len(lead), lead) if lead else plane
        torch.testing.assert_close(plane, mirror.conj(), **tol)


def _graph_nodes(t: torch.Tensor) -> list:
    """The autograd nodes ``t`` was made by."""
    seen, todo, nodes = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes.append(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return nodes


@pytest.mark.parametrize("variant", ["torch", "fft_mix"])
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_backward_gathers_the_kept_modes_without_copying_the_spectrum(variant, case):
    """The output spectrum is built so that its backward only gathers the kept modes' gradient: no in-place
    write through a view (CopySlices, which clones the whole spectrum's gradient) and the Hermitian
    projection outside the graph (its backward is the identity on irfftn's gradient: test below). The
    gradients themselves are checked against the reference in float64 elsewhere."""
    p, (x, w, b) = OP.make_inputs(case, "cpu", torch.float32, requires_grad=True)
    names = [type(fn).__name__ for fn in _graph_nodes(OP.run_variant(variant, p, x, w, b))]
    assert "CopySlices" not in names and not any(n.startswith(("SelectBackward", "AsStridedBackward"))
                                                 for n in names), names


@pytest.mark.parametrize("grid, modes, out", [
    ((9,), (5,), None), ((8,), (5,), None), ((8,), (5,), (11,)), ((9,), (4,), (6,)), ((7,), (3,), (8,)),
    ((6, 8), (5, 5), None), ((6, 8), (4, 4), (9, 6)), ((7, 6), (7, 4), (7, 10)), ((4, 5, 6), (3, 2, 4), (5, 5, 6))])
def test_fft_mix_backward_matches_autograd_through_the_transforms(grid, modes, out):
    """fft_mix's backward is written out (``_FFTMixFn``): R = rfftn(dy) read at the kept modes, scaled by each
    bin's Hermitian count on the output grid for grad W and by the ratio of its counts on the output and
    input grids for grad x, grad bias from R's frequency 0. Against the torch variant (autograd through
    torch.fft) in float64, every gradient, with Nyquist bins kept on the input grid, the output grid or
    both (all last-axis modes of an even grid, resampled up and down), odd grids and a bias."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 3) + grid, generator=g, dtype=torch.float64)
    w = torch.randn((3, 2) + modes, generator=g, dtype=torch.complex128)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    res = {}
    for variant, dt, cdt in (("torch", torch.float64, torch.complex128), ("fft_mix", torch.float32, torch.complex64)):
        xs, ws, bs = (t.to(c).requires_grad_() for t, c in ((x, dt), (w, cdt), (b, dt)))
        p = spectral_conv.__globals__["_check"](xs, ws, bs, out, None)
        y = OP.run_variant(variant, p, xs, ws, bs)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dt)
        res[variant] = (y,) + torch.autograd.grad((y * dy).sum(), (xs, ws, bs))
    red = 3 * math.prod(grid)
    for name, got, want in zip(("forward", "grad x", "grad weight", "grad bias"), res["fft_mix"], res["torch"]):
        assert_close(got, want.detach().numpy(), torch.float32, red, name)


def test_fft_mix_keeps_only_the_kept_modes_for_its_backward():
    """What a forward saves for its backward beyond its inputs: the kept modes of x's spectrum (complex64
    [B, in, *modes]), not the whole half spectrum, which is the size of x."""
    case = next(c for c in OP.cases if c.name == "2d-small-odd")
    p, (x, w, b) = OP.make_inputs(case, "cpu", torch.float32, requires_grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in (x, w, b)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        OP.run_variant("fft_mix", p, x, w, b)
    assert sum(saved.values()) == p.batch * p.cin * math.prod(p.modes) * 8, saved


@pytest.mark.parametrize("bias", [True, False])
def test_fft_mix_makes_no_full_size_pass_but_the_transforms(bias, big_writes):
    """fft_mix forward + backward: the only torch ops that write a tensor the size of x or y are the four
    transforms (rfftn of x and of dy, irfftn of the output and of the input-side spectrum); the mix kernel
    writes the spectra, the bias goes in at frequency 0 and its gradient comes from there. Autograd through
    torch.fft added a doubling pass over the half spectrum, a zero-filled full complex spectrum and its
    copy, and the bias added and summed over y."""
    x = torch.randn(2, 3, 15, 16, requires_grad=True)  # modes a small part of the grid, as in use
    w = torch.randn(3, 4, 5, 4, dtype=torch.complex64, requires_grad=True)
    b = torch.randn(4, requires_grad=True) if bias else None
    p = spectral_conv.__globals__["_check"](x, w, b, None, None)
    dy = torch.randn((p.batch, p.cout) + p.out_grid)
    with big_writes(min(x.numel(), dy.numel()) * 4 // 2) as ops:  # half of x or y, in bytes
        y = OP.run_variant("fft_mix", p, x, w, b)
        torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    assert sorted(ops) == ["_fft_c2r", "_fft_c2r", "_fft_r2c", "_fft_r2c"], ops


@pytest.mark.parametrize("device,dtype,atol", [("cpu", torch.complex128, 1e-14),
                                               pytest.param("cuda", torch.complex64, 1e-5, marks=pytest.mark.gpu)])
def test_irfftn_gradient_is_hermitian_on_the_self_conjugate_planes(device, dtype, atol):
    """Why the projection may stay out of the graph: the gradient autograd gives irfftn (cuFFT's r2c on a GPU)
    already satisfies S(k) = conj(S(-k)) on the planes the projection touches, so the projection (its own
    adjoint) would return it unchanged."""
    gen = torch.Generator().manual_seed(0)
    for grid in [(16,), (17,), (9, 7), (8, 8), (7, 6, 9), (6, 8, 10), (256, 256)]:
        d, n = len(grid), grid[-1]
        s = torch.randn((2, 3) + grid[:-1] + (n // 2 + 1,), dtype=dtype, generator=gen).to(device).requires_grad_()
        y = torch.fft.irfftn(s, s=grid, dim=tuple(range(-d, 0)), norm="forward")
        g, = torch.autograd.grad(y, s, torch.randn(y.shape, dtype=y.dtype, generator=gen).to(device))
        _assert_hermitian_planes(g, n, rtol=0, atol=atol * g.abs().max().item())


@pytest.mark.parametrize("variant", ["torch", "fft_mix"])
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_inverse_transform_gets_a_hermitian_spectrum(monkeypatch, variant, case):
    """c2r is defined only for Hermitian-consistent input (cuFFT's float32 path differed from numpy
    otherwise): the self-conjugate planes handed to irfftn must satisfy S(k) = conj(S(-k)), in the forward
    and in fft_mix's grad x (an inverse transform of the input-side spectrum, which cuFFT got wrong at 2D
    256^2 with 32 modes on an H200 before it was projected too)."""
    seen = []
    real_irfftn = torch.fft.irfftn

    def checking_irfftn(spec, s=None, dim=None, norm=None):
        _assert_hermitian_planes(spec, s[-1])
        seen.append(s)
        return real_irfftn(spec, s=s, dim=dim, norm=norm)

    monkeypatch.setattr(torch.fft, "irfftn", checking_irfftn)
    p, (x, w, b) = OP.make_inputs(case, "cpu", torch.float32, requires_grad=True)
    y = OP.run_variant(variant, p, x, w, b)
    assert seen, "irfftn was not called"
    expected = ref.spectral_conv(np64(x), np64(w), np64(b), p.out_grid)
    assert_close(y, expected, torch.float32, reduction(p), f"{variant} {case.name}")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    n_before = len(seen)
    dx, = torch.autograd.grad(y, x, g)
    assert len(seen) == n_before + (variant == "fft_mix")  # (the torch variant's grad x is autograd's own r2c)
    want = ref.spectral_conv_vjp(np64(x), np64(w), np64(b), g.double().numpy(), p.out_grid)[0]
    assert_close(dx, want, torch.float32, 2 * reduction(p), f"{variant} {case.name} grad x")


@pytest.mark.parametrize("grid, out", [((8, 10), (12, 12)), ((12, 12), (8, 10)), ((6, 8, 10), (8, 6, 12))])
def test_resampling_hands_irfftn_a_hermitian_spectrum(monkeypatch, grid, out):
    """The resampling path keeps frequencies -k/2 .. k/2 - 1 of an even k (one mirror bin short): its
    self-conjugate planes are projected before the c2r transform as well, and the result is numpy's."""
    real_irfftn = torch.fft.irfftn

    def checking_irfftn(spec, s=None, dim=None, norm=None):
        _assert_hermitian_planes(spec, s[-1])
        return real_irfftn(spec, s=s, dim=dim, norm=norm)

    x = torch.randn((2, 3) + grid, dtype=torch.float64)
    want = spectral_conv.__globals__["_spectral_resample"](x, out)
    monkeypatch.setattr(torch.fft, "irfftn", checking_irfftn)
    got = spectral_conv.__globals__["_spectral_resample"](x, out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _no_zero_stride(t, what):
    assert all(st != 0 or n <= 1 for st, n in zip(t.stride(), t.shape)), f"{what}: zero stride {t.stride()}"


@pytest.mark.parametrize("variant", ["torch"] + TRITON)
@pytest.mark.parametrize("grid, modes, out", [((16,), (5,), None), ((8, 9), (4, 4), (10, 11)),
                                              ((6, 5, 6), (3, 3, 3), None)], ids=["1d", "2d-resample", "3d"])
def test_expanded_inputs_and_sum_gradients_reach_no_transform(monkeypatch, variant, grid, modes, out):
    """torch 2.7's CPU FFT (MKL) rejects an input with a zero stride ("Inconsistent configuration parameters"),
    and ``y.sum().backward()`` sends exactly that: an expanded gradient, which autograd's irfftn backward
    transforms. Later torch copies such inputs itself, so the check is made here: on every transform opforge
    calls and on every gradient autograd's FFT nodes receive. The input x is expanded too."""
    for name in ("rfftn", "irfftn"):
        real = getattr(torch.fft, name)

        def strict(t, *args, _real=real, _name=name, **kwargs):
            _no_zero_stride(t, f"torch.fft.{_name}'s input")
            return _real(t, *args, **kwargs)

        monkeypatch.setattr(torch.fft, name, strict)
    d = len(grid)
    x0 = torch.randn((1, 3) + (1,) * (d - 1) + grid[-1:], dtype=torch.float32, requires_grad=True)
    x = x0.expand((2, 3) + grid)
    w = torch.randn((3, 4) + modes, dtype=torch.complex64, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with use_backend("torch" if variant == "torch" else "triton", spectral_conv=variant):
        y = spectral_conv(x, w, b, output_shape=out)
    fft_nodes = [n for n in _graph_nodes(y) if n.name().startswith("Fft")]
    assert len(fft_nodes) == (2 if variant == "torch" else 0), [n.name() for n in fft_nodes]
    for node in fft_nodes:
        node.register_prehook(lambda grads, _n=node.name(): _no_zero_stride(grads[0], f"{_n}'s gradient"))
    y.sum().backward()
    out_grid = out or grid
    g = np.ones((2, 4) + out_grid)
    xs = np64(x)
    expected = ref.spectral_conv(xs, np64(w), np64(b), out_grid)
    dx, dw, db = ref.spectral_conv_vjp(xs, np64(w), np64(b), g, out_grid)
    red = 3 * math.prod(grid)
    assert_close(y, expected, torch.float32, red, f"{variant} forward")
    assert_close(x0.grad, dx.sum(axis=(0,) + tuple(range(2, 1 + d)), keepdims=True), torch.float32, 2 * red,
                 f"{variant} grad x")
    assert_close(w.grad, dw, torch.float32, 2 * math.prod(out_grid), f"{variant} grad weight")
    assert_close(b.grad, db, torch.float32, 2 * math.prod(out_grid), f"{variant} grad bias")


def test_functional_dims_and_dispatch_on_cpu():
    x = torch.randn(2, 3, 10, 8)
    w = torch.randn(3, 4, 6, 3, dtype=torch.complex64)
    y = spectral_conv2d(x, w)
    assert y.shape == (2, 4, 10, 8)
    torch.testing.assert_close(spectral_conv(x, w), y)
    assert spectral_conv1d(torch.randn(2, 3, 11), torch.randn(3, 2, 4, dtype=torch.complex64)).shape == (2, 2, 11)
    w3 = torch.randn(3, 2, 2, 2, 2, dtype=torch.complex64)
    assert spectral_conv3d(torch.randn(1, 3, 4, 5, 6), w3, output_shape=(6, 7, 8)).shape == (1, 2, 6, 7, 8)


def test_use_backend_triton_runs_interpreter_and_agrees():
    x = torch.randn(2, 3, 10, 8)
    w = torch.randn(3, 4, 6, 3, dtype=torch.complex64)
    y_t = spectral_conv2d(x, w)
    for name in TRITON:
        with use_backend("triton", spectral_conv=name):
            torch.testing.assert_close(spectral_conv2d(x, w), y_t, rtol=1e-4, atol=1e-5)


def test_non_contiguous_and_empty_batch():
    x = torch.randn(2, 8, 3, 10).transpose(1, 2)  # [2, 3, 8, 10], non-contiguous
    w = torch.randn(3, 2, 4, 3, dtype=torch.complex64)
    y = spectral_conv2d(x, w)
    torch.testing.assert_close(y, spectral_conv2d(x.contiguous(), w))
    with use_backend("triton", spectral_conv="dft_gemm"):
        torch.testing.assert_close(spectral_conv2d(x, w), y, rtol=1e-4, atol=1e-5)
    empty = spectral_conv2d(torch.randn(0, 3, 8, 10), w, output_shape=(5, 6))
    assert empty.shape == (0, 2, 5, 6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B, cin, cout", [(0, 3, 2), (2, 0, 2), (2, 3, 0)])
def test_empty_batch_or_channels(backend, B, cin, cout):
    """Nothing to mix (the FFT libraries reject empty tensors): zeros plus the bias, a gradient for each input."""
    x = torch.randn(B, cin, 8, 10, requires_grad=True)
    w = torch.randn(cin, cout, 4, 3, dtype=torch.complex64, requires_grad=True)
    bias = torch.randn(cout, requires_grad=True)
    with use_backend(backend):
        y = spectral_conv2d(x, w, bias, output_shape=(5, 6))
    torch.testing.assert_close(y, bias.detach().reshape(1, -1, 1, 1).expand(B, cout, 5, 6))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    torch.testing.assert_close(bias.grad, torch.full((cout,), 30.0 * B))


@pytest.mark.parametrize("bad, err, match", [
    (lambda: spectral_conv2d(torch.randn(3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64)), ValueError, "rank 4"),
    (lambda: spectral_conv2d(torch.randn(1, 5, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64)), ValueError, "channel mismatch"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 9, 3, dtype=torch.complex64)), ValueError, "modes"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 6, dtype=torch.complex64)), ValueError, "at most 5"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8, dtype=torch.complex64), torch.randn(3, 2, 4, 3, dtype=torch.complex64)), TypeError, "real floating"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3)), TypeError, "weight must be complex"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64), torch.randn(3)), ValueError, "bias"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64), output_shape=(8,)), ValueError, "output_shape"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64), output_shape=(2, 8)), ValueError, "output_shape"),
    (lambda: spectral_conv(torch.randn(1, 3, 8), torch.randn(3, 2, dtype=torch.complex64)), ValueError, "rank 3, 4 or 5"),
    (lambda: spectral_conv2d([[0.0]], torch.randn(3, 2, 4, 3, dtype=torch.complex64)), TypeError,
     "x must be a torch.Tensor, got list"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), None), TypeError, "weight must be a torch.Tensor, got NoneType"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, 3, dtype=torch.complex64)), ValueError,
     "weight must have rank 4"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64, device="meta")),
     ValueError, "weight is on meta but x is on cpu"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64), [0.0, 1.0]),
     TypeError, "bias must be a torch.Tensor or None, got list"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64),
                             torch.randn(2, dtype=torch.complex64)), TypeError, "bias must be real"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64),
                             torch.randn(2, device="meta")), ValueError, "bias is on meta but x is on cpu"),
    (lambda: SpectralConv(3, 2, 4, dtype=torch.float32), TypeError, "dtype must be a complex dtype"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64),
                             output_shape=(8.5, 8)), ValueError, "output_shape must be whole numbers"),
    (lambda: SpectralConv(3, 2, (4, 4))(torch.randn(1, 3, 8, 8), output_shape=(9.5, 8)), ValueError,
     "output_shape must be whole numbers"),
    # output_shape and the module's resolution change: clear errors, not int() / narrow() / FFT ones
    (lambda: SpectralConv(3, 2, (4, 4))(torch.randn(1, 3, 8, 8), output_shape=(-1, 8)), ValueError,
     r"output_shape must be positive sizes, one per spatial axis \(2 for 2D\), got \(-1, 8\)"),
    (lambda: spectral_conv(torch.randn(1, 3, 8), torch.randn(3, 2, 4, dtype=torch.complex64), output_shape=8),
     TypeError, r"output_shape must be a sequence of sizes, one per spatial axis \(1 for 1D\), got 8"),
    (lambda: spectral_conv(torch.randn(1, 3, 8), torch.randn(3, 2, 4, dtype=torch.complex64), output_shape=(None,)),
     ValueError, "output_shape must be whole numbers"),
    (lambda: spectral_conv(torch.randn(1, 3, 8), torch.randn(3, 2, 4, dtype=torch.complex64),
                           output_shape=(float("inf"),)), ValueError, "output_shape must be whole numbers"),
    (lambda: SpectralConv(3, 2, 4).transform(torch.randn(1, 3, 8), output_shape=(0,)), ValueError,
     "output_shape must be positive"),
    (lambda: SpectralConv(3, 2, 4, resolution_scaling_factor=0.01)(torch.randn(1, 3, 16)), ValueError,
     r"resolution_scaling_factor=\[0.01\] maps x's grid \(16,\) to \(0,\)"),
    (lambda: SpectralConv(3, 2, 4, resolution_scaling_factor=float("nan")), ValueError,
     "resolution_scaling_factor must be positive and finite"),
    (lambda: spectral_conv(torch.randn(1, 3, 0), torch.randn(3, 2, 4, dtype=torch.complex64)), ValueError,
     "x's grid must have at least one point on each spatial axis"),
    (lambda: spectral_conv(torch.randn(1, 3, 0), torch.zeros(3, 2, 0, dtype=torch.complex64)), ValueError,
     "x's grid must have at least one point"),
    (lambda: SpectralConv(3, 2, (4, 4))(torch.randn(2, 3, 0, 8)), ValueError, "x's grid must have at least one"),
    (lambda: SpectralConv(3, 2, (4, 4)).transform(torch.randn(2, 3, 16)), ValueError, "2 spatial axes"),
    (lambda: SpectralConv(3, 2, (4, 4)).transform([0.0]), TypeError, "x must be a real floating tensor, got list"),
    (lambda: SpectralConv.from_neuraloperator(None), TypeError, "layer must be a neuraloperator SpectralConv"),
    (lambda: SpectralConv(3, 2, 4, init_std="0.1"), TypeError, "init_std must be a number, got str"),
    (lambda: SpectralConv(3, 2, 4, init_std=-0.1), ValueError, "init_std must be 'auto' or a finite number >= 0"),
    (lambda: SpectralConv(3, 2, (4, 4), resolution_scaling_factor=(2.0, -1.0)), ValueError,
     "resolution_scaling_factor must be positive"),
    (lambda: SpectralConv.from_neuraloperator(types.SimpleNamespace(complex_data=True)), ValueError,
     "only real-data neuraloperator SpectralConv layers convert"),
    (lambda: SpectralConv(3, 2, [4, 4, 4, 4]), ValueError, "n_modes"),
    (lambda: SpectralConv(3, 2, (True, 4)), ValueError, "n_modes"),  # was taken as 1 mode, a bool in n_modes
    (lambda: SpectralConv(3, 2, True), ValueError, "n_modes"),
    (lambda: SpectralConv(3, 2, (4, 4), resolution_scaling_factor=[True, 2]), ValueError,  # was read as 1.0
     "resolution_scaling_factor"),
    (lambda: SpectralConv(3, 2, (4, 4), resolution_scaling_factor=True), ValueError, "resolution_scaling_factor"),
    (lambda: SpectralConv(3, 2, (4, 4), max_n_modes=(4.0, 3)), ValueError, "max_n_modes"),
    (lambda: SpectralConv(3, 2, (4, 4), factorization="tt", rank=(1, True, 2, 2, 1)), ValueError,
     "rank for factorization='tt'"),
    (lambda: SpectralConv(0, 2, 4), ValueError, "in_channels"),
    (lambda: SpectralConv(3, 2, 4, fft_norm="none"), ValueError, "fft_norm must be one of"),
    (lambda: spectral_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 4, 3, dtype=torch.complex64), fft_norm=None),
     ValueError, "fft_norm must be one of"),
    (lambda: SpectralConv(3, 2, 4, separable=True), ValueError, "in_channels must equal out_channels"),
    (lambda: SpectralConv(3, 2, 4, factorization="tensor-train"), ValueError,
     r"factorization must be None or one of \['dense', 'tucker', 'cp', 'tt'\]"),
    (lambda: SpectralConv(3, 2, 4, factorization="cp", rank=(2, 3)), ValueError, "rank for factorization='cp'"),
    (lambda: SpectralConv(3, 2, (4, 4), factorization="tt", rank=(2, 2, 2, 2, 1)), ValueError, "ending in 1"),
    (lambda: SpectralConv(3, 2, (4, 4), factorization="tucker", rank=-0.5), ValueError, "must be positive"),
    (lambda: SpectralConv(3, 2, 4, factorization="cp", fixed_rank_modes=True), ValueError, "tucker' only"),
    (lambda: SpectralConv(3, 2, 4, factorization="tucker", fixed_rank_modes=[3]), ValueError, "modes of the weight"),
    (lambda: SpectralConv(3, 2, 4, factorization="tucker", decomposition_kwargs={"init": "svd"}), ValueError,
     "decomposition_kwargs"),
    (lambda: SpectralConv(3, 2, 4, implementation="fused"), ValueError, "implementation"),
    (lambda: SpectralConv(3, 2, 4, complex_data=True), ValueError, "complex_data"),
    (lambda: SpectralConv(3, 2, 4, fno_block_precision="mixed"), ValueError, "fno_block_precision"),
    (lambda: SpectralConv(3, 2, 4, False), TypeError, "positional"),
])
def test_bad_input_is_a_clear_error(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


@pytest.mark.parametrize("size", [9, 9.0, np.int64(9), torch.tensor(9)], ids=["int", "float", "numpy", "tensor"])
def test_output_shape_takes_whole_numbers_of_any_kind(size):
    w = torch.randn(3, 2, 4, dtype=torch.complex64)
    x = torch.randn(1, 3, 8)
    want = spectral_conv(x, w, output_shape=[9])
    for shape in ((size,), [size], torch.Size([9])):
        torch.testing.assert_close(spectral_conv(x, w, output_shape=shape), want, rtol=0, atol=0)
    assert SpectralConv(3, 2, 4)(x, output_shape=(size,)).shape == (1, 2, 9)


def test_triton_variants_say_why_they_cannot_run():
    """A call the Triton variants cannot take names each one's reason when Triton is asked for."""
    x = torch.randn(1, 3, 8, 8)
    with use_backend("triton"), pytest.raises(ValueError, match="take a complex64 weight, got torch.complex128"):
        spectral_conv2d(x, torch.randn(3, 2, 4, 3, dtype=torch.complex128))
    with use_backend("triton", spectral_conv="dft_gemm"), pytest.raises(ValueError, match="at most 64 last-axis"):
        spectral_conv2d(torch.randn(1, 3, 8, 140), torch.randn(3, 2, 4, 65, dtype=torch.complex64))


def test_module_matches_functional_and_resamples():
    torch.manual_seed(0)
    layer = SpectralConv(3, 4, n_modes=(6, 6))
    assert layer.weight.shape == (3, 4, 6, 4) and layer.weight.dtype == torch.complex64
    assert layer.bias.shape == (4, 1, 1)
    x = torch.randn(2, 3, 12, 10)
    torch.testing.assert_close(layer(x), spectral_conv2d(x, layer.weight, layer.bias))
    assert layer(x, output_shape=(24, 20)).shape == (2, 4, 24, 20)
    up = SpectralConv(3, 4, 6, resolution_scaling_factor=2.0)
    assert up(torch.randn(2, 3, 16)).shape == (2, 4, 32)
    loss = layer(x).square().sum()
    loss.backward()
    assert layer.weight.grad is not None and layer.bias.grad.shape == (4, 1, 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fft_norm", ["forward", "backward", "ortho"])
def test_fft_norms_match_the_reference(fft_norm, backend):
    """Each ``fft_norm`` against NumPy's transforms under that norm, on the same grid and on resolution
    changes (odd sizes; up and down; 1D to 3D): functional forward and gradients, and the module."""
    torch.manual_seed(0)
    for grid, out, modes in (((15,), (22,), (5,)), ((9, 11), (13, 8), (6, 4)), ((9, 11), None, (6, 4)),
                             ((6, 7, 5), (9, 5, 8), (4, 3, 3))):
        x = torch.randn(2, 3, *grid, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 2, *modes, dtype=torch.complex128, requires_grad=True)
        bias = torch.randn(2, dtype=torch.float64)
        with use_backend(backend):
            xs = x if backend == "torch" else x.detach().float().requires_grad_()
            ws = w if backend == "torch" else w.detach().to(torch.complex64).requires_grad_()
            y = spectral_conv(xs, ws, bias.to(xs.dtype), output_shape=out, fft_norm=fft_norm)
        expected = ref.spectral_conv(x.detach().numpy(), w.detach().numpy(), bias.numpy(), out, fft_norm=fft_norm)
        dtype = torch.float64 if backend == "torch" else torch.float32
        assert_close(y.detach(), expected, dtype, 3, f"{fft_norm} {grid}->{out} forward")
        # linear in x and w: the gradients of <y, g> are those of the "forward"-normed op, scaled as y is
        g = torch.randn(y.shape, dtype=y.dtype)
        dx, dw = torch.autograd.grad((y * g).sum(), (xs, ws))
        n_in, n_out = math.prod(grid), math.prod(out or grid)
        c = {"forward": 1.0, "backward": n_in / n_out, "ortho": (n_in / n_out) ** 0.5}[fft_norm]
        rx, rw, _ = ref.spectral_conv_vjp(x.detach().numpy(), w.detach().numpy(), bias.numpy(), g.double().numpy(), out)
        assert_close(dx, c * rx, dtype, 3, f"{fft_norm} {grid}->{out} grad x")
        assert_close(dw, c * rw, dtype, 2 * n_out, f"{fft_norm} {grid}->{out} grad w")
    layer = SpectralConv(3, 2, (6, 8), fft_norm=fft_norm).double()
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    expected = ref.spectral_conv(x.numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy().ravel(),
                                 (12, 14), fft_norm=fft_norm)
    assert_close(layer(x, output_shape=(12, 14)).detach(), expected, torch.float64, 3, f"module {fft_norm}")
    assert ("fft_norm" in repr(layer)) == (fft_norm != "forward")


def _nop_centre(w, kept):
    """neuraloperator 2.0's slicing of a weight [in, out, *max modes] down to ``kept`` modes per axis:
    slice(start // 2, -start // 2) on the first axes, the first ones on the last (start = max - kept)."""
    idx = [slice(None), slice(None)]
    for ax, (m, k) in enumerate(zip(w.shape[2:], kept)):
        start = m - k
        last = ax == len(kept) - 1
        idx.append(slice(None, m - start) if last else slice(start // 2, m + (-start // 2)))
    return w[tuple(idx)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_keeps_the_modes_a_coarse_grid_holds(backend):
    """neuraloperator's layer runs on grids too coarse for its modes (multi-resolution training) by using
    the weight's centre; so does this one, with a gradient only there. The functional still raises."""
    torch.manual_seed(0)
    layer = SpectralConv(3, 4, n_modes=(16, 16))  # weight [3, 4, 16, 9]
    x = torch.randn(2, 3, 12, 10)  # holds 12 x 6 modes
    with use_backend(backend):
        y = layer(x)
        want = spectral_conv2d(x, _nop_centre(layer.weight, (12, 6)), layer.bias)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        w = layer.weight.detach()
        assert_close(y, ref.spectral_conv(x.double().numpy(), w[:, :, 2:14, :6].to(C128).numpy(),
                                          layer.bias.detach().double().numpy().reshape(-1)), torch.float32, 36)
        y.square().sum().backward()
    g = layer.weight.grad
    assert g[:, :, 2:14, :6].abs().amax() > 0 and g[:, :, :2].abs().amax() == 0 and g[..., 6:].abs().amax() == 0
    # an output grid too coarse for the modes keeps what fits there
    torch.testing.assert_close(layer(torch.randn(2, 3, 32, 32), output_shape=(8, 8)).shape, (2, 4, 8, 8))
    with pytest.raises(ValueError, match="16 modes"):
        spectral_conv2d(x, layer.weight)


def test_module_n_modes_setter_and_max_n_modes():
    """``n_modes`` reads and sets as neuraloperator's (incremental training): totals in, kept modes out."""
    torch.manual_seed(0)
    layer = SpectralConv(3, 4, n_modes=(16, 16))
    assert layer.n_modes == [16, 9] and layer.max_n_modes == [16, 9]
    layer.n_modes = (8, 10)
    assert layer.n_modes == [8, 6] and layer.weight.shape == (3, 4, 16, 9)
    assert "max_n_modes=[16, 9]" in repr(layer)
    x = torch.randn(2, 3, 20, 20)
    torch.testing.assert_close(layer(x), spectral_conv2d(x, _nop_centre(layer.weight, (8, 6)), layer.bias))
    for bad in ((17, 16), (16,), 0):
        with pytest.raises(ValueError, match="n_modes"):
            layer.n_modes = bad
    small = SpectralConv(3, 4, n_modes=(8, 8), max_n_modes=(16, 9))
    assert small.weight.shape == (3, 4, 16, 9) and small.n_modes == [8, 5]
    with pytest.raises(ValueError, match="max_n_modes"):
        SpectralConv(3, 4, n_modes=(8, 8), max_n_modes=(6, 9))


def _wave(grid, freqs):
    """sin(2 pi sum_a f_a i_a / n_a) on ``grid``, [1, 1, *grid]: band-limited, so any grid holding its
    frequencies samples the same function."""
    phase = sum(f * torch.arange(n, dtype=torch.float64).view([-1] + [1] * (len(grid) - 1 - a)) / n
                for a, (n, f) in enumerate(zip(grid, freqs)))
    return torch.sin(2 * torch.pi * phase).float().reshape((1, 1) + tuple(grid))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("freqs", [(-2, 1), (3, -2), (0, 3)])
def test_resolution_change_keeps_each_frequency(backend, freqs):
    """With an all-ones weight the layer passes its kept frequencies through, so a wave on a 32 x 32 grid
    comes out as the same wave sampled on the new grid. (neuraloperator 2.0 zero-pads its unshifted
    spectrum at the end of every axis, which turns the first axes' negative frequencies into high positive
    ones: the first two waves come out wrong there, max error 2.)"""
    layer = SpectralConv(1, 1, (8, 8), bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    with use_backend(backend):
        for out in ((64, 64), (16, 16), (20, 48)):
            torch.testing.assert_close(layer(_wave((32, 32), freqs), output_shape=out), _wave(out, freqs),
                                       rtol=0, atol=1e-5)


def test_transform_resamples_skip_connections():
    """``transform`` (what neuraloperator's FNO blocks call on the skip path): x itself on the same grid,
    torch's linear / bicubic interpolation in 1D / 2D, and in 3D the kept frequencies: exact on a wave."""
    layer1 = SpectralConv(2, 2, 4, resolution_scaling_factor=1.5)
    x1 = torch.randn(2, 2, 10)
    assert layer1.modes == (3,) and layer1.transform(x1, output_shape=(10,)) is x1
    torch.testing.assert_close(layer1.transform(x1), torch.nn.functional.interpolate(
        x1, size=15, mode="linear", align_corners=True))
    layer3 = SpectralConv(1, 1, (4, 4, 4))
    x = _wave((8, 10, 12), (1, -2, 3))
    assert layer3.transform(x) is x
    for out in ((16, 12, 14), (6, 5, 8)):
        torch.testing.assert_close(layer3.transform(x, output_shape=out), _wave(out, (1, -2, 3)), rtol=0, atol=1e-5)
    x2 = torch.randn(2, 3, 9, 11)
    up = SpectralConv(3, 3, (4, 4), resolution_scaling_factor=2.0)
    torch.testing.assert_close(up.transform(x2), torch.nn.functional.interpolate(
        x2, size=(18, 22), mode="bicubic", align_corners=True))


def test_neuraloperator_fno_takes_it_as_conv_module():
    """``neuralop.models.FNO(..., conv_module=SpectralConv)`` builds, loads the stock FNO's state dict and
    gives its outputs (needs neuraloperator importable), before and after its blocks' n_modes is lowered."""
    models = pytest.importorskip("neuralop.models")
    torch.manual_seed(0)
    for n_modes, grid in (((8, 8), (32, 32)), ((12,), (40,)), ((8, 8, 8), (12, 12, 12))):
        kw = dict(n_modes=n_modes, in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
        theirs, ours = models.FNO(**kw), models.FNO(**kw, conv_module=SpectralConv)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 2, *grid)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
        half = tuple(m // 2 for m in n_modes)  # an even number dropped per axis: the centrings agree
        theirs.fno_blocks.n_modes = half
        ours.fno_blocks.n_modes = half
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_neuraloperator_fno_compiles_and_exports_whole():
    """An FNO built with this layer is one graph for torch.compile(fullgraph=True) and torch.export
    (inference), each block's spectral convolution an opforge node (needs neuraloperator importable)."""
    models = pytest.importorskip("neuralop.models")
    torch.manual_seed(0)
    model = models.FNO(n_modes=(8, 8), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2,
                       conv_module=SpectralConv).eval()
    x = torch.randn(2, 2, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), want)
    torch._dynamo.reset()
    program = torch.export.export(model, (x,))
    assert sum(str(n.target) == "opforge.spectral_conv.default" for n in program.graph.nodes) == 2
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want)


C64, C128 = torch.complex64, torch.complex128
CASTS = {  # name: (cast, weight dtype after, bias dtype after) from a complex64 layer
    "double": (lambda m: m.double(), C128, torch.float64),
    "to-float64": (lambda m: m.to(torch.float64), C128, torch.float64),
    "half": (lambda m: m.half(), C64, torch.float16),
    "to-bfloat16": (lambda m: m.to(torch.bfloat16), C64, torch.bfloat16),
    "to-complex128": (lambda m: m.to(torch.complex128), C128, torch.float64),
    "double-then-float": (lambda m: m.double().float(), C64, torch.float32),
    "double-then-move": (lambda m: m.double().cpu().to("cpu"), C128, torch.float64),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_module_casts_keep_the_weight_complex(cast):
    """Module.to(<real dtype>) would cast a complex weight to real (its imaginary part dropped); .double()
    would leave it complex64; .to(<complex dtype>) would make the bias complex. SpectralConv keeps the
    weight complex and the bias real at the precision the cast asks for, and a move keeps both."""
    torch.manual_seed(1)
    layer = SpectralConv(3, 4, n_modes=(6, 6))
    x = torch.randn(2, 3, 12, 10)
    want = layer(x)
    fn, wdt, bdt = CASTS[cast]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "discards the imaginary part"
        warnings.filterwarnings("ignore", message="Complex modules are a new feature")
        fn(layer)
    assert layer.weight.dtype == wdt and layer.bias.dtype == bdt
    assert isinstance(layer.weight, torch.nn.Parameter)
    got = layer(x.to(bdt))
    assert got.dtype == bdt
    tol = 1e-2 if bdt in (torch.float16, torch.bfloat16) else 1e-5
    assert (got.double() - want.double()).abs().max() <= tol * want.abs().max()


def _tucker(core, factors):
    t = core
    for k, u in enumerate(factors):  # mode-k product: t x_k u
        t = torch.movedim(torch.tensordot(u, torch.movedim(t, k, 0), dims=([1], [0])), 0, k)
    return t


@pytest.mark.parametrize("kind", ["tucker", "cp", "tt"])
def test_factorized_weights(kind):
    """TFNO's weights: the dense tensor rebuilt from the factors (against mode products, sums of outer
    products, a chain of cores), the layer equal to the functional op on it for either backend and the
    factors' gradients to autograd through that; ranks as given; the initial entries' deviation near
    init_std; casts keep the factors complex; tltorch's real-view factors load."""
    torch.manual_seed(0)
    rank = {"tucker": (2, 3, 4, 3), "cp": 5, "tt": (1, 2, 3, 3, 1)}[kind]
    layer = SpectralConv(3, 4, (8, 6), factorization=kind, rank=rank).double()
    fw = layer.weight
    assert fw.shape == (3, 4, 8, 4) and fw.rank == rank and fw.dtype == torch.complex128
    assert layer.bias.dtype == torch.float64 and "factorization" in repr(layer)
    f = [fw.factors[k] for k in range(4)]
    want = {"tucker": lambda: _tucker(fw.core, f),
            "cp": lambda: torch.einsum("r,ir,jr,kr,lr->ijkl", fw.weights, *f),
            "tt": lambda: torch.einsum("aib,bjc,ckd,dle->ijkl", *f)}[kind]()
    torch.testing.assert_close(fw.to_tensor(), want)
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            xs = x if backend == "torch" else x.float()
            lay = layer if backend == "torch" else copy.deepcopy(layer).float()  # casts keep the factors complex
            y = lay(xs)
            w = lay.weight.to_tensor()
            assert_close(y.detach(), ref.spectral_conv(x.numpy(), w.detach().cdouble().numpy(),
                                                          lay.bias.detach().double().numpy().ravel()),
                         xs.dtype, 3, f"{kind} {backend}")
            g = torch.randn(y.shape, dtype=y.dtype)
            params = [p for _, p in lay.weight.named_parameters()]
            got = torch.autograd.grad((y * g).sum(), params)
            want = torch.autograd.grad((spectral_conv2d(xs, lay.weight.to_tensor(), lay.bias) * g).sum(), params)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)
            assert lay.weight.dtype == (torch.complex128 if backend == "torch" else torch.complex64)
    big = SpectralConv(32, 32, (16, 16), factorization=kind, rank=0.5)
    std = big.weight.to_tensor().abs().pow(2).mean().sqrt().item()
    assert 0.5 * big.init_std < std < 2 * big.init_std, (std, big.init_std)
    sd = {k: torch.view_as_real(v) for k, v in layer.state_dict().items() if v.is_complex()}
    sd["bias"] = layer.bias.detach().clone()
    other = SpectralConv(3, 4, (8, 6), factorization=kind, rank=rank).double()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize("factorization", [None, "cp"])
def test_separable_layer_is_the_diagonal_dense_one(factorization):
    """separable=True: a weight [C, *modes] multiplying each channel's modes by its own, the same as a dense
    layer with that weight on the diagonal of [C, C, *modes] (both backends, forward and gradients: the
    diagonal's gradient is the separable weight's)."""
    torch.manual_seed(0)
    sep = SpectralConv(3, 3, (6, 8), separable=True, factorization=factorization, rank=4)
    assert sep.max_n_modes == [6, 5] and "separable=True" in repr(sep)
    w = sep.weight if factorization is None else sep.weight.to_tensor()
    assert w.shape == (3, 6, 5)
    dense = SpectralConv(3, 3, (6, 8))
    with torch.no_grad():
        dense.weight.zero_()
        for c in range(3):
            dense.weight[c, c] = w[c]
        dense.bias.copy_(sep.bias)
    x = torch.randn(2, 3, 13, 10)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            y = sep(x, output_shape=(15, 12))
            torch.testing.assert_close(y, dense(x, output_shape=(15, 12)), rtol=1e-5, atol=1e-6)
            g = torch.randn_like(y)
            (gs,) = torch.autograd.grad((y * g).sum(), [w] if factorization is None else [sep.weight.factors[0]])
            (gd,) = torch.autograd.grad((dense(x, output_shape=(15, 12)) * g).sum(), dense.weight)
            if factorization is None:
                torch.testing.assert_close(gs, torch.stack([gd[c, c] for c in range(3)]), rtol=1e-5, atol=1e-6)
            else:
                assert torch.isfinite(torch.view_as_real(gs)).all() and gs.abs().max() > 0


@pytest.mark.filterwarnings("ignore:Determining the tt-rank")  # tensorly's, for neuraloperator's 1D TT layer
def test_separable_layers_match_neuraloperator():
    """neuraloperator's separable layers, dense and factorized: the same parameter shapes, their state dicts
    load, the same outputs; from_neuraloperator converts them; FNO(separable=True, conv_module=SpectralConv)
    loads a stock one and agrees (needs neuraloperator importable)."""
    nop = pytest.importorskip("neuralop.layers.spectral_convolution")
    models = pytest.importorskip("neuralop.models")
    torch.manual_seed(0)
    for fac in (None, "tucker", "tt"):
        for n_modes, grid in (((8, 8), (16, 16)), ((12,), (20,))):
            theirs = nop.SpectralConv(4, 4, n_modes, separable=True, factorization=fac, rank=0.5)
            ours = SpectralConv(4, 4, n_modes, separable=True, factorization=fac, rank=0.5)
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn(2, 4, *grid)
            for mine in (ours, SpectralConv.from_neuraloperator(theirs)):
                torch.testing.assert_close(mine(x), theirs(x), rtol=1e-4, atol=1e-5)
    kw = dict(n_modes=(8, 8), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2, separable=True)
    theirs, ours = models.FNO(**kw), models.FNO(**kw, conv_module=SpectralConv)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 2, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_factorized_fractional_ranks():
    """A float rank keeps about that fraction of the dense parameters, by tensorly's rules (hand-checked
    shapes), fixed_rank_modes=True keeping the in-channel mode's full Tucker rank."""
    def ranks(kind, rank, fixed=False, n_modes=(8, 8)):
        return SpectralConv(3, 5, n_modes, factorization=kind, rank=rank, fixed_rank_modes=fixed).weight.rank
    assert ranks("tucker", 0.5) == (2, 4, 6, 4)
    assert ranks("cp", 0.5) == 14  # round(0.5 * 600 / 21)
    assert ranks("tt", 0.5) == (1, 3, 5, 5, 1)
    assert ranks("tucker", 0.1, True, (8, 6)) == (3, 2, 2, 1)
    assert ranks("tucker", 3, True) == (3, 3, 3, 3) and ranks("tt", 2) == (1, 2, 2, 2, 1)
    for kind in ("tucker", "cp", "tt"):
        w = SpectralConv(16, 16, (12, 12), factorization=kind, rank=0.3).weight
        n = sum(p.numel() for p in w.parameters())
        assert 0.2 < n / (16 * 16 * 12 * 7) < 0.4, (kind, n)


def test_factorized_weight_sizes_and_fixed_modes():
    """Sizes and fixed modes are ints of any integer kind (NumPy's too); a mode named twice is fixed once
    (it was counted twice in the fractional-rank budget); a float size or mode is refused."""
    from opforge.kernels import FactorizedWeight
    shape = (3, 5, 8, 5)
    want = FactorizedWeight("tucker", shape, 0.3, [0]).rank  # (3, 3, 5, 3); [0, 0] counted twice: (3, 3, 4, 3)
    assert FactorizedWeight("tucker", tuple(np.int64(s) for s in shape), 0.3, (np.int64(0),)).rank == want
    assert FactorizedWeight("tucker", shape, 0.3, [0, 0]).rank == want == (3, 3, 5, 3)
    with pytest.raises(ValueError, match="shape must be"):
        FactorizedWeight("tucker", (3.0, 5, 8, 5))
    with pytest.raises(ValueError, match="fixed_rank_modes must be"):
        FactorizedWeight("tucker", shape, 0.2, [0.0])
    conv = SpectralConv(3, 2, (np.int64(6), np.int32(6)), max_n_modes=np.array([8, 5]), factorization="tt",
                        rank=[1, np.int64(2), 2, 2, 1])
    assert conv.n_modes == [6, 4] and conv.max_n_modes == [8, 5] and conv.weight.rank == (1, 2, 2, 2, 1)
    assert all(type(m) is int for m in conv.n_modes + conv.max_n_modes)
    assert SpectralConv(3, 2, (6, 6), factorization="tucker", rank=np.int64(3)).weight.rank == (3, 3, 3, 3)


def test_factorized_weights_match_neuraloperator():
    """neuraloperator's factorized layers (TFNO): the same parameter names and shapes for fractional ranks
    and fixed_rank_modes, their state dicts load, the same outputs and factor gradients; from_neuraloperator
    keeps the factors; TFNO(..., conv_module=SpectralConv) loads a stock TFNO and agrees, also with fewer
    modes (needs neuraloperator importable)."""
    nop = pytest.importorskip("neuralop.layers.spectral_convolution")
    models = pytest.importorskip("neuralop.models")
    torch.manual_seed(0)
    for kind in ("tucker", "cp", "tt"):
        for n_modes, grid, rank, fixed in (((8, 8), (16, 16), 0.5, False), ((12,), (20,), 0.42, False),
                                           ((6, 6, 6), (8, 8, 8), 1.0, True), ((8, 6), (16, 12), 0.1, True)):
            fixed = fixed and kind == "tucker"
            theirs = nop.SpectralConv(3, 5, n_modes, factorization=kind, rank=rank, fixed_rank_modes=fixed)
            ours = SpectralConv(3, 5, n_modes, factorization=kind, rank=rank, fixed_rank_modes=fixed)
            assert ({k: tuple(v.shape) for k, v in ours.state_dict().items()}
                    == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}), (kind, n_modes, rank)
            ours.load_state_dict(theirs.state_dict())
            converted = SpectralConv.from_neuraloperator(theirs)
            assert converted.factorization == kind
            x = torch.randn(2, 3, *grid)
            g = torch.randn(2, 5, *grid)
            for mine in (ours, converted):
                torch.testing.assert_close(mine(x), theirs(x), rtol=1e-4, atol=1e-5)
            (ours(x) * g).sum().backward()
            (theirs(x) * g).sum().backward()
            for name, p in theirs.weight.named_parameters():
                torch.testing.assert_close(dict(ours.weight.named_parameters())[name].grad, p.grad,
                                           rtol=1e-4, atol=1e-5)
    kw = dict(n_modes=(8, 8), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2, rank=0.3)
    theirs, ours = models.TFNO(**kw), models.TFNO(**kw, conv_module=SpectralConv)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 2, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    theirs.fno_blocks.n_modes = (4, 4)
    ours.fno_blocks.n_modes = (4, 4)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_module_loads_neuraloperator_shaped_state_dict():
    """neuraloperator stores the dense weight as ``weight.tensor`` (complex, or a real [..., 2] view via tltorch)."""
    layer = SpectralConv(3, 4, n_modes=(6, 6))
    w = torch.randn(3, 4, 6, 4, dtype=torch.complex64)
    bias = torch.randn(4, 1, 1)
    for stored in (w, torch.view_as_real(w)):
        layer.load_state_dict({"weight.tensor": stored.clone(), "bias": bias})
        torch.testing.assert_close(layer.weight.detach(), w)


def test_neuraloperator_parity_even_sizes():
    """Same outputs as neuraloperator's SpectralConv on even sizes (needs neuraloperator importable),
    with all its modes, grids too coarse for them, and fewer modes set through ``n_modes``."""
    nop = pytest.importorskip("neuralop.layers.spectral_convolution")
    torch.manual_seed(0)
    for n_modes, new, grid in (([16, 16], None, (12, 10)), ([8, 8, 8], None, (6, 6, 6)), ([12], [6], (20,)),
                               ([16, 16], [12, 10], (32, 32)), ([16, 16], [8, 8], (6, 6))):
        theirs = nop.SpectralConv(3, 5, n_modes)
        ours = SpectralConv.from_neuraloperator(theirs)
        if new:
            theirs.n_modes = new
            ours.n_modes = new
        assert ours.n_modes == theirs.n_modes
        x = torch.randn(2, 3, *grid)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    for norm in ("backward", "ortho"):  # (1D: its resampling is right there)
        theirs = nop.SpectralConv(3, 5, [10], fft_norm=norm)
        ours = SpectralConv.from_neuraloperator(theirs)
        x = torch.randn(2, 3, 20)
        for out in ((20,), (32,), (12,)):
            torch.testing.assert_close(ours(x, output_shape=out), theirs(x, output_shape=out), rtol=1e-4, atol=1e-5)
    for n_modes, grid in (([8, 6], (16, 12)), ([10], (20,)), ([4, 4, 6], (8, 8, 10))):
        theirs = nop.SpectralConv(3, 5, n_modes)
        ours = SpectralConv.from_neuraloperator(theirs)
        x = torch.randn(2, 3, *grid)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
        ours2 = SpectralConv(3, 5, n_modes)
        ours2.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours2(x), theirs(x), rtol=1e-4, atol=1e-5)
        for name in TRITON:
            with use_backend("triton", spectral_conv=name):
                torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_variants_match_reference(variant, dtype):
    for case in SMALL + [c for c in OP.cases if c.name == "2d-64-b20-c32-m16"]:
        p, (x, w, b) = OP.make_inputs(case, "cuda", dtype, requires_grad=True, seed=1)
        g = torch.randn((p.batch, p.cout) + p.out_grid, device="cuda", dtype=dtype)
        y = OP.run_variant(variant, p, x, w, b)
        expected = ref.spectral_conv(np64(x.cpu()), np64(w.cpu()), np64(b.cpu()), p.out_grid)
        assert_close(y.cpu(), expected, dtype, reduction(p), f"{variant} {case.name} forward")
        (y * g).sum().backward()
        dx, dw, _ = ref.spectral_conv_vjp(np64(x.cpu()), np64(w.cpu()), np64(b.cpu()), np64(g.cpu()), p.out_grid)
        assert_close(x.grad.cpu(), dx, dtype, reduction(p), f"{variant} {case.name} grad x")
        assert_close(w.grad.cpu(), dw, dtype, p.batch * int(np.prod(p.out_grid)), f"{variant} {case.name} grad w")


def _against_float64_torch(variant, case_name, device):
    """``variant`` at a case in float32 against the torch variant in float64 on the same device, forward and
    the gradients of x, weight and bias (the helper of the GPU test below; its logic runs on the CPU too)."""
    case = next(c for c in OP.cases if c.name == case_name)
    p, (x, w, b) = OP.make_inputs(case, device, torch.float32, requires_grad=True, seed=2)
    g = torch.randn((p.batch, p.cout) + p.out_grid, generator=torch.Generator().manual_seed(3)).to(device)
    y = OP.run_variant(variant, p, x, w, b)
    got = [y.detach()] + list(torch.autograd.grad(y, (x, w, b), g))
    del y
    p64, (x64, w64, b64) = OP.make_inputs(case, device, torch.float64, requires_grad=True, seed=2)
    y64 = OP.run_variant("torch", p64, x64, w64, b64)
    want = [y64.detach()] + list(torch.autograd.grad(y64, (x64, w64, b64), g.double()))
    red = reduction(p)
    for what, a, e, r in zip(("forward", "grad x", "grad w", "grad bias"), got, want,
                             (red, 2 * red, p.batch * math.prod(p.out_grid), p.batch * math.prod(p.out_grid))):
        assert_close(a.cpu(), e.cpu().numpy(), torch.float32, r, f"{variant} {case_name} {what}")


def test_float64_comparison_helper_on_the_cpu():
    """The GPU test's helper, run here on a small case through the interpreter."""
    for variant in TRITON:
        _against_float64_torch(variant, SMALL[0].name, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", TRITON)
@pytest.mark.parametrize("case_name", ["2d-256-b32-c64-m32", "2d-128-b8-c64-m64"])
def test_gpu_variants_at_the_big_cases(variant, case_name):
    """The sizes where cuFFT's float32 c2r transform differed from numpy's on non-Hermitian planes (an H100 in
    the forward, an H200 in fft_mix's grad x, which the small cases above passed): every Triton variant
    against the torch variant in float64 (cuFFT's float64 agreed with numpy there), forward and gradients."""
    _against_float64_torch(variant, case_name, "cuda")


def test_cached_frequency_indices_serve_every_later_call():
    """The kept-frequency indices are cached per (modes, size, device): one made under inference mode must
    still be savable by a later differentiated call, and fake tensors made while tracing are not kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from opforge.kernels.spectral_conv import _FREQ_INDEX, _freq_index

    _FREQ_INDEX.clear()
    x, w = torch.randn(2, 3, 11, 9, 7), torch.randn(3, 2, 5, 4, 3, dtype=torch.complex64)
    with torch.inference_mode():
        y0 = spectral_conv3d(x, w)
    assert _FREQ_INDEX
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = spectral_conv3d(xg, wg)
    y.square().sum().backward()  # index_select saved a cached index for the backward
    assert torch.equal(y.detach(), y0) and xg.grad is not None and wg.grad is not None
    with FakeTensorMode():
        _freq_index(6, 13, torch.device("cpu"))
    assert (6, 13, torch.device("cpu")) not in _FREQ_INDEX
    assert all(type(t) is torch.Tensor for t in _FREQ_INDEX.values())
