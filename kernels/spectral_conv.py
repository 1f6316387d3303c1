"""FNO spectral convolution: functional API, ``SpectralConv`` module, torch and Triton variants.

    y = irfftn( W . rfftn(x)[kept modes] , s=output_shape ) + bias        (norm="forward")

Shapes: x [B, in, *grid] real; weight [in, out, m_1, ..., m_d] complex in
neuraloperator's layout (index j on axes 1..d-1 is frequency j - m//2, the
last axis holds frequencies 0 ... m_d - 1); bias [out] (or [out, 1, ..., 1]);
y [B, out, *output_shape].  See ``opforge.reference.spectral_conv`` for the
math written out.

Variants (the registry picks per GPU and shape from the autotune cache):

``torch``
    rfftn / index_select / einsum / index_put / irfftn. The CPU path, float64
    included, and the baseline.
``fft_mix``
    torch/cuFFT transforms with one Triton launch that reads the kept modes
    straight out of the rfftn output, mixes channels for every mode (complex
    GEMMs on real/imag planes), and writes the whole output spectrum: mixed
    values at the kept modes, zeros elsewhere -- no fftshift copies, no
    separate zero fill, no scatter.
``dft_gemm``
    truncated DFTs as GEMMs: the transforms are restricted to the kept modes
    and done as tensor-core matmuls against small cos/sin bases, the last
    axis real-to-half-complex (x is read once), the other axes complex on
    interleaved (re, im) planes; the channel mix is the same Triton kernel as
    ``fft_mix`` on compact mode tensors; the bias is added in the last GEMM's
    epilogue. Backward is the adjoint chain through the same kernels.

float32 / bfloat16 / float16 inputs run in float32 on the Triton paths
(3xTF32 dot products for float32 inputs, or TF32 when torch's float32 matmul
setting allows it: ``Problem.precision``; 3xTF32 for float16 ones, TF32 for bfloat16 ones); outputs
are in the input's dtype.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ._graph_op import GraphOp, traced
from ._registry import (Case, Op, ProblemBase, Target, Variant, as_dtype, as_int, graph_grads, int_tuple,
                        kept_tensor, number, positive_ints, register, variant_backward)
from ._registry import pow2 as _pow2
from ._triton import HAS_TRITON, LAUNCH_OPTIONS, TRITON_MISSING, cdiv, offsets_fit, split_tf32_torch, tl, triton

__all__ = ["spectral_conv", "spectral_conv1d", "spectral_conv2d", "spectral_conv3d", "SpectralConv"]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _half(n: int) -> int:
    return n // 2 + 1


# --------------------------------------------------------------------------- problem and input checks
@dataclass(frozen=True)
class Problem(ProblemBase):
    """Everything dispatch needs to know about one call."""

    batch: int
    cin: int
    cout: int
    grid: tuple
    out_grid: tuple
    modes: tuple  # weight mode dims; last = kept half-spectrum modes
    dtype: torch.dtype
    wdtype: torch.dtype
    device: torch.device
    has_bias: bool

    @property
    def d(self) -> int:
        return len(self.grid)

    @property
    def key(self) -> str:
        """Bucketed shape key: powers of two on every size that changes the best config."""
        g = "x".join(str(_pow2(n)) for n in self.grid)
        og = "x".join(str(_pow2(n)) for n in self.out_grid)
        m = "x".join(str(_pow2(n)) for n in self.modes)
        return f"d{self.d}_b{_pow2(self.batch)}_i{_pow2(self.cin)}_o{_pow2(self.cout)}_g{g}_y{og}_m{m}"


def _out_grid(output_shape, d: int) -> tuple:
    """``output_shape`` as d sizes >= 1: ints, whole floats or one-element tensors (SymInts as they come)."""
    try:
        sizes = tuple(output_shape)
    except TypeError:
        raise TypeError(f"output_shape must be a sequence of sizes, one per spatial axis ({d} for {d}D), "
                        f"got {output_shape!r}") from None
    out = []
    for n in sizes:
        if isinstance(n, torch.SymInt):
            out.append(n)
            continue
        real = (isinstance(n, numbers.Real) and not isinstance(n, bool)) or (
            isinstance(n, torch.Tensor) and n.numel() == 1 and not n.is_complex() and n.dtype != torch.bool
            and not n.is_meta)
        v = float(n) if real else math.nan
        if not (math.isfinite(v) and v.is_integer()):
            raise ValueError(f"output_shape must be whole numbers of points, one per spatial axis, got {sizes}")
        out.append(int(v))
    if len(out) != d or any(n < 1 for n in out):
        raise ValueError(f"output_shape must be positive sizes, one per spatial axis ({d} for {d}D), got {sizes}")
    return tuple(out)


def _check(x, weight, bias, output_shape, d: int | None) -> Problem:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if x.is_complex() or x.dtype not in _FLOATS:
        raise TypeError(f"x must be a real floating tensor (float32, float64, bfloat16, float16), got {x.dtype}")
    if not weight.is_complex():
        raise TypeError(f"weight must be complex (complex64 or complex128) in neuraloperator's layout "
                        f"[in, out, *modes], got {weight.dtype}")
    if d is None:
        d = weight.dim() - 2
        if d not in (1, 2, 3):
            raise ValueError(f"weight must have rank 3, 4 or 5 ([in, out, *modes] for 1D/2D/3D), "
                             f"got shape {tuple(weight.shape)}")
    if x.dim() != d + 2:
        raise ValueError(f"x must have rank {d + 2} ([batch, in_channels, *grid] for {d}D), got shape {tuple(x.shape)}")
    if weight.dim() != d + 2:
        raise ValueError(f"weight must have rank {d + 2} ([in, out, *modes] for {d}D), got shape {tuple(weight.shape)}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has {x.shape[1]} in_channels (dim 1) but weight has "
                         f"{weight.shape[0]} (dim 0)")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    grid = tuple(x.shape[2:])  # sizes as they come: symbolic when torch.export traces a dynamic batch or grid
    if any(g == 0 for g in grid):  # (no FFT of no points; an empty batch is fine)
        raise ValueError(f"x's grid must have at least one point on each spatial axis, got shape {tuple(x.shape)}")
    out_grid = grid if output_shape is None else _out_grid(output_shape, d)
    modes = tuple(int(n) for n in weight.shape[2:])
    for name, g in (("x's grid", grid), ("output_shape", out_grid)):
        for ax in range(d):
            limit = _half(g[ax]) if ax == d - 1 else g[ax]
            if modes[ax] > limit:
                raise ValueError(f"weight keeps {modes[ax]} modes on spatial axis {ax} but {name} has "
                                 f"{g[ax]} points there (at most {limit} modes fit)")
    cout = int(weight.shape[1])
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.is_complex():
            raise TypeError(f"bias must be real, got {bias.dtype}")
        if bias.numel() != cout:
            raise ValueError(f"bias must have out_channels={cout} elements ([out] or [out, 1, ...]), "
                             f"got shape {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return Problem(x.shape[0], x.shape[1], cout, grid, out_grid, modes, x.dtype, weight.dtype,
                   x.device, bias is not None)


# --------------------------------------------------------------------------- torch variant
_FREQ_INDEX: dict = {}


def _freq_index(m: int, n: int, device, centred: bool = True) -> torch.Tensor:
    """Indices (on an n-point axis) of the m kept frequencies -m//2 .. m - m//2 - 1 (``centred``; else the
    first m, 0 .. m - 1, as on the half spectrum's axis).

    Cached per (m, n, device) (``kept_tensor``): a small call pays for each torch op, and these (three per axis
    and direction) were a tenth of it. Only ever read."""

    def make():
        return (torch.arange(m, device=device) - m // 2) % n if centred else torch.arange(m, device=device)

    return kept_tensor(_FREQ_INDEX, (m, n, device, centred), make)


def _irfftn(spec: torch.Tensor, p: Problem) -> torch.Tensor:
    """irfftn with numpy's semantics on any backend.

    A c2r transform is defined only for a Hermitian-consistent half spectrum; the planes of the last
    axis that are their own conjugates (frequency 0, and n/2 for even n) are not, after the mode mix
    (the weights of +k and -k on the other axes are independent). numpy drops their anti-Hermitian
    part; cuFFT's float32 c2r did not at some sizes on an H100 (0.07 normalised error at 2D 256^2 with
    32 modes and 128^2 with 64, where float64 agreed: perf/check_float64.py). Projecting those planes
    onto their Hermitian part, S(k) <- (S(k) + conj(S(-k))) / 2 over the other axes, makes every
    implementation compute numpy's result. Modifies ``spec`` in place (a few small planes).

    The projection is out of autograd's sight (``no_grad``; forward-mode AD still carries it): its adjoint is
    itself, and the gradient autograd gives irfftn (rfftn of the output's gradient, the halved-spectrum bins
    doubled) is already Hermitian on those planes, so the projection's backward would return it unchanged.
    Recorded, it cost the backward a clone of the whole spectrum and more full-size passes per plane (the
    in-place write's and the two plane views' backward; at 2D 256^2, B = 32, C = 64 the spectrum is 541 MB).
    ``spec`` must not be saved by any node (none of its makers saves it).
    """
    _hermitian_planes_(spec, p.out_grid[-1], p.modes[-1])
    return _fft_grad_ready(torch.fft.irfftn(spec, s=p.out_grid, dim=tuple(range(-p.d, 0)), norm="forward"))


def _hermitian_planes_(spec: torch.Tensor, n: int, kept: int) -> torch.Tensor:
    """The self-conjugate planes of a half spectrum [B, C, *axes, half] of an n-point last axis (frequency 0,
    and n / 2 for even n where the first ``kept`` bins reach it; the bins past ``kept`` are zero) projected in
    place onto their Hermitian part over the other axes, S(k) <- (S(k) + conj(S(-k))) / 2, before a c2r
    transform (``_irfftn``). Out of autograd's sight."""
    lead = tuple(range(2, spec.dim() - 1))
    planes = [0] + ([n // 2] if n % 2 == 0 and kept > n // 2 and n > 1 else [])
    with torch.no_grad():
        for k in planes:
            plane = spec[..., k]
            mirror = torch.roll(torch.flip(plane, lead), [1] * len(lead), lead) if lead else plane  # index -k mod n
            spec[..., k] = 0.5 * (plane + mirror.conj())
    return spec


def _fft_ready(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a contiguous copy of it when it has a zero stride (an expanded tensor, such as the gradient
    ``y.sum()`` sends back): torch 2.7's CPU FFT (MKL) rejects those with "Inconsistent configuration
    parameters"; later torch copies them itself. Every FFT input that can come from outside goes through it."""
    if t is None or all(st != 0 or n <= 1 for st, n in zip(t.stride(), t.shape)):
        return t
    return t.contiguous()


def _fft_grad_ready(y: torch.Tensor) -> torch.Tensor:
    """``y`` (an FFT's output), with its incoming gradient passed through ``_fft_ready`` before autograd's FFT
    backward transforms it."""
    if y.requires_grad:
        y.register_hook(_fft_ready)
    return y


def _contiguous(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else g.contiguous()  # (None: an undefined gradient, as gradcheck sends)


def _gather(S: torch.Tensor, modes: tuple, grid: tuple) -> torch.Tensor:
    """The kept modes of a half spectrum [B, C, *grid[:-1], half] as [B, C, *modes] in the weight's layout
    (index j on the first axes is frequency j - m // 2; the last axis a slice view)."""
    for ax in range(len(modes) - 1):
        S = S.index_select(2 + ax, _freq_index(modes[ax], grid[ax], S.device))
    return S[..., : modes[-1]]


def _torch_mix(X: torch.Tensor, weight: torch.Tensor, p: Problem) -> torch.Tensor:
    """Full rfftn spectrum [B, in, *grid'] -> full output spectrum [B, out, *out_grid']: the kept modes
    gathered, mixed by the weight and placed at their frequencies on the output grid, zeros elsewhere."""
    d = p.d
    X = _gather(X, p.modes, p.grid)
    # One bmm over the modes, each operand made contiguous in [modes, rows, cols] first: an einsum left the
    # mode axis innermost, and torch's complex bmm on a CPU then copied each mode's strided matrix apart
    # (2112 copies at 64 x 33 modes: 3/4 of the mix's time); this took the mix 1.3-1.9x faster here
    B, I, O, mshape = X.shape[0], X.shape[1], weight.shape[1], X.shape[2:]
    Xm = X.reshape(B, I, -1).permute(2, 0, 1).contiguous()  # [M, B, I]
    Wm = weight.to(X.dtype).reshape(I, O, -1).permute(2, 0, 1).contiguous()  # [M, I, O]
    Y = torch.bmm(Xm, Wm)
    if Y.requires_grad:
        # its gradient comes back as a permuted view, which the complex bmm of the backward (on a CPU) would copy
        # apart one mode's matrix at a time (1890 copies in 10 steps at 2D 64^2, 12 modes, B = 4, C = 16; 220
        # with this one copy first): forward + backward 1.02-1.23x faster there, interleaved on a 2-core CPU
        Y.register_hook(_contiguous)
    Y = Y.permute(1, 2, 0).reshape((B, O) + mshape)
    # Placed so that the backward only gathers the kept modes' gradient: in 1D the last axis padded to the
    # half spectrum (its backward is a slice view); else every axis indexed by a tensor, so that index_put_
    # writes into the fresh zeros themselves. Writing through a sliced view of them (spec[..., :m] = Y) had
    # autograd clone the whole spectrum's gradient first (CopySlices); so did ``spec[:, :, *idx] = Y`` in
    # torch 2.7 (the leading full slices made a view; 2.13 does not), hence the aten op with None for them.
    half = _half(p.out_grid[-1])
    if d == 1:
        return torch.nn.functional.pad(Y, (0, half - p.modes[-1]))
    spec = Y.new_zeros((p.batch, p.cout) + p.out_grid[:-1] + (half,))
    idx = [_freq_index(p.modes[ax], p.out_grid[ax], X.device) for ax in range(d - 1)]
    idx.append(_freq_index(p.modes[-1], half, X.device, centred=False))
    view = [o.view([-1] + [1] * (d - 1 - ax)) for ax, o in enumerate(idx)]
    torch.ops.aten.index_put_(spec, [None, None, *view], Y)
    return spec


def _torch_run(p: Problem, x, weight, bias, config=None):
    d = p.d
    if p.batch == 0 or p.cin == 0 or p.cout == 0:
        # FFT libraries reject empty tensors. Zeros (plus the bias: nothing to mix), with every input in the
        # graph so each gets a gradient of its shape; x or weight is empty here, so no NaN can leak in.
        tie = (x.sum() * 0 + weight.real.sum() * 0).to(p.dtype)
        y = x.new_zeros((p.batch, p.cout) + p.out_grid) + tie
        return y if bias is None else y + bias.reshape((1, p.cout) + (1,) * d).to(p.dtype)
    double = p.dtype == torch.float64 or p.wdtype == torch.complex128
    rdt = torch.float64 if double else torch.float32
    X = torch.fft.rfftn(_fft_ready(as_dtype(x, rdt)), dim=tuple(range(-d, 0)), norm="forward")
    y = _irfftn(_torch_mix(X, weight, p), p)
    if bias is not None:
        y = y + as_dtype(bias.reshape((1, p.cout) + (1,) * d), rdt)
    return as_dtype(y, p.dtype)


# --------------------------------------------------------------------------- shared Triton helpers
def _triton_supports(p: Problem) -> str | None:
    if not HAS_TRITON:
        return TRITON_MISSING
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"Triton variants take float32/bfloat16/float16 inputs, got {p.dtype} (float64 runs on torch)"
    if p.wdtype != torch.complex64:
        return f"Triton variants take a complex64 weight, got {p.wdtype}"
    # the mode-mixing kernel indexes its operands with 32-bit offsets (the DFT GEMMs use 64-bit rows)
    return offsets_fit(weight=2 * p.cin * p.cout * math.prod(p.modes))


def _full_spectra_fit(p: Problem) -> str | None:
    """fft_mix mixes straight out of the full rfftn spectra: those must fit 32-bit offsets too."""
    return offsets_fit(**{"x's spectrum": 2 * p.batch * p.cin * math.prod(p.grid[:-1]) * _half(p.grid[-1]),
                          "y's spectrum": 2 * p.batch * p.cout * math.prod(p.out_grid[:-1]) * _half(p.out_grid[-1])})


if HAS_TRITON:
    from ._triton import SPLIT_SOURCES, dot3, tf32_hi_lo

    @triton.jit
    def _mix_kernel(
        A, B, OUT, R, S, O,
        sAr, sAs, sA1, sA2, sA3, NA1, NA2, HA1, HA2,
        sBs, sBo, sB1, sB2, sB3, NB1, NB2, HB1, HB2,
        sOr, sOo, sO1, sO2, sO3, NO1, NO2, HO1, HO2, NO3,
        M1, M2, M3, n_mix, tiles_r, tiles_o, n_zero_elems,
        CONJ_A: tl.constexpr, CONJ_B: tl.constexpr, ZERO_FILL: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr,
        ZBLOCK: tl.constexpr, PREC: tl.constexpr,
    ):
        """OUT[r, o, k] = sum_s A[r, s, k] * B[s, o, k] for every kept mode k (complex, interleaved).

        Each operand sits either in a compact mode tensor or in a full FFT-ordered
        spectrum: mode index j on axis t is found at ((j - H_t) mod N_t) (axes 1, 2)
        and at j on the last axis.  Programs past ``n_mix`` write zeros over the
        non-kept positions of a full, contiguous OUT (ZERO_FILL).
        """
        pid = tl.program_id(0)
        if pid < n_mix:
            k = pid // (tiles_r * tiles_o)
            t = pid % (tiles_r * tiles_o)
            tr = t // tiles_o
            to = t % tiles_o
            j3 = k % M3
            j2 = (k // M3) % M2
            j1 = k // (M3 * M2)
            offA = ((j1 - HA1 + NA1) % NA1) * sA1 + ((j2 - HA2 + NA2) % NA2) * sA2 + j3 * sA3
            offB = ((j1 - HB1 + NB1) % NB1) * sB1 + ((j2 - HB2 + NB2) % NB2) * sB2 + j3 * sB3
            offO = ((j1 - HO1 + NO1) % NO1) * sO1 + ((j2 - HO2 + NO2) % NO2) * sO2 + j3 * sO3
            rr = tr * BLOCK_R + tl.arange(0, BLOCK_R)
            oo = to * BLOCK_O + tl.arange(0, BLOCK_O)
            acc_re = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
            acc_im = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                a_ptr = A + offA + rr[:, None] * sAr + ss[None, :] * sAs
                a_mask = (rr[:, None] < R) & (ss[None, :] < S)
                a_re = tl.load(a_ptr, mask=a_mask, other=0.0)
                a_im = tl.load(a_ptr + 1, mask=a_mask, other=0.0)
                b_ptr = B + offB + ss[:, None] * sBs + oo[None, :] * sBo
                b_mask = (ss[:, None] < S) & (oo[None, :] < O)
                b_re = tl.load(b_ptr, mask=b_mask, other=0.0)
                b_im = tl.load(b_ptr + 1, mask=b_mask, other=0.0)
                if CONJ_A:
                    a_im = -a_im
                if CONJ_B:
                    b_im = -b_im
                acc_re += tl.dot(a_re, b_re, input_precision=PREC)
                acc_re -= tl.dot(a_im, b_im, input_precision=PREC)
                acc_im += tl.dot(a_re, b_im, input_precision=PREC)
                acc_im += tl.dot(a_im, b_re, input_precision=PREC)
            o_ptr = OUT + offO + rr[:, None] * sOr + oo[None, :] * sOo
            o_mask = (rr[:, None] < R) & (oo[None, :] < O)
            tl.store(o_ptr, acc_re, mask=o_mask)
            tl.store(o_ptr + 1, acc_im, mask=o_mask)
        else:
            if ZERO_FILL:
                e = (pid - n_mix) * ZBLOCK + tl.arange(0, ZBLOCK)
                p3 = e % NO3
                q = e // NO3
                p2 = q % NO2
                p1 = (q // NO2) % NO1
                kept = (p3 < M3) & (((p2 + HO2) % NO2) < M2) & (((p1 + HO1) % NO1) < M1)
                zmask = (e < n_zero_elems) & (kept == 0)
                zero = tl.zeros((ZBLOCK,), dtype=tl.float32)
                tl.store(OUT + 2 * e, zero, mask=zmask)
                tl.store(OUT + 2 * e + 1, zero, mask=zmask)

    @triton.jit
    def _bmm_cols(acc, acc2, a, a_x, a2, a2_x, B, BL, b_rows, k_ok, rn, N, sBn,
                  SWAP: tl.constexpr, PREC: tl.constexpr, PRESPLIT: tl.constexpr):
        """One K step of ``_bmm_kernel`` on the column tile ``rn``: acc += A @ B[:, rn] (and acc2 += A2 @ B[:, rn]
        with SWAP). ``a``/``a2`` are the A tiles as the kernel prepared them for PRESPLIT: 1, their TF32 high
        parts with the low parts ``a_x``/``a2_x``; 2, the basis's host split (high, low); 0, as loaded."""
        b_mask = k_ok[:, None] & (rn < N)[None, :]
        b_off = b_rows + rn[None, :] * sBn
        bb = tl.load(B + b_off, mask=b_mask, other=0.0).to(tl.float32)
        if PRESPLIT == 1:  # the basis is B
            bl = tl.load(BL + b_off, mask=b_mask, other=0.0)
            acc = dot3(acc, a, a_x, bb, bl)
            if SWAP:
                acc2 = dot3(acc2, a2, a2_x, bb, bl)
        elif PRESPLIT == 2:  # the basis is A (and A2): the data tile split once for both products
            b_hi, b_lo = tf32_hi_lo(bb)
            acc = dot3(acc, a, a_x, b_hi, b_lo)
            if SWAP:
                acc2 = dot3(acc2, a2, a2_x, b_hi, b_lo)
        else:
            acc += tl.dot(a, bb, input_precision=PREC)
            if SWAP:
                acc2 += tl.dot(a2, bb, input_precision=PREC)
        return acc, acc2

    @triton.jit
    def _bmm_store(acc, acc2, C, BIAS, c_rows, rm, rn, M, N, sCn, bias_div, bias_n,
                   SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BN: tl.constexpr):
        """The epilogue of ``_bmm_kernel`` for the column tile ``rn`` (BN columns)."""
        if SWAP:  # i * (re + i im) = -im + i re on each (re, im) column pair
            re, im = tl.split(tl.reshape(acc2, (BLOCK_M, BN // 2, 2)))
            acc += tl.reshape(tl.join(-im, re), (BLOCK_M, BN))
        if HAS_BIAS:
            bias = tl.load(BIAS + (rm // bias_div) % bias_n, mask=rm < M, other=0.0).to(tl.float32)
            acc += bias[:, None]
        tl.store(C + c_rows + rn[None, :] * sCn, acc.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn < N)[None, :])

    @triton.jit
    def _bmm_kernel(
        A, A2, B, C, BIAS, AL, A2L, BL, M, N, K, n_tiles_m, n_tiles_n,
        sAb, sAm, sAk, sBb, sBk, sBn, sCb, sCm, sCn, bias_div, bias_n,
        SWAP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
        PRESPLIT: tl.constexpr, BLOCK_N2: tl.constexpr,
    ):
        """C[b] = A[b] @ B[b]  (+ A2[b] @ (i * B[b]) when SWAP)  (+ bias[(row // bias_div) % bias_n]).

        With SWAP, B's columns are interleaved (re, im) pairs and A + i*A2 is a
        complex matrix, so C = (A + i A2) B on complex data: A2 @ B sums in a
        second accumulator that is multiplied by i once, after the loop (each
        (re, im) pair becomes (-im, re) by a reshape/split/join of the
        accumulator). Complex stages run 64-row tiles, where two accumulators
        fit without spills. (The earlier form loaded i*B as a second tile with
        each pair's columns exchanged: 4-byte loads, and spills at 128 rows;
        a reshape/join of the loaded tile itself crashes Triton 3.6's Hopper
        lowering under TF32.)

        PRESPLIT (3xTF32 with the DFT basis split once on the host, ``split_tf32``): 1, B is the basis's
        high part and BL its low part; 2, A (and A2) are, with AL (A2L); the data operand is split here and
        ``dot3`` makes the products (0: Triton's "tf32x3" or PREC, splitting both operands of every tile).

        BLOCK_N2 > 0: each program takes BLOCK_N + BLOCK_N2 columns as two tiles that share every A tile (48
        as 32 + 16, where one power-of-2 tile would be 64 with a quarter of its tensor-core work on zero
        columns; ``_col_tiles``).
        """
        pid = tl.program_id(0)
        per_b = n_tiles_m * n_tiles_n
        b = pid // per_b
        t = pid % per_b
        pid_m = t // n_tiles_n
        pid_n = t % n_tiles_n
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * (BLOCK_N + BLOCK_N2) + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_rows = b.to(tl.int64) * sAb + rm[:, None].to(tl.int64) * sAm
        c_rows = b.to(tl.int64) * sCb + rm[:, None].to(tl.int64) * sCm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # A2 @ B (SWAP), times i after the loop
        if BLOCK_N2 > 0:
            rn2 = pid_n * (BLOCK_N + BLOCK_N2) + BLOCK_N + tl.arange(0, BLOCK_N2)
            acc_b = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
            acc2_b = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            a_mask = (rm[:, None] < M) & k_ok[None, :]
            b_rows = b.to(tl.int64) * sBb + kk[:, None].to(tl.int64) * sBk
            a_off = a_rows + kk[None, :] * sAk
            a = tl.load(A + a_off, mask=a_mask, other=0.0).to(tl.float32)
            if PRESPLIT == 1:  # the data tile split here, once for every column tile
                a_t, a_x = tf32_hi_lo(a)
                a2_t, a2_x = a_t, a_x
                if SWAP:
                    a2_t, a2_x = tf32_hi_lo(tl.load(A2 + a_off, mask=a_mask, other=0.0).to(tl.float32))
            elif PRESPLIT == 2:
                a_t, a_x = a, tl.load(AL + a_off, mask=a_mask, other=0.0)
                a2_t, a2_x = a_t, a_x
                if SWAP:
                    a2_t = tl.load(A2 + a_off, mask=a_mask, other=0.0)
                    a2_x = tl.load(A2L + a_off, mask=a_mask, other=0.0)
            else:
                a_t, a_x = a, a
                a2_t, a2_x = a, a
                if SWAP:
                    a2_t = tl.load(A2 + a_off, mask=a_mask, other=0.0).to(tl.float32)
            acc, acc2 = _bmm_cols(acc, acc2, a_t, a_x, a2_t, a2_x, B, BL, b_rows, k_ok, rn, N, sBn,
                                  SWAP, PREC, PRESPLIT)
            if BLOCK_N2 > 0:
                acc_b, acc2_b = _bmm_cols(acc_b, acc2_b, a_t, a_x, a2_t, a2_x, B, BL, b_rows, k_ok, rn2, N, sBn,
                                          SWAP, PREC, PRESPLIT)
        _bmm_store(acc, acc2, C, BIAS, c_rows, rm, rn, M, N, sCn, bias_div, bias_n, SWAP, HAS_BIAS, BLOCK_M, BLOCK_N)
        if BLOCK_N2 > 0:
            _bmm_store(acc_b, acc2_b, C, BIAS, c_rows, rm, rn2, M, N, sCn, bias_div, bias_n, SWAP, HAS_BIAS,
                       BLOCK_M, BLOCK_N2)


class _Spec:
    """A complex operand of the mix kernel: a float32 view with interleaved (re, im).

    ``t`` is the real view; ``s_r``/``s_s`` the strides of its two channel axes;
    ``axes`` (stride, N, H) per padded mode axis 1, 2 and the stride of axis 3.
    """

    def __init__(self, t, s_r, s_s, axes, s3):
        self.t, self.s_r, self.s_s, self.axes, self.s3 = t, s_r, s_s, axes, s3

    @staticmethod
    def of(real_view, ch_axes, modes, grid, full: bool):
        """Describe ``real_view`` [c0, c1, *spatial, 2]; ``ch_axes`` picks which channel axis is r and s."""
        d = len(modes)
        st = real_view.stride()
        spatial = list(st[2:2 + d])
        pad = 3 - d
        sp = [0] * pad + spatial
        m3 = [1] * pad + list(modes)
        n3 = [1] * pad + (list(grid) if full else list(modes))
        axes = []
        for t in range(2):
            if t < pad:
                axes.append((0, 1, 0))
            elif full:
                axes.append((sp[t], n3[t], m3[t] // 2))
            else:
                axes.append((sp[t], m3[t], 0))
        return _Spec(real_view, st[ch_axes[0]], st[ch_axes[1]], axes, sp[2])


def _mix(a: _Spec, b: _Spec, out: _Spec, R, S, O, modes, conj_a, conj_b, zero_fill, cfg, prec):
    d = len(modes)
    m3 = [1] * (3 - d) + list(modes)
    BR, BO, BS = cfg["MIX_R"], cfg["MIX_O"], cfg["MIX_S"]
    tiles_r, tiles_o = cdiv(R, BR), cdiv(O, BO)
    n_mix = m3[0] * m3[1] * m3[2] * tiles_r * tiles_o
    n_zero = out.t.numel() // 2 if zero_fill else 0
    zblock = 1024
    grid = (n_mix + (cdiv(n_zero, zblock) if zero_fill else 0),)
    (sA1, NA1, HA1), (sA2, NA2, HA2) = a.axes
    (sB1, NB1, HB1), (sB2, NB2, HB2) = b.axes
    (sO1, NO1, HO1), (sO2, NO2, HO2) = out.axes
    no3 = out.t.shape[-2]
    _mix_kernel[grid](
        a.t, b.t, out.t, R, S, O,
        a.s_r, a.s_s, sA1, sA2, a.s3, NA1, NA2, HA1, HA2,
        b.s_r, b.s_s, sB1, sB2, b.s3, NB1, NB2, HB1, HB2,
        out.s_r, out.s_s, sO1, sO2, out.s3, NO1, NO2, HO1, HO2, no3,
        m3[0], m3[1], m3[2], n_mix, tiles_r, tiles_o, n_zero,
        CONJ_A=conj_a, CONJ_B=conj_b, ZERO_FILL=zero_fill,
        BLOCK_R=BR, BLOCK_O=BO, BLOCK_S=BS, ZBLOCK=zblock, PREC=prec,
        num_warps=cfg.get("num_warps", 4), **LAUNCH_OPTIONS,
    )


def _mix_cfgs() -> list[dict]:
    out = []
    for r in (16, 32, 64):
        for o in (32, 64):
            for s in (16, 32):
                out.append({"MIX_R": r, "MIX_O": o, "MIX_S": s, "num_warps": 4})
                if r * o >= 2048:  # 4 warps spill there with 32-wide s steps on Triton 3.6 (perf/inspect_kernels.py)
                    out.append({"MIX_R": r, "MIX_O": o, "MIX_S": s, "num_warps": 8})
    return out


def _mix_default(p: Problem) -> dict:
    r, o = (16 if p.batch <= 16 else 32), (32 if p.cout <= 32 else 64)
    # 32 x 64 tiles with 32-wide s steps spilled 260 B at 4 warps compiled for sm_90 (Triton 3.6); 16 do not
    return {"MIX_R": r, "MIX_O": o, "MIX_S": 16 if r * o >= 2048 else 32, "num_warps": 4}


def _prune_mix(p: Problem, cfgs: list[dict]) -> list[dict]:
    """Drop tiles much larger than the problem (they only add masked work)."""
    keep = [c for c in cfgs if c["MIX_R"] <= max(16, _pow2(p.batch)) and c["MIX_O"] <= max(32, _pow2(p.cout))]
    return keep or cfgs[:1]


# --------------------------------------------------------------------------- variant fft_mix
def _bin_counts(m: int, n: int) -> list:
    """How often each of the first m bins of an n-point half spectrum counts in the whole spectrum: 1 for
    frequency 0 and (n even) n / 2, 2 for the others (a c2r transform's Hermitian doubling)."""
    return [1.0 if k == 0 or 2 * k == n else 2.0 for k in range(m)]


def _scale_bins_(t: torch.Tensor, factors: list) -> torch.Tensor:
    """t[..., k] *= factors[k] in place, one slice op per run of equal factors other than 1 (no factor tensor:
    on a GPU that would be a host-to-device copy)."""
    k = 0
    while k < len(factors):
        end = k + 1
        while end < len(factors) and factors[end] == factors[k]:
            end += 1
        if factors[k] != 1:
            t[..., k:end].mul_(factors[k])  # (`*=` on a subscript also copies the slice onto itself)
        k = end
    return t


class _FFTMixFn(torch.autograd.Function):
    """fft_mix: y = irfftn(mix(rfftn(x)) + bias at frequency 0), the mix kernel reading the kept modes straight
    from the rfftn output and writing the output spectrum (zeros elsewhere) in one launch.

    The backward is written out instead of autograd's through torch.fft, which for irfftn makes rfftn of dy
    and doubles the inner bins of the whole half spectrum (a pass over it), and for rfftn zero-fills a full
    complex spectrum (twice x's size), copies the gradient in and runs a complex transform of it all. With
    R = rfftn(dy) unnormalised (the mix kernel reads its kept modes): dW = sum_b conj(X) R c_out,
    dx = irfftn(mix^H(R c_out / c_in)) (backward normalisation; the kernel zero-fills the rest),
    db = sum_b R at frequency 0, where c_out, c_in are the bins' Hermitian counts on the output and input
    grids (1 or 2; their ratio is 1 but for a kept Nyquist bin of one grid). The bias enters as frequency 0
    of the output spectrum (with fft_norm "forward" a constant), not as a pass over y. Saved: x (the
    caller's tensor) and the kept modes of its spectrum, not the whole spectrum (the size of x).
    ``tests/test_spectral_conv.py`` checks every gradient against autograd through the transforms."""

    @staticmethod
    def forward(ctx, x, weight, bias, p: Problem, cfg):
        d = p.d
        X = torch.fft.rfftn(_fft_ready(x.to(torch.float32)), dim=tuple(range(-d, 0)), norm="forward")
        W = weight.resolve_conj().contiguous()
        spec = torch.empty((p.batch, p.cout) + p.out_grid[:-1] + (_half(p.out_grid[-1]),), dtype=torch.complex64,
                           device=X.device)
        in_full = p.grid[:-1] + (_half(p.grid[-1]),)
        out_full = p.out_grid[:-1] + (_half(p.out_grid[-1]),)
        _mix(_Spec.of(torch.view_as_real(X), (0, 1), p.modes, in_full, True),
             _Spec.of(torch.view_as_real(W), (0, 1), p.modes, p.modes, False),
             _Spec.of(torch.view_as_real(spec), (0, 1), p.modes, out_full, True), p.batch, p.cin, p.cout, p.modes,
             False, False, True, cfg, p.precision)
        if bias is not None:  # frequency 0 of the output: a constant on the grid (fft_norm "forward")
            spec[(slice(None), slice(None)) + (0,) * d].add_(bias.reshape(-1).to(torch.float32))
        y = _irfftn(spec, p)
        ctx.save_for_backward(x, weight, bias,
                              _gather(X, p.modes, p.grid).contiguous() if ctx.needs_input_grad[1] else None)
        ctx.p, ctx.cfg, ctx.prec = p, cfg, p.precision
        return y.to(p.dtype)

    @staticmethod
    @variant_backward
    def backward(ctx, gy):
        x, weight, bias, Xk = ctx.saved_tensors
        p, cfg, prec = ctx.p, ctx.cfg, ctx.prec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, by the torch variant's math
            return graph_grads(lambda x, w, b: _torch_run(p, x, w, b), (x, weight, bias), (need_x, need_w, need_b),
                               gy) + (None, None)
        d = p.d
        R = torch.fft.rfftn(_fft_ready(gy.to(torch.float32)), dim=tuple(range(-d, 0)), norm="backward")
        Rr = torch.view_as_real(R)
        in_full = p.grid[:-1] + (_half(p.grid[-1]),)
        out_full = p.out_grid[:-1] + (_half(p.out_grid[-1]),)
        c_out = _bin_counts(p.modes[-1], p.out_grid[-1])
        gx = gw = gb = None
        if need_b:  # frequency 0: the sum of dy over the grid
            gb = R[(slice(None), slice(None)) + (0,) * d].real.sum(0).reshape(bias.shape).to(bias.dtype)
        if need_w:
            gw = torch.empty(weight.shape, dtype=torch.complex64, device=R.device)
            _mix(_Spec.of(torch.view_as_real(Xk), (1, 0), p.modes, p.modes, False),
                 _Spec.of(Rr, (0, 1), p.modes, out_full, True),
                 _Spec.of(torch.view_as_real(gw), (0, 1), p.modes, p.modes, False),
                 p.cin, p.batch, p.cout, p.modes, True, False, False, cfg, prec)
            gw = _scale_bins_(gw, c_out).to(weight.dtype)
        if need_x:
            ratio = [a / b for a, b in zip(c_out, _bin_counts(p.modes[-1], p.grid[-1]))]
            if any(r != 1 for r in ratio):  # R is this backward's own: scaled in place, after grad W read it
                _scale_bins_(R[..., : p.modes[-1]], ratio)
            W = weight.resolve_conj().contiguous()
            gX = torch.empty((p.batch, p.cin) + in_full, dtype=torch.complex64, device=R.device)
            _mix(_Spec.of(Rr, (0, 1), p.modes, out_full, True),
                 _Spec.of(torch.view_as_real(W), (1, 0), p.modes, p.modes, False),
                 _Spec.of(torch.view_as_real(gX), (0, 1), p.modes, in_full, True),
                 p.batch, p.cout, p.cin, p.modes, False, True, True, cfg, prec)
            # gX's self-conjugate planes are not Hermitian (the +k and -k weights are independent): projected,
            # as the forward's spectrum is, or cuFFT's c2r gave a wrong grad x (0.099 normalised error at 2D
            # 256^2, 32 modes, on an H200; numpy's and MKL's drop the anti-Hermitian part themselves)
            gx = torch.fft.irfftn(_hermitian_planes_(gX, p.grid[-1], p.modes[-1]), s=p.grid, dim=tuple(range(-d, 0)),
                                  norm="backward").to(x.dtype)
        return gx, gw, gb, None, None


def _fft_mix_run(p: Problem, x, weight, bias, config=None):
    return _FFTMixFn.apply(x, weight, bias, p, config or _mix_default(p))


# --------------------------------------------------------------------------- variant dft_gemm
def _m2p(m: int) -> int:
    """Float columns of a compact interleaved last axis: 2m rounded up to a multiple of 16, the extra
    columns zero. Triton specializes integer arguments divisible by 16, so row strides and column
    counts of the spectra are then known to allow 16-byte vector loads and stores (with 2m = 34 at
    17 kept modes every access was a 4-byte one: ``perf/inspect_kernels.py``); it costs a few more
    bytes of the (small) intermediate spectra."""
    return (2 * m + 15) // 16 * 16


@functools.lru_cache(maxsize=256)
def _bases(n: int, m: int, last: bool, out_n: int, device: str) -> dict:
    """float32 DFT bases for one axis (built in float64 from exact integer phases), all contiguous.

    last axis:  "F" [n, m2p]: x -> interleaved half spectrum (with 1/n), zero columns past 2m;
                "G" [m2p, out_n]: interleaved half spectrum -> real (with multiplicities 1 or 2),
                zero rows past 2m (``_m2p``);
                "FT", "GT": their transposes, contiguous, which the forward's stages read as F and G
                (reduction axis contiguous; see ``_Plan.analysis``), as the backward's read F and G as
                F^T and G^T.
    other axes: "F" (re, im) [m, n] analysis with 1/n, "G" (re, im) [out_n, m] synthesis, and
                "F_adj"/"G_adj": their conjugate transposes (re, im) for the backward pass.
    """
    dev = torch.device(device)
    j = torch.arange(m, dtype=torch.int64)
    src = torch.arange(n, dtype=torch.int64)
    dst = torch.arange(out_n, dtype=torch.int64)

    def f32(t):
        return t.to(torch.float32).contiguous().to(dev)

    if last:
        ang = 2 * math.pi * ((src[:, None] * j[None, :]) % n).double() / n
        F = torch.stack([torch.cos(ang), -torch.sin(ang)], dim=-1).reshape(n, 2 * m) / n
        c = torch.tensor(_bin_counts(m, out_n), dtype=torch.float64)
        ang = 2 * math.pi * ((j[:, None] * dst[None, :]) % out_n).double() / out_n
        G = torch.stack([c[:, None] * torch.cos(ang), -c[:, None] * torch.sin(ang)], dim=1).reshape(2 * m, out_n)
        pad = _m2p(m) - 2 * m
        F = torch.nn.functional.pad(F, (0, pad))
        G = torch.nn.functional.pad(G, (0, 0, 0, pad))
        return {"F": f32(F), "G": f32(G), "FT": f32(F.t()), "GT": f32(G.t())}
    f = j - m // 2
    ang = 2 * math.pi * ((f[:, None] * src[None, :]) % n).double() / n
    Fr, Fi = torch.cos(ang) / n, -torch.sin(ang) / n
    ang = 2 * math.pi * ((dst[:, None] * f[None, :]) % out_n).double() / out_n
    Gr, Gi = torch.cos(ang), torch.sin(ang)
    return {"F": (f32(Fr), f32(Fi)), "F_adj": (f32(Fr.t()), f32(-Fi.t())),
            "G": (f32(Gr), f32(Gi)), "G_adj": (f32(Gr.t()), f32(-Gi.t()))}


@functools.lru_cache(maxsize=256)
def _split_bases(n: int, m: int, last: bool, out_n: int, device: str) -> dict:
    """``_bases`` with every matrix as its split for 3xTF32, (hi, lo) (``split_tf32``): made once per basis
    instead of in every program of every GEMM that loads a tile of it."""
    def split(t):
        return tuple(split_tf32_torch(t))

    return {k: split(v) if isinstance(v, torch.Tensor) else tuple(split(t) for t in v)
            for k, v in _bases(n, m, last, out_n, device).items()}


def _presplit(cfg: dict, prec: str) -> bool:
    """Split the DFT bases for 3xTF32 on the host (config PRESPLIT, on by default): compiled for sm_90 with
    Triton 3.6 the GEMM loops take fewer instructions (no per-tile split of the basis or NaN patch of the
    correction terms; the complex stages split their data tile once for both products), at twice the basis
    bytes read per tile; not yet timed on a GPU, hence the knob."""
    return prec == "tf32x3" and bool(cfg.get("PRESPLIT", 1))


def _bmm(a, a2, b, c, batch, M, N, K, sa, sb, sc, cfg, prec, bias=None, bias_div=1, bias_n=1, block_n=None,
         a_lo=None, a2_lo=None, b_lo=None):
    """Launch _bmm_kernel; sa/sb/sc are (batch, row, col) strides. ``a_lo`` (with ``a2_lo``) or ``b_lo``: that
    operand is a DFT basis split on the host for 3xTF32 (``_Plan``), given as its high part and this low part
    (same strides)."""
    BM, BK = cfg["BLOCK_M"], cfg["BLOCK_K"]
    BN, BN2 = block_n or cfg["BLOCK_N"], 0
    if cfg.get("TILE_FIT", 0):
        BN, BN2 = _col_tiles(N, BN)
        BK = _fit_k(K, BK)
    warps = cfg.get("num_warps", 4)
    # at most 64 float32 accumulators a thread: compiled for sm_90 (Triton 3.6), the last-axis stages of 33 to 64
    # kept modes (128 columns) spilled 1.3 KB with 128 x 128 tiles on 4 warps and 256 x 128 on 8, and none with
    # half the rows (perf/inspect_kernels.py spectral_conv 2d-128-b8-c64-m64 dft_gemm --grid)
    while BM > 16 and BM * (BN + BN2) > 64 * 32 * warps:
        BM //= 2
    tm, tn = cdiv(M, BM), cdiv(N, BN + BN2)
    grid = (batch * tm * tn,)
    presplit = 1 if b_lo is not None else 2 if a_lo is not None else 0
    _bmm_kernel[grid](
        a, a if a2 is None else a2, b, c, c if bias is None else bias, a if a_lo is None else a_lo,
        a if a2_lo is None else a2_lo, b if b_lo is None else b_lo, M, N, K, tm, tn,
        sa[0], sa[1], sa[2], sb[0], sb[1], sb[2], sc[0], sc[1], sc[2], bias_div, bias_n,
        SWAP=a2 is not None, HAS_BIAS=bias is not None,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PREC=prec, PRESPLIT=presplit, BLOCK_N2=BN2,
        num_warps=warps, num_stages=cfg.get("num_stages", 2), **LAUNCH_OPTIONS,
    )


def _last_block_n(cols: int) -> int:
    return max(16, min(128, _pow2(cols)))


def _col_tiles(cols: int, bn: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_N2) for a stage of ``cols`` columns that one tile of ``bn`` would cover with padding
    (config TILE_FIT): the largest power of 2 up to ``cols``, then the rest rounded up to a power of 2 (at
    least 16, the smallest tensor-core tile), where the two cover fewer columns than ``bn``. The padded
    last axis of 17 to 24 kept modes is 48 columns: 32 + 16 where one tile computes 64."""
    if cols >= bn:
        return bn, 0
    if cols <= 16 or _pow2(cols) == cols:
        return max(16, _pow2(cols)), 0
    hi = _pow2(cols) // 2
    lo = max(16, _pow2(cols - hi))
    return (hi, lo) if hi >= 16 and hi + lo < bn else (bn, 0)


def _fit_k(k: int, bk: int) -> int:
    """BLOCK_K for a reduction of ``k`` (config TILE_FIT): a smaller power of 2 (not below 16) where it cuts
    the padded reduction by at least an eighth (48 in steps of 16, not two steps of 32 of which the last
    is half zeros), else ``bk``."""
    best = bk
    for c in (bk // 2, bk // 4, bk // 8):
        if c >= 16 and cdiv(k, c) * c * 8 <= cdiv(k, best) * best * 7:
            best = c
    return best


def _real_stage(inp, mat, rows, K, N, cfg, prec, out_dtype, transpose=False, bias=None, bias_div=1, bias_n=1):
    """[rows, K] @ mat (or mat^T) -> [rows, N] on the last axis. ``mat``: a basis, or its host split (hi, lo)."""
    out = torch.empty((rows, N), dtype=out_dtype, device=inp.device)
    mat, lo = mat if isinstance(mat, tuple) else (mat, None)
    sb = (0, mat.stride(1), mat.stride(0)) if transpose else (0, mat.stride(0), mat.stride(1))
    _bmm(inp, None, mat, out, 1, rows, N, K, (0, K, 1), sb, (0, N, 1), cfg, prec,
         bias=bias, bias_div=bias_div, bias_n=bias_n, block_n=_last_block_n(N) if N <= 128 else None, b_lo=lo)
    return out


def _complex_stage(inp, mat, P, L, Q, K_out, cfg, prec):
    """out[p] = (re + i im) @ inp[p] on interleaved complex columns; inp [P, L, Q] -> [P, K_out, Q].

    ``mat`` is a (re, im) pair of contiguous [K_out, L] matrices, or of their host splits (hi, lo).
    """
    mr, mi = mat
    (mr, mr_lo), (mi, mi_lo) = (mr, mi) if isinstance(mr, tuple) else ((mr, None), (mi, None))
    out = torch.empty((P, K_out, Q), dtype=torch.float32, device=inp.device)
    # 64-row tiles (one Hopper warpgroup MMA), where the second accumulator of i*A2 @ B fits: compiled for
    # sm_90 (Triton 3.6) at 2D 256^2, 32 modes, the stage into the modes takes 650 loop instructions per
    # 64 rows against 1383 per 128 rows of which 3/4 were masked (and 356 B of spills) with the config's
    # 128-row tiles and the swapped reloads of B, the stage out to the grid 650 per 64 rows against 1361 per
    # 128 with 368 B of spills (perf/inspect_kernels.py); the config's BLOCK_M still sets the real stages
    cfg = dict(cfg, BLOCK_M=64)
    if mr_lo is not None:  # four basis tiles a stage: 3 stages took 128 KB of shared memory (one block per SM)
        cfg["num_stages"] = min(cfg.get("num_stages", 2), 2)
    _bmm(mr, mi, inp, out, P, K_out, Q, L, (0, L, 1), (L * Q, Q, 1), (K_out * Q, Q, 1), cfg, prec,
         a_lo=mr_lo, a2_lo=mi_lo)
    return out


def _kept(spec: torch.Tensor, p: Problem) -> torch.Tensor:
    """The kept modes of a padded compact spectrum [B, C, *modes[:-1], m2p / 2, 2] (a strided view)."""
    return spec[..., : p.modes[-1], :]


class _Plan:
    """Bases and sizes of one dft_gemm problem. Compact spectra are [B, C, *modes[:-1], m2p / 2, 2]
    float32 with the last axis padded by zero modes to ``_m2p`` floats (aligned rows)."""

    def __init__(self, p: Problem, split: bool = False):
        d, dev = p.d, str(p.device)
        self.p = p
        # split: each basis as its host split (hi, lo) for 3xTF32 (_split_bases)
        bases = _split_bases if split else _bases
        self.last = bases(p.grid[-1], p.modes[-1], True, p.out_grid[-1], dev)
        self.mid = [bases(p.grid[ax], p.modes[ax], False, p.out_grid[ax], dev) for ax in range(d - 1)]

    def spectrum(self, batch: int, channels: int, device) -> torch.Tensor:
        """A zeroed padded compact spectrum (the mix writes the kept modes; the padding must read 0)."""
        p = self.p
        return torch.zeros((batch, channels) + p.modes[:-1] + (_m2p(p.modes[-1]) // 2, 2), dtype=torch.float32,
                           device=device)

    def analysis(self, x, cfg, prec):
        """x [B, C, *grid] -> padded compact interleaved spectrum [B, C, *modes[:-1], m2p / 2, 2] (float32)."""
        p, d = self.p, self.p.d
        lead = x.shape[0] * x.shape[1]
        m2 = _m2p(p.modes[-1])
        rows = x.numel() // p.grid[-1]
        # F read through its transpose FT, so that a tile of the basis is contiguous along the reduction: Hopper's
        # TF32 wgmma takes its operands K-major from shared memory, and the host split's tiles go there as
        # loaded (compiled for sm_90, Triton 3.6, 2D 256^2, 32 modes: F itself was copied in 4-byte cp.async
        # pieces, 96 a thread per loop against 24 of 16 bytes for x's tile; the backward, reading F^T, had
        # none) (perf/inspect_kernels.py); the same for G in ``synthesis``
        t = _real_stage(x.contiguous(), self.last["FT"], rows, p.grid[-1], m2, cfg, prec, torch.float32,
                        transpose=True)
        for ax in range(d - 2, -1, -1):
            P = lead * math.prod(p.grid[:ax])
            Q = math.prod(p.modes[ax + 1:-1]) * m2
            t = _complex_stage(t, self.mid[ax]["F"], P, p.grid[ax], Q, p.modes[ax], cfg, prec)
        return t.view(x.shape[0], x.shape[1], *p.modes[:-1], m2 // 2, 2)

    def analysis_adjoint(self, g, cfg, prec, out_dtype):
        """Adjoint of ``analysis``: padded compact spectrum gradient -> gradient on x's grid."""
        p, d = self.p, self.p.d
        lead = g.shape[0] * g.shape[1]
        m2 = _m2p(p.modes[-1])
        t = g
        for ax in range(d - 1):
            P = lead * math.prod(p.grid[:ax])
            Q = math.prod(p.modes[ax + 1:-1]) * m2
            t = _complex_stage(t, self.mid[ax]["F_adj"], P, p.modes[ax], Q, p.grid[ax], cfg, prec)
        rows = t.numel() // m2
        gx = _real_stage(t, self.last["F"], rows, m2, p.grid[-1], cfg, prec, out_dtype, transpose=True)
        return gx.view(g.shape[0], g.shape[1], *p.grid)

    def synthesis(self, Y, cfg, prec, out_dtype, bias=None):
        """Padded compact spectrum -> y [B, O, *out_grid] (+ bias per channel)."""
        p, d = self.p, self.p.d
        lead = Y.shape[0] * Y.shape[1]
        m2 = _m2p(p.modes[-1])
        t = Y
        for ax in range(d - 1):
            P = lead * math.prod(p.out_grid[:ax])
            Q = math.prod(p.modes[ax + 1:-1]) * m2
            t = _complex_stage(t, self.mid[ax]["G"], P, p.modes[ax], Q, p.out_grid[ax], cfg, prec)
        rows = t.numel() // m2
        per_channel = math.prod(p.out_grid[:-1])
        y = _real_stage(t, self.last["GT"], rows, m2, p.out_grid[-1], cfg, prec, out_dtype, transpose=True,
                        bias=bias, bias_div=per_channel, bias_n=p.cout)
        return y.view(Y.shape[0], Y.shape[1], *p.out_grid)

    def synthesis_adjoint(self, gy, cfg, prec):
        """Adjoint of ``synthesis`` (without bias): gradient on y -> padded compact spectrum gradient."""
        p, d = self.p, self.p.d
        lead = gy.shape[0] * gy.shape[1]
        m2 = _m2p(p.modes[-1])
        rows = gy.numel() // p.out_grid[-1]
        t = _real_stage(gy.contiguous(), self.last["G"], rows, p.out_grid[-1], m2, cfg, prec, torch.float32,
                        transpose=True)
        for ax in range(d - 2, -1, -1):
            P = lead * math.prod(p.out_grid[:ax])
            Q = math.prod(p.modes[ax + 1:-1]) * m2
            t = _complex_stage(t, self.mid[ax]["G_adj"], P, p.out_grid[ax], Q, p.modes[ax], cfg, prec)
        return t.view(gy.shape[0], gy.shape[1], *p.modes[:-1], m2 // 2, 2)


class _DFTConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p: Problem, cfg):
        prec = p.precision
        plan = _Plan(p, _presplit(cfg, prec))
        W = torch.view_as_real(weight.resolve_conj().contiguous())
        X = plan.analysis(x, cfg, prec)
        Y = plan.spectrum(p.batch, p.cout, x.device)
        _mix(_Spec.of(_kept(X, p), (0, 1), p.modes, p.modes, False), _Spec.of(W, (0, 1), p.modes, p.modes, False),
             _Spec.of(_kept(Y, p), (0, 1), p.modes, p.modes, False), p.batch, p.cin, p.cout, p.modes,
             False, False, False, cfg, prec)
        b = None if bias is None else bias.reshape(-1).contiguous()
        y = plan.synthesis(Y, cfg, prec, p.dtype, bias=b)
        # the compact spectra for the backward, and the caller's x and weight (references, no copies) for a
        # double backward
        ctx.save_for_backward(X, W, x, weight)
        ctx.plan, ctx.cfg, ctx.prec = plan, cfg, prec
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return y

    @staticmethod
    @variant_backward
    def backward(ctx, gy):
        X, W, x, weight = ctx.saved_tensors
        plan, cfg, prec = ctx.plan, ctx.cfg, ctx.prec
        p = plan.p
        gx = gw = gb = None
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, by the torch variant's math
            gx, gw = graph_grads(lambda x, w: _torch_run(p, x, w, None), (x, weight), ctx.needs_input_grad[:2], gy)
        spectral = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if ctx.needs_input_grad[2] and (torch.is_grad_enabled() or not spectral):
            dims = (0,) + tuple(range(2, 2 + p.d))
            gb = gy.to(torch.float32).sum(dim=dims).reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
        if torch.is_grad_enabled() or not spectral:
            return gx, gw, gb, None, None
        gY = plan.synthesis_adjoint(gy, cfg, prec)
        if ctx.needs_input_grad[2]:  # gY's frequency 0 (index m // 2 on the first axes, 0 on the last; real part)
            # is the sum of dy over the grid: the bias gradient without a pass over dy of its own
            dc = (slice(None), slice(None)) + tuple(m // 2 for m in p.modes[:-1]) + (0, 0)
            gb = gY[dc].sum(0).reshape(ctx.bias_meta[0]).to(ctx.bias_meta[1])
        if ctx.needs_input_grad[0]:
            gX = plan.spectrum(p.batch, p.cin, X.device)
            _mix(_Spec.of(_kept(gY, p), (0, 1), p.modes, p.modes, False), _Spec.of(W, (1, 0), p.modes, p.modes, False),
                 _Spec.of(_kept(gX, p), (0, 1), p.modes, p.modes, False), p.batch, p.cout, p.cin, p.modes,
                 False, True, False, cfg, prec)
            gx = plan.analysis_adjoint(gX, cfg, prec, p.dtype)
        if ctx.needs_input_grad[1]:
            gW = torch.empty_like(W)
            _mix(_Spec.of(_kept(X, p), (1, 0), p.modes, p.modes, False),
                 _Spec.of(_kept(gY, p), (0, 1), p.modes, p.modes, False),
                 _Spec.of(gW, (0, 1), p.modes, p.modes, False), p.cin, p.batch, p.cout, p.modes,
                 True, False, False, cfg, prec)
            gw = torch.view_as_complex(gW)
        return gx, gw, gb, None, None


def _dft_supports(p: Problem) -> str | None:
    base = _triton_supports(p)
    if base:
        return base
    if 2 * p.modes[-1] > 128:
        return f"dft_gemm keeps at most 64 last-axis modes, got {p.modes[-1]}"
    # the compact mode spectra go through the 32-bit mixing kernel
    return offsets_fit(**{"the kept modes": p.batch * max(p.cin, p.cout) * math.prod(p.modes[:-1])
                          * _m2p(p.modes[-1])})


def _dft_cfgs(p: Problem) -> list[dict]:
    """GEMM tiles x mixing tiles: two fixed ones and the problem's default (``_mix_default``), so the grid
    holds the default config (its mixing tile was outside the grid on five of the GPU cases); each with the
    DFT bases split on the host for 3xTF32 (PRESPLIT), the default with Triton's split, and the default with
    its tiles fitted to the padded last axis (TILE_FIT)."""
    mixes = [{"MIX_R": 16, "MIX_O": 32, "MIX_S": 32}, {"MIX_R": 32, "MIX_O": 64, "MIX_S": 16}]
    mix_default = {k: v for k, v in _mix_default(p).items() if k.startswith("MIX_")}
    mixes += [mix_default] if mix_default not in mixes else []
    out = []
    for bm, bk, w, s in ((64, 32, 4, 2), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (256, 32, 8, 3)):
        for mix in mixes:
            out.append({"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": bk, "num_warps": w, "num_stages": s, **mix,
                        "PRESPLIT": 1})
    out.append(dict(_dft_default(p), PRESPLIT=0))  # Triton's own 3xTF32 split at the default's tiles (_presplit)
    # the default's tiles fitted to the stages' padded lengths (_col_tiles, _fit_k): compiled for sm_90 (Triton 3.6)
    # at 2D 256^2, 32 modes, the 48-column stages take 3/4 of the tensor-core work (twice the wgmma instructions,
    # each half as wide or less) for 23-45% more loop instructions (perf/inspect_kernels.py spectral_conv
    # 2d-256-b32-c64-m32 dft_gemm --mode fwdbwd --grid); not timed yet, hence tuned, not the default
    out.append(dict(_dft_default(p), TILE_FIT=1))
    return _prune_mix(p, out)


def _dft_default(p: Problem) -> dict:
    # 128-row tiles, 3 stages: the better GEMM stages on 6 of the 9 entries tuned on an H100 (commit d45d06e;
    # the cache file is in git history, autotune/caches/README.md), e.g. 1.56 against 1.89 ms forward+backward
    # on the 94^2 grid, 2.00 against 2.18 ms forward on the 256^2 one; 64-row 2-stage tiles won only the 64^2
    # forward and the m16x8 training call. (On Triton 3.6 these tiles spilled ~350 B in the complex stages and
    # were measured faster all the same; the complex stages now run 64-row tiles whatever the config.)
    return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3, **_mix_default(p),
            "PRESPLIT": 1}


def _dft_run(p: Problem, x, weight, bias, config=None):
    cfg = config or _dft_default(p)
    return _DFTConvFn.apply(x, weight, bias, p, cfg)


# --------------------------------------------------------------------------- registration
def _make_inputs(case: Case, device, dtype=torch.float32, requires_grad=False, seed=0):
    """Random inputs for a case: (problem, (x, weight, bias))."""
    c = case.params
    gen = torch.Generator().manual_seed(seed)
    grid, modes = tuple(c["grid"]), tuple(c["modes"])
    x = torch.randn((c["batch"], c["cin"]) + grid, generator=gen, dtype=torch.float64)
    std = (2.0 / (c["cin"] + c["cout"])) ** 0.5
    w = torch.randn((c["cin"], c["cout"]) + modes, generator=gen, dtype=torch.complex128) * std
    bias = torch.randn((c["cout"],), generator=gen, dtype=torch.float64) * std
    wdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    bdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    w = w.to(device=device, dtype=wdt).requires_grad_(requires_grad)
    bias = bias.to(device=device, dtype=bdt).requires_grad_(requires_grad)
    out_shape = tuple(c["out_grid"]) if c.get("out_grid") else None
    p = _check(x, w, bias, out_shape, len(grid))
    return p, (x, w, bias)


def _reference(x, w, bias, p: Problem):
    from opforge.reference.spectral_conv import spectral_conv as ref

    return ref(x, w, bias, p.out_grid)


def _roofline(p: Problem) -> dict:
    """Memory floor: read x once, write y once (weights and bias are small and counted too)."""
    el = torch.empty((), dtype=p.dtype).element_size()
    x_bytes = p.batch * p.cin * math.prod(p.grid) * el
    y_bytes = p.batch * p.cout * math.prod(p.out_grid) * el
    w_bytes = p.cin * p.cout * math.prod(p.modes) * 8
    k = math.prod(p.modes)
    mix_flops = 8 * p.batch * p.cin * p.cout * k
    return {"bytes": x_bytes + y_bytes + w_bytes, "flops": mix_flops, "bound": "memory"}


def _case(name, batch, cin, cout, grid, n_modes, tags, out_grid=None):
    modes = tuple(n_modes[:-1]) + (n_modes[-1] // 2 + 1,)
    params = {"batch": batch, "cin": cin, "cout": cout, "grid": tuple(grid), "modes": modes}
    if out_grid:
        params["out_grid"] = tuple(out_grid)
    return Case(name, params, tags)


CASES = [
    # realistic shapes (GPU): the tuning and bench set
    _case("1d-1024-b20-c64-m16", 20, 64, 64, (1024,), (16,), ("gpu",)),
    _case("2d-64-b20-c32-m12", 20, 32, 32, (64, 64), (12, 12), ("gpu",)),
    _case("2d-64-b20-c32-m16", 20, 32, 32, (64, 64), (16, 16), ("gpu",)),
    _case("2d-94-b20-c32-m16", 20, 32, 32, (94, 94), (16, 16), ("gpu",)),
    _case("2d-128-b8-c64-m64", 8, 64, 64, (128, 128), (64, 64), ("gpu",)),
    _case("2d-256-b32-c64-m32", 32, 64, 64, (256, 256), (32, 32), ("gpu", "main")),
    _case("3d-64-b1-c64-m32", 1, 64, 64, (64, 64, 64), (32, 32, 32), ("gpu",)),
    # the torch variant at a size a CPU user meets (the `cpu` case set)
    _case("2d-64-b4-c16-m12", 4, 16, 16, (64, 64), (12, 12), ("cpu",)),
    # small shapes: CPU torch path and the Triton interpreter
    _case("1d-small-odd", 2, 3, 5, (17,), (6,), ("small",)),
    _case("2d-small-odd", 2, 3, 5, (11, 9), (6, 6), ("small",)),
    _case("2d-small-resample", 2, 4, 3, (12, 10), (4, 6), ("small",), out_grid=(16, 14)),
    _case("3d-small-odd", 1, 2, 3, (7, 6, 9), (4, 4, 4), ("small",)),
]

OP = register(Op(
    name="spectral_conv",
    doc="FNO spectral convolution (neuraloperator SpectralConv semantics), 1D/2D/3D",
    make_inputs=_make_inputs,
    reference=_reference,
    cases=CASES,
    roofline=_roofline,
    reduction=lambda p: p.cin * math.prod(p.grid),
    # issue 2, H100, forward+backward at 2D 256², B=32, C=64, 32 modes: 3x neuraloperator, within 2x of the
    # read-x-once/write-y-once floor (50% of peak bandwidth), at most half neuraloperator's peak memory
    targets=[Target("2d-256-b32-c64-m32", "fwdbwd", "speedup", 3.0, ("neuraloperator", "neuralop-algorithm")),
             Target("2d-256-b32-c64-m32", "fwdbwd", "frac_peak", 0.5),
             Target("2d-256-b32-c64-m32", "fwdbwd", "peak_memory", 0.5, ("neuraloperator", "neuralop-algorithm"))],
))
OP.add(Variant("torch", "torch", _torch_run, sources=(_torch_run, _torch_mix, _gather, _contiguous, _irfftn,
                                                             _hermitian_planes_, _fft_ready, _fft_grad_ready,
                                                             _freq_index, _half)))
if HAS_TRITON:
    OP.add(Variant("dft_gemm", "triton", _dft_run,
                   configs=_dft_cfgs, default_config=_dft_default,
                   supports=_dft_supports,
                   sources=(_bmm_kernel, _bmm_cols, _bmm_store, _mix_kernel, _Spec, _mix, _bmm, _last_block_n, _col_tiles, _fit_k, _real_stage, _complex_stage,
                            _kept, _Plan, _DFTConvFn, _bases, _bin_counts, _m2p, _dft_cfgs, _mix_default, _prune_mix,
                            _dft_run, _split_bases, _presplit, *SPLIT_SOURCES)))
    OP.add(Variant("fft_mix", "triton", _fft_mix_run,
                   configs=lambda p: _prune_mix(p, _mix_cfgs()), default_config=_mix_default,
                   supports=lambda p: _triton_supports(p) or _full_spectra_fit(p),
                   sources=(_mix_kernel, _Spec, _mix, _FFTMixFn, _gather, _freq_index, _bin_counts, _scale_bins_,
                            _mix_cfgs, _prune_mix, _fft_mix_run, _irfftn, _hermitian_planes_, _fft_ready,
                            _fft_grad_ready, _half)))


# --------------------------------------------------------------------------- public API
def spectral_conv(x, weight, bias=None, output_shape: Sequence[int] | None = None, fft_norm: str = "forward"):
    """Spectral convolution of any dimension (taken from ``weight``'s rank).

    Args:
        x: real tensor [B, in, *grid] (float32, bfloat16, float16 or float64).
        weight: complex tensor [in, out, m_1, ..., m_d], neuraloperator's layout.
        bias: [out] or [out, 1, ..., 1], or None.
        output_shape: spatial size of y (resolution change), default the input grid.
        fft_norm: ``norm`` of the forward and the inverse transform, as in ``torch.fft``: "forward" (the
            default, neuraloperator's), "backward" or "ortho". They differ only when the grid changes.

    Returns:
        y [B, out, *output_shape] in x's dtype.
    """
    p = _check(x, weight, bias, output_shape, None)
    return _call(p, x, weight, bias, fft_norm)


FFT_NORMS = ("forward", "backward", "ortho")


def _normed(weight: torch.Tensor, p: Problem, fft_norm: str) -> torch.Tensor:
    """The weight that gives ``fft_norm``'s output through the "forward"-normed kernels.

    Norm "forward" divides the forward transform by the input grid's N_in points and leaves the inverse
    alone; "backward" divides the inverse by the output grid's N_out; "ortho" divides each by the root of
    its size. End to end the three differ by a constant: "backward" is N_in / N_out times "forward", and
    "ortho" the root of that. So the weight is scaled, once per call and only where the grid changes."""
    if fft_norm == "forward" or p.grid == p.out_grid:
        return weight
    ratio = math.prod(p.grid) / math.prod(p.out_grid)
    return weight * (ratio if fft_norm == "backward" else ratio ** 0.5)


def _check_fft_norm(fft_norm) -> None:
    if fft_norm not in FFT_NORMS:
        raise ValueError(f"fft_norm must be one of {list(FFT_NORMS)} (torch.fft's norms; neuraloperator's default "
                         f"'forward'), got {fft_norm!r}")


_TRACE_GRADIENTS = (
    "torch.jit.trace of a spectral convolution: the traced forward is right at any batch size (at the traced "
    "resolution), but from a traced module's second call on, TorchScript's optimized execution differentiates chains of "
    "complex products without conjugating them (a TorchScript bug), so its gradients are wrong. Trace under "
    "torch.no_grad() for inference; to differentiate the traced module, run it inside "
    "torch.jit.optimized_execution(False), or train with the eager module or torch.compile.")


def _call(p: Problem, x, weight, bias, fft_norm: str = "forward"):
    _check_fft_norm(fft_norm)
    if traced(x, weight, bias):  # torch.compile / torch.export: one graph node (kernels/_graph_op.py)
        # (the norm's scaling inside it: inductor generates no code for complex arithmetic, and warns)
        return _GRAPH_OP(x, weight, bias, list(p.out_grid), p.d, fft_norm)
    if torch.jit.is_tracing():
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            warnings.warn(_TRACE_GRADIENTS, RuntimeWarning, stacklevel=3)
        # The traced graph keeps the batch free but not the grid: which planes of the half spectrum are
        # self-conjugate (_hermitian_planes_) depends on the last axis's parity, a Python choice the tracer
        # bakes in (traced at 6 x 6, a 7 x 7 input came out wrong). The grid is pinned as constants here, so
        # another resolution is an error ("shape [...] is invalid for input of size ...") when the traced
        # module runs, never a wrong result.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # (the conversion to constants is the aim)
            x = x.reshape(tuple(x.shape[:2]) + tuple(int(n) for n in x.shape[2:]))
    weight = _normed(weight, p, fft_norm)
    if p.batch == 0 or p.cin == 0 or p.cout == 0:  # nothing to mix: every backend returns zeros plus the bias
        return _torch_run(p, x, weight, bias)
    return OP(p, x, weight, bias)


def _graph_eager(x, weight, bias, output_shape, d, fft_norm):
    return _call(_check(x, weight, bias, output_shape, d), x, weight, bias, fft_norm)


def _graph_fake(x, weight, bias, output_shape, d, fft_norm):
    p = _check(x, weight, bias, output_shape, d)
    return x.new_empty((p.batch, p.cout) + p.out_grid)


_GRAPH_OP = GraphOp("spectral_conv", "Tensor x, Tensor weight, Tensor? bias, SymInt[] output_shape, int d, "
                    "str fft_norm",
                    _graph_eager, _graph_fake)


def _fixed(d):
    def f(x, weight, bias=None, output_shape=None, fft_norm="forward"):
        p = _check(x, weight, bias, output_shape, d)
        return _call(p, x, weight, bias, fft_norm)

    f.__name__ = f"spectral_conv{d}d"
    f.__doc__ = (f"{d}D spectral convolution: x [B, in, {', '.join('n%d' % (i + 1) for i in range(d))}] real, "
                 f"weight [in, out, {', '.join('m%d' % (i + 1) for i in range(d))}] complex, bias [out] or None, "
                 f"fft_norm 'forward' (default), 'backward' or 'ortho'; returns [B, out, *output_shape]. "
                 f"See ``spectral_conv``.")
    return f


spectral_conv1d, spectral_conv2d, spectral_conv3d = _fixed(1), _fixed(2), _fixed(3)


def _spectral_resample(x: torch.Tensor, out: tuple) -> torch.Tensor:
    """x [B, C, *grid] on the grid ``out`` through its real spectrum (norm "forward", computed in float32, as
    neuraloperator's ``resample`` beyond 2D): on each axis but the last, k = min(old, new) frequencies are
    kept, the first k // 2 and the last ceil(k / 2) bins (frequencies -ceil(k/2) .. k//2 - 1); on the last,
    the first min of the two half-spectrum lengths."""
    axes = tuple(range(2, x.dim()))
    X = torch.fft.rfftn(_fft_ready(x.float()), dim=axes, norm="forward")
    spec = X.new_zeros(tuple(X.shape[:2]) + out[:-1] + (_half(out[-1]),))
    src, dst = [slice(None), slice(None)], [slice(None), slice(None)]
    for ax, (n_old, n_new) in enumerate(zip(X.shape[2:-1], out[:-1])):
        k = min(n_old, n_new)
        freqs = torch.arange(-((k + 1) // 2), k // 2, device=x.device)
        src.append(freqs % n_old)
        dst.append(freqs % n_new)
    k = min(X.shape[-1], spec.shape[-1])
    src.append(slice(0, k))
    dst.append(slice(0, k))
    d = len(axes)  # the index tensors of the first d - 1 axes broadcast to their outer product
    src = [s if isinstance(s, slice) else s.view([-1] + [1] * (d - 2 - i)) for i, s in enumerate(src[2:])]
    dst = [s if isinstance(s, slice) else s.view([-1] + [1] * (d - 2 - i)) for i, s in enumerate(dst[2:])]
    spec[(slice(None), slice(None), *dst)] = X[(slice(None), slice(None), *src)]
    # an even k keeps frequency -k/2 but not +k/2: the self-conjugate planes projected as in _irfftn, so
    # that cuFFT's c2r gives numpy's result too
    _hermitian_planes_(spec, out[-1], k)
    return _fft_grad_ready(torch.fft.irfftn(spec, s=out, dim=axes, norm="forward"))


# --------------------------------------------------------------------------- factorized weights (TFNO)
FACTORIZATIONS = ("dense", "tucker", "cp", "tt")


def _fraction_rank(kind: str, shape: tuple, rank: float, fixed: list) -> tuple:
    """Ranks that keep about ``rank`` times the dense tensor's parameters, by the rules tensorly applies to
    a float rank (so that layers built alike have the same factor shapes and load each other's weights):

    * tucker: ranks c * n_k (at least 1; the ``fixed`` modes keep their full size), where c solves
      c^N' prod(n) + c (sum over free modes of n_k^2 + sum over fixed modes of n_k^2) = rank prod(n),
      N' the number of free modes (core plus factors);
    * cp: round(rank prod(n) / sum(n));
    * tt: ranks c (n_k + n_{k+1}) / 2 between modes (at least 1), 1 at both ends, where c solves
      a c^2 + b c = rank prod(n) for the cores' sizes written with those mean widths.
    Rounding is to the nearest integer, ties to even (numpy's, and Python's ``round``)."""
    n = list(shape)
    total = math.prod(n)
    if kind == "cp":
        return (int(round(total * rank / sum(n))),)
    if kind == "tucker":
        free = [s for i, s in enumerate(n) if i not in fixed]
        sq = sum(s * s for s in free) + sum(n[i] ** 2 for i in fixed)

        def budget(c):
            return total * c ** len(free) + sq * c - rank * total

        lo, hi = 0.0, max(rank, 1.0)  # budget(0) < 0 <= budget(hi): bisection to float precision
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if budget(mid) < 0 else (lo, mid)
        c = (lo + hi) / 2
        return tuple(s if i in fixed else max(int(round(s * c)), 1) for i, s in enumerate(n))
    avg = [(n[i] + n[i + 1]) / 2 for i in range(len(n) - 1)]
    a = sum(avg[i - 1] * n[i] * avg[i] for i in range(1, len(n) - 1)) if len(avg) > 1 else avg[0] ** 2 * n[0]
    b = n[0] * avg[0] + n[-1] * avg[-1]
    c = (-b + math.sqrt(b * b + 4 * a * total * rank)) / (2 * a)
    return (1,) + tuple(max(int(round(d * c)), 1) for d in avg) + (1,)


class _Factors(nn.Module):
    """The factors, as parameters ``factor_0``, ``factor_1``, ... (tltorch's ``FactorList`` names)."""

    def __init__(self, shapes, device, dtype):
        super().__init__()
        for i, s in enumerate(shapes):
            self.register_parameter(f"factor_{i}", nn.Parameter(torch.empty(s, device=device, dtype=dtype)))
        self.n = len(shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return getattr(self, f"factor_{i}")

    def __len__(self) -> int:
        return self.n

    def reset_parameters(self):
        """Nothing: the factors are drawn by their ``FactorizedWeight`` (one deviation for all of them), which
        a per-module reset (FSDP's deferred initialisation) reaches as well."""


class FactorizedWeight(nn.Module):
    """A spectral weight (a layer's [in, out, *modes], or [C, *modes] when separable) held in factored form,
    as neuraloperator's factorized layers (TFNO: tltorch's tensors) hold it, under the same parameter names,
    so their state dicts load:

    * ``"tucker"``: ``core`` [r_1, ..., r_N] and ``factors.factor_k`` [n_k, r_k];
    * ``"cp"``: ``weights`` [R] and ``factors.factor_k`` [n_k, R];
    * ``"tt"``: ``factors.factor_k`` [r_k, n_k, r_{k+1}], r_0 = r_N = 1.

    ``rank``: a float (the fraction of the dense tensor's parameters to keep, ranks chosen as tensorly chooses
    them), or the ranks themselves (tucker: an int for every mode or N ints; cp: an int; tt: an int between
    modes or N + 1 ints). ``fixed_rank_modes``: modes a Tucker rank keeps at full size. Every call rebuilds
    the dense tensor (``to_tensor()``, differentiable: a product per factor, [in, out, *modes] values)
    and the layer's kernels run on it; the factors get their gradients through it."""

    def __init__(self, kind: str, shape, rank=0.5, fixed_rank_modes=None, device=None, dtype=torch.complex64):
        super().__init__()
        if kind not in FACTORIZATIONS[1:]:
            raise ValueError(f"factorization must be one of {list(FACTORIZATIONS)} (or None), got {kind!r}")
        self.shape = int_tuple(shape)
        if self.shape is None or len(self.shape) < 2 or any(s < 1 for s in self.shape):
            raise ValueError(f"shape must be the weight's sizes, two or more positive ints, got {shape!r}")
        self.kind = kind
        N = len(self.shape)
        fixed = int_tuple(() if fixed_rank_modes is None else fixed_rank_modes)
        if fixed is None or any(not 0 <= m < N for m in fixed) or (fixed and kind != "tucker"):
            raise ValueError(f"fixed_rank_modes must be modes of the weight (0 to {N - 1}) and applies to "
                             f"factorization='tucker' only, got {fixed_rank_modes!r} for {kind!r}")
        fixed = sorted(set(fixed))
        want = {"tucker": N, "cp": 1, "tt": N + 1}[kind]
        if isinstance(rank, float) and not isinstance(rank, bool):
            if not (0 < rank and math.isfinite(rank)):
                raise ValueError(f"a fractional rank must be positive and finite, got {rank!r}")
            ranks = _fraction_rank(kind, self.shape, rank, fixed)
        elif (r := as_int(rank)) is not None:  # one int (of any integer kind) for every mode
            ranks = {"tucker": tuple(self.shape[i] if i in fixed else r for i in range(N)), "cp": (r,),
                     "tt": (1,) + (r,) * (N - 1) + (1,)}[kind]
        else:
            ranks = int_tuple(rank) or ()
        if (not ranks or len(ranks) != want or any(r < 1 for r in ranks)
                or (kind == "tt" and (ranks[0], ranks[-1]) != (1, 1))):
            raise ValueError(f"rank for factorization={kind!r} of a weight of shape {self.shape} must be a positive "
                             f"float (a fraction of its parameters) or {'an int or ' if kind != 'cp' else ''}"
                             f"{want} positive int{'s' if want > 1 else ''}"
                             f"{' starting and ending in 1' if kind == 'tt' else ''}, got {rank!r}")
        self.rank = ranks if kind != "cp" else ranks[0]
        if kind == "tucker":
            self.core = nn.Parameter(torch.empty(ranks, device=device, dtype=dtype))
            shapes = [(n, r) for n, r in zip(self.shape, ranks)]
        elif kind == "cp":
            self.weights = nn.Parameter(torch.empty(ranks[0], device=device, dtype=dtype))
            shapes = [(n, ranks[0]) for n in self.shape]
        else:
            shapes = [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(self.shape)]
        self.factors = _Factors(shapes, device, dtype)
        self.init_std = 1.0  # the dense entries' deviation reset_parameters draws (SpectralConv sets its own)

    def reset_parameters(self):
        """Draw the factors anew: ``normal_(0, init_std)``."""
        self.normal_(0, self.init_std)

    @property
    def dtype(self) -> torch.dtype:
        return self.factors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.factors[0].device

    @torch.no_grad()
    def normal_(self, mean: float = 0.0, std: float = 1.0) -> "FactorizedWeight":
        """Factors drawn so that the dense tensor's entries have standard deviation ``std``: each entry is a sum
        of prod(r) products of independent draws, so s = (std / sqrt(prod r))^(1 / factors per product).
        tucker: the core and every factor N(0, s^2), s = (std / prod sqrt(r_k))^(1 / (N + 1)); cp: weights 1,
        factors s = (std / sqrt(R))^(1 / N) (both tltorch's rules); tt: cores s = (std / prod sqrt(r_k))^(1 / N).
        (tltorch divides by prod r_k for TT, which leaves the entries std / sqrt(prod r_k): 200x too small for
        a 32-channel layer at rank 0.5.)"""
        if mean != 0:
            raise ValueError(f"only mean=0 is supported, got {mean}")
        N = len(self.shape)
        if self.kind == "tucker":
            s = (std / math.prod(math.sqrt(r) for r in self.rank)) ** (1 / (N + 1))
            self.core.normal_(0, s)
        elif self.kind == "cp":
            s = (std / math.sqrt(self.rank)) ** (1 / N)
            self.weights.fill_(1)
        else:
            s = (std / math.prod(math.sqrt(r) for r in self.rank)) ** (1 / N)
        for k in range(N):
            self.factors[k].normal_(0, s)
        return self

    def to_tensor(self) -> torch.Tensor:
        """The dense tensor of ``shape``, contiguous (differentiable in the factors): one matrix product per
        factor (tensorly's mode products), where a single einsum over every factor made a strided tensor
        several times slower to build."""
        N = len(self.shape)
        f = [self.factors[k] for k in range(N)]
        if self.kind == "tucker":
            # t: [r_k, ..., r_{N-1}, n_0, ..., n_{k-1}]; each step contracts its leading rank with factor k
            # and appends n_k, so the last step leaves [n_0, ..., n_{N-1}] in order
            t = self.core
            for k in range(N):
                t = (t.reshape(t.shape[0], -1).T @ f[k].T).reshape(t.shape[1:] + (self.shape[k],))
            return t
        if self.kind == "cp":
            # Khatri-Rao rows of the first N - 1 factors (the weights folded into the first), then one product
            t = f[0] * self.weights
            for k in range(1, N - 1):
                t = (t[:, None, :] * f[k][None, :, :]).reshape(-1, t.shape[-1])
            return (t @ f[N - 1].T).reshape(self.shape)
        t = f[0].reshape(self.shape[0], -1)  # [n_0, r_1]
        for k in range(1, N):
            t = (t @ f[k].reshape(f[k].shape[0], -1)).reshape(-1, f[k].shape[-1])
        return t.reshape(self.shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # tltorch's Complex* tensors store each factor as a real view [..., 2]
        for name, p in self.named_parameters():
            key = prefix + name
            t = state_dict.get(key)
            if isinstance(t, torch.Tensor) and p.is_complex() and not t.is_complex() and t.shape == p.shape + (2,):
                state_dict[key] = torch.view_as_complex(t.contiguous())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.kind!r}, shape={self.shape}, rank={self.rank}"


class SpectralConv(nn.Module):
    """FNO spectral convolution with neuraloperator's ``SpectralConv`` semantics, dense or factorized (TFNO).

    Args:
        in_channels, out_channels: channel counts.
        n_modes: int or sequence, one per spatial axis: the total number of
            modes kept; the last axis keeps ``n_modes[-1] // 2 + 1`` half-spectrum
            modes, the others ``n_modes[i]`` modes centred on frequency 0.
        bias: learn a bias of shape [out, 1, ..., 1].
        fft_norm: the transforms' ``norm``: ``"forward"`` (neuraloperator's default), ``"backward"`` or
            ``"ortho"``, as torch.fft takes it; they give different outputs only on a resolution change.
        init_std: std of the complex normal init, ``"auto"`` = sqrt(2 / (in + out)).
        resolution_scaling_factor: optional float or per-axis floats; output
            size = round(input size * factor) when ``output_shape`` is not given.
        max_n_modes: optional, the weight's mode dims as neuraloperator takes them (the last axis
            already halved); default the modes ``n_modes`` keeps. ``n_modes`` may be set lower later.
        factorization: None or ``"dense"`` (a complex ``weight`` parameter), or ``"tucker"``, ``"cp"``,
            ``"tt"`` (case-insensitive): the weight held in factored form (``FactorizedWeight``, TFNO's
            layers), with ``rank`` (a fraction of the dense parameters, or the ranks) and
            ``fixed_rank_modes`` (True: the in-channel mode keeps its full Tucker rank, or a list of modes).
            Each call rebuilds the dense weight from its factors and runs the same kernels.
        implementation: "reconstructed" or "factorized", accepted for neuraloperator: both compute the same
            function here (the weight is rebuilt, then mixed densely).
        separable: a weight [C, *max_n_modes] that multiplies each channel's modes by its own (in_channels ==
            out_channels = C), neuraloperator's separable layer: mixed as the [C, C, *modes] weight with it on
            the diagonal (``dense_weight()``), by the same kernels.

    Shapes: x [B, in, *grid] -> y [B, out, *output_shape].
    Parameters: ``weight`` complex64 [in, out, *max_n_modes] (or a ``FactorizedWeight`` of that shape),
    ``bias`` [out, 1, ..., 1].

    Fewer modes than the weight holds, as in neuraloperator: ``layer.n_modes = (8, 8)`` (totals, as in the
    constructor; incremental training) uses the weight's centre, and a grid (input or output) too coarse
    for the kept modes keeps those that fit on it, centred on frequency 0 (the first ones on the last
    axis). Each weight entry multiplies its own frequency (neuraloperator 2.0 agrees when an even number
    of modes is dropped per axis). The functional ``spectral_conv`` instead raises on modes that do not fit.

    Works as neuraloperator's ``conv_module`` (``FNO(..., conv_module=SpectralConv)``): it takes the
    arguments FNO blocks pass (``TFNO``'s factorized weights and separable layers included; complex-data or
    half-precision layers raise) and has their ``transform`` for skip connections.

    Loading neuraloperator weights: ``SpectralConv.from_neuraloperator(layer)``
    or ``load_state_dict(layer.state_dict())`` -- neuraloperator's dense weight is
    stored as ``weight.tensor`` (a real view [..., 2]) and is converted; factorized weights load under
    their names (``weight.core``, ``weight.factors.factor_0``, ...) into a layer built alike.
    """

    def __init__(self, in_channels: int, out_channels: int, n_modes, *, bias: bool = True, fft_norm: str = "forward",
                 init_std="auto", resolution_scaling_factor=None, device=None, dtype=torch.complex64,
                 max_n_modes=None, complex_data: bool = False, separable: bool = False,
                 fno_block_precision: str = "full", factorization=None, rank=0.5, implementation="reconstructed",
                 fixed_rank_modes=False, decomposition_kwargs=None):
        super().__init__()
        in_channels, out_channels = positive_ints(in_channels=in_channels, out_channels=out_channels)
        kept = self._kept_modes(n_modes, None)
        _check_fft_norm(fft_norm)
        # neuraloperator's FNOBlocks passes these to its conv_module; rank and fixed_rank_modes only shape
        # factorized weights (a dense layer ignores them)
        for name, v, want in (("complex_data", complex_data, False),
                              ("fno_block_precision", fno_block_precision, "full")):
            if v != want:
                raise ValueError(f"{name}={v!r} is not supported: only real-data layers in full precision "
                                 f"({name}={want!r}; run bfloat16 inputs or autocast for 16-bit activations)")
        if separable and in_channels != out_channels:
            raise ValueError(f"separable=True mixes each channel with itself: in_channels must equal out_channels, "
                             f"got {in_channels} and {out_channels}")
        kind = "dense" if factorization is None else str(factorization).lower()
        if kind not in FACTORIZATIONS:
            raise ValueError(f"factorization must be None or one of {list(FACTORIZATIONS)} (any case), got "
                             f"{factorization!r}")
        if implementation not in ("reconstructed", "factorized"):
            raise ValueError(f"implementation must be 'reconstructed' or 'factorized', got {implementation!r}")
        if decomposition_kwargs:
            raise ValueError(f"decomposition_kwargs are not supported (factors are drawn, not decomposed from a "
                             f"tensor), got {decomposition_kwargs!r}")
        if isinstance(fixed_rank_modes, bool):  # neuraloperator's: True keeps the in-channel mode's full rank
            fixed_rank_modes = [0] if fixed_rank_modes else None
        if not (isinstance(dtype, torch.dtype) and dtype.is_complex):
            raise TypeError(f"dtype must be a complex dtype for the weight, got {dtype!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.order = len(kept)
        if max_n_modes is None:
            modes = tuple(kept)
        else:
            modes = int_tuple(max_n_modes, one=True) or ()
            if len(modes) != self.order or any(m < k for m, k in zip(modes, kept)):
                raise ValueError(f"max_n_modes must be {self.order} ints (the weight's mode dims, the last axis "
                                 f"halved), each at least the {kept} modes n_modes keeps, got {max_n_modes!r}")
        self._n_modes = kept
        self.fft_norm = fft_norm
        if resolution_scaling_factor is not None:
            f = resolution_scaling_factor
            try:  # (number: no text, booleans or meta tensors; a tensor of many values, or none, is refused)
                name = "resolution_scaling_factor"
                f = [number(f, name)] * self.order if isinstance(f, numbers.Real) else [number(v, name) for v in f]
            except (TypeError, ValueError, RuntimeError):
                f = []
            if len(f) != self.order or any(not (v > 0 and math.isfinite(v)) for v in f):
                raise ValueError(f"resolution_scaling_factor must be positive and finite, one per axis, "
                                 f"got {resolution_scaling_factor!r}")
            resolution_scaling_factor = f
        self.resolution_scaling_factor = resolution_scaling_factor
        self.init_std = (2 / (in_channels + out_channels)) ** 0.5 if init_std == "auto" else number(init_std, "init_std")
        if not (self.init_std >= 0 and math.isfinite(self.init_std)):
            raise ValueError(f"init_std must be 'auto' or a finite number >= 0, got {init_std!r}")
        self.separable = bool(separable)
        shape = ((in_channels,) if separable else (in_channels, out_channels)) + modes
        if kind == "dense":
            self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        else:
            self.weight = FactorizedWeight(kind, shape, rank, fixed_rank_modes, device=device, dtype=dtype)
            self.weight.init_std = self.init_std
        self.factorization = None if kind == "dense" else kind
        if bias:
            rdt = torch.float64 if dtype == torch.complex128 else torch.float32
            self.bias = nn.Parameter(torch.empty((out_channels,) + (1,) * self.order, device=device, dtype=rdt))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """neuraloperator's initialisation: weight ~ complex N(0, init_std^2), bias ~ N(0, init_std^2)
        (for ``to_empty`` after building on the meta device, as FSDP does). A factorized weight's factors
        are drawn so that its dense tensor's entries have that deviation (``FactorizedWeight.normal_``)."""
        self.weight.normal_(0, self.init_std)
        if self.bias is not None:
            self.bias.normal_(0, self.init_std)

    def _apply(self, fn, recurse=True):
        """Module casts keep the weight complex and the bias real, at the precision the cast asks for:
        torch's ``Module.to(<real dtype>)`` would cast the weight to real, dropping its imaginary part,
        ``.double()`` leaves complex tensors at complex64, and ``.to(<complex dtype>)`` makes the bias
        complex. float64 or complex128 give a complex128 weight; float32, 16-bit dtypes or complex64 a
        complex64 one (16-bit inputs are computed in float32). A factorized weight's factors alike."""
        # the values before: the complex weight (or each factor of a factorized one) and the bias
        weights = {name: p.data for name, p in self.named_parameters() if p.is_complex()}
        bias = None if self.bias is None else self.bias.data
        with warnings.catch_warnings():  # the imaginary parts torch warns it discards are put back below
            warnings.filterwarnings("ignore", message="Casting complex values to real")
            super()._apply(fn, recurse)
        # what the cast makes of real tensors: float32 and float64 kept as they are for a move (.cuda())
        probe = next(iter(weights.values()), None)
        to = set() if probe is None else {fn(torch.zeros(1, device=probe.device, dtype=dt)).dtype
                                          for dt in (torch.float32, torch.float64)}
        if to != {torch.float32, torch.float64} and len(to) == 1:
            to = to.pop()
            cdt = torch.complex128 if to in (torch.float64, torch.complex128) else torch.complex64
            params = dict(self.named_parameters())
            for name, before in weights.items():
                if params[name].dtype != cdt:
                    params[name].data = before.to(device=params[name].device, dtype=cdt)
            if bias is not None and self.bias.is_complex():
                rdt = torch.float64 if cdt == torch.complex128 else torch.float32
                self.bias.data = bias.to(device=self.bias.device, dtype=rdt)
        return self

    @staticmethod
    def _kept_modes(n_modes, order) -> list:
        """Total modes per axis (an int or one per axis) -> kept modes (the last axis halved: n // 2 + 1)."""
        n = list(int_tuple(n_modes, one=True) or ())
        if not 1 <= len(n) <= 3 or (order is not None and len(n) != order) or any(m < 1 for m in n):
            want = "1 to 3" if order is None else str(order)
            raise ValueError(f"n_modes must be {want} positive ints (one per spatial axis), got {n_modes!r}")
        return n[:-1] + [n[-1] // 2 + 1]

    @property
    def n_modes(self) -> list:
        """Modes kept per axis, as neuraloperator reports them (the last axis halved: n // 2 + 1). Set it
        with totals, as in the constructor, to use fewer modes than the weight holds."""
        return list(self._n_modes)

    @n_modes.setter
    def n_modes(self, n_modes):
        kept = self._kept_modes(n_modes, self.order)
        if any(k > m for k, m in zip(kept, self.max_n_modes)):
            raise ValueError(f"n_modes {n_modes!r} keeps {kept} modes, more than the weight's {self.max_n_modes}")
        self._n_modes = kept

    @property
    def max_n_modes(self) -> list:
        """The weight's mode dims (the last axis halved)."""
        return list(self.weight.shape[1 if self.separable else 2:])

    @property
    def modes(self) -> tuple:
        """The weight's mode dims (last axis: half spectrum)."""
        return tuple(self.max_n_modes)

    def dense_weight(self) -> torch.Tensor:
        """The complex weight [in, out, *max_n_modes]: the parameter itself, or a factorized weight rebuilt;
        a separable layer's [C, *modes] weight on the diagonal of a [C, C, *modes] one."""
        w = self.weight if self.factorization is None else self.weight.to_tensor()
        return torch.diag_embed(w.movedim(0, -1), dim1=0, dim2=1) if self.separable else w

    def _weight_for(self, w, grid, out_grid) -> torch.Tensor:
        """The centre of the weight ``w`` that this call uses: ``n_modes`` per axis, fewer where the input or the
        output grid cannot hold them (frequencies -k//2 .. k - k//2 - 1 on the first axes, 0 .. k - 1 on the
        last)."""
        for ax, (m, k) in enumerate(zip(self.max_n_modes, self._n_modes)):
            last = ax == self.order - 1
            for g in (grid, out_grid):
                if ax < len(g):
                    k = min(k, _half(g[ax]) if last else g[ax])
            if k < m:
                start = 0 if last else m // 2 - k // 2
                w = w.narrow(2 + ax, start, k)
        return w

    def _output_shape(self, grid: tuple, output_shape) -> tuple | None:
        """The output grid asked for: ``output_shape``, else the input grid times
        ``resolution_scaling_factor`` (rounded), else None (the input grid)."""
        if output_shape is not None:
            return _out_grid(output_shape, self.order)
        if self.resolution_scaling_factor is not None and len(grid) == self.order:
            out = tuple(round(n * f) for n, f in zip(grid, self.resolution_scaling_factor))
            if any(n < 1 for n in out):
                raise ValueError(f"resolution_scaling_factor={self.resolution_scaling_factor} maps x's grid "
                                 f"{grid} to {out}: fewer than one point on an axis")
            return out
        return None

    def forward(self, x: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        grid = tuple(x.shape[2:]) if isinstance(x, torch.Tensor) else ()
        output_shape = self._output_shape(grid, output_shape)
        out_grid = grid if output_shape is None else output_shape
        weight = self.dense_weight()
        weight = self._weight_for(weight, grid, out_grid) if len(grid) == self.order else weight
        p = _check(x, weight, self.bias, output_shape, self.order)
        return _call(p, x, weight, self.bias, self.fft_norm)

    def transform(self, x: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Resample a skip connection to this layer's output grid, as neuraloperator's FNO blocks call it:
        x itself when the grid does not change, else linear interpolation (1D), bicubic (2D), both with
        aligned corners, or (3D) the kept low frequencies of x on the new grid (``_spectral_resample``)."""
        if not isinstance(x, torch.Tensor) or x.is_complex() or not x.is_floating_point():
            raise TypeError(f"x must be a real floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != self.order + 2 or 0 in x.shape[2:]:
            raise ValueError(f"x must be [batch, channels, *grid] with {self.order} spatial axes of at least one "
                             f"point, got shape {tuple(x.shape)}")
        grid = tuple(x.shape[2:])
        out = self._output_shape(grid, output_shape)
        out = grid if out is None else out
        if out == grid:
            return x
        if len(grid) == 1:
            return torch.nn.functional.interpolate(x, size=out[0], mode="linear", align_corners=True)
        if len(grid) == 2:
            return torch.nn.functional.interpolate(x, size=out, mode="bicubic", align_corners=True)
        return _spectral_resample(x, out)

    def extra_repr(self) -> str:
        extra = "" if self._n_modes == self.max_n_modes else f", max_n_modes={self.max_n_modes}"
        extra += "" if self.fft_norm == "forward" else f", fft_norm={self.fft_norm!r}"
        extra += "" if self.factorization is None else f", factorization={self.factorization!r}, rank={self.weight.rank}"
        extra += ", separable=True" if self.separable else ""
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, n_modes={self.n_modes}"
                f"{extra}, bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy = prefix + "weight.tensor"  # neuraloperator / tltorch ComplexDenseTensor
        if legacy in state_dict and prefix + "weight" not in state_dict:
            w = state_dict.pop(legacy)
            if not w.is_complex():
                w = torch.view_as_complex(w.contiguous())
            state_dict[prefix + "weight"] = w
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_neuraloperator(cls, layer) -> "SpectralConv":
        """Build from a neuraloperator ``SpectralConv`` (1D/2D/3D, real data, separable or not): a dense weight
        is copied; a Tucker, CP or TT one (TFNO) keeps its factors, and any other factored form is rebuilt dense."""
        if getattr(layer, "complex_data", False):
            raise ValueError("only real-data neuraloperator SpectralConv layers convert (complex_data=False)")
        if not hasattr(layer, "weight"):
            raise TypeError(f"layer must be a neuraloperator SpectralConv (a module with a weight), got "
                            f"{type(layer).__name__}")
        separable = bool(getattr(layer, "separable", False))
        w = layer.weight
        kind = {"TuckerTensor": "tucker", "CPTensor": "cp", "TTTensor": "tt", "ComplexTuckerTensor": "tucker",
                "ComplexCPTensor": "cp", "ComplexTTTensor": "tt"}.get(type(w).__name__)
        dense = w if isinstance(w, torch.Tensor) else None if kind else w.to_tensor()
        ref = dense if dense is not None else w.factors[0]
        shape = tuple(int(n) for n in (dense.shape if dense is not None else w.shape))
        modes = list(shape[1 if separable else 2:])
        n_modes = modes[:-1] + [2 * (modes[-1] - 1)]
        rank = 0.5 if kind is None else w.rank if isinstance(w.rank, int) else tuple(int(r) for r in w.rank)
        cdt = ref.dtype if ref.is_complex() else torch.complex64
        out = cls(shape[0], shape[0 if separable else 1], n_modes, bias=layer.bias is not None, device=ref.device,
                  separable=separable,
                  dtype=cdt, resolution_scaling_factor=getattr(layer, "resolution_scaling_factor", None),
                  fft_norm=getattr(layer, "fft_norm", "forward"), factorization=kind, rank=rank)
        kept = [int(m) for m in getattr(layer, "n_modes", modes)]
        if len(kept) == len(modes) and all(1 <= k <= m for k, m in zip(kept, modes)):
            out._n_modes = kept  # neuraloperator reports the modes it keeps with the last axis halved already
        with torch.no_grad():
            if kind is None:
                out.weight.copy_(dense.detach())
            else:
                out.weight.load_state_dict(w.state_dict())
            if layer.bias is not None:
                out.bias.copy_(layer.bias.detach())
        return out
