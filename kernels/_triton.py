"""Triton availability, interpreter mode and device facts, shared by every op.

Nothing here touches the GPU at import time: device facts are read lazily.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re

import torch

# The oldest Triton opforge's kernels run on: the test suite passes with Triton 3.3, 3.6, 3.7 and 3.9 (the
# interpreter, and compiled for sm_90 without a GPU). Triton 3.2's tl.dot rejects the tiles under 16 rows,
# columns or depth that small calls' configs use, and the interpreter of 3.0 and 3.1 fails on a kernel with
# a loop (interpreter_problem's probe).
MIN_TRITON = (3, 3)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0" or "3.4.0+git1234"."""
    return tuple(int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in version.split(".")[:2])


try:  # Triton is optional: opforge's torch paths work without it, and with a Triton older than MIN_TRITON.
    import triton
    import triton.language as tl

    if _release(triton.__version__) < MIN_TRITON:
        TRITON_MISSING = (f"Triton {triton.__version__} is older than the {'.'.join(map(str, MIN_TRITON))} "
                          f"opforge's kernels need")
        triton = tl = None
    else:
        TRITON_MISSING = None
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None
    TRITON_MISSING = "Triton is not installed"
HAS_TRITON = TRITON_MISSING is None


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """None when Triton's CPU interpreter runs a small kernel here (or is not switched on), else what goes
    wrong and what to do about it. Triton 3.6's interpreter fails under NumPy 2.4 on every kernel that
    loops over a runtime bound (``int()`` of a one-element array, which NumPy 2.4 refuses); Triton 3.9
    works with it, and Triton 3.6 with NumPy 2.3."""
    if not interpreter_enabled():
        return None

    @triton.jit
    def _probe(X, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i0 in range(0, n, BLOCK):
            acc += tl.load(X + i0 + tl.arange(0, BLOCK))
        tl.store(X + tl.arange(0, BLOCK), acc)

    try:
        x = torch.ones(8)
        _probe[(1,)](x, 8, BLOCK=4)
        if x[:4].tolist() != [2.0] * 4:
            return f"Triton {triton.__version__}'s interpreter computed a wrong sum in a two-step loop here"
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return interpreter_advice(e)
    return None


def interpreter_advice(e: BaseException) -> str:
    """What to tell a user whose Triton interpreter raised ``e`` on opforge's probe kernel."""
    import numpy as np

    msg = f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails here: {e!r}"
    if "0-dimensional arrays" in repr(e) or "0-dimensional arrays" in repr(e.__cause__):
        msg += (f". This Triton's interpreter needs an older NumPy than {np.__version__}: "
                f"pip install 'numpy<2.4', or a newer Triton (3.9 works)")
    return msg


def triton_can_run(device: torch.device) -> bool:
    """Can a Triton kernel run on tensors of this device?"""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


# The SM count of the GPU a compile-only run compiles for (``opforge.autotune.precompile``'s workers, which
# run launchers on CPU tensors): launchers that size their grids to the GPU (KAN's grad-W splits, kernel
# sums' column splits) then pass the kernels the values a run on that GPU passes, so the kernels compiled
# ahead are the ones the run looks up. None outside such a run.
_COMPILE_TARGET_SMS: int | None = None


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host-side sizes (launch grids, splits). ``triton.cdiv`` is a constexpr function
    since Triton 3.6, whose call from Python costs 1.6 us; the launchers take a dozen per call."""
    return -(-a // b)


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of the CUDA device ``device``; on other devices those of the GPU a
    compile-only run compiles for, or None (the interpreter's CPU runs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _COMPILE_TARGET_SMS


def triton_version() -> str:
    """Triton's major.minor, or "none"."""
    if not HAS_TRITON:
        return "none"
    return ".".join(triton.__version__.split(".")[:2])


def tf32_allowed() -> bool:
    """Does torch's float32 matmul setting allow TF32? (``torch.backends.cuda.matmul.fp32_precision =
    "tf32"``, or ``torch.set_float32_matmul_precision("high"/"medium")``; off by default.)"""
    try:
        matmul = getattr(torch.backends.cuda, "matmul", None)
        fp = getattr(matmul, "fp32_precision", None)  # torch >= 2.9
        if fp is None:
            return torch.get_float32_matmul_precision() != "highest"
        if fp == "none":  # inherits the generic setting
            fp = getattr(torch.backends, "fp32_precision", "none")
        return fp == "tf32"
    except RuntimeError:  # torch refuses to read a mix of its legacy and new APIs: stay exact
        return False


@contextlib.contextmanager
def allow_tf32(enabled: bool = True):
    """Set torch's float32 matmul precision to TF32 (or exact) for a block, through the API this torch has
    (``torch.backends.cuda.matmul.fp32_precision`` from torch 2.9, else ``set_float32_matmul_precision``)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:  # pragma: no cover - torch < 2.9
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)


def dot_precision(dtype: torch.dtype, follow_setting: bool = True) -> str:
    """``input_precision`` of the Triton dot products for data of ``dtype`` (computed in float32).

    float32 data follows torch's float32 matmul setting, like torch's own matmuls: by default
    (``"highest"`` / ``"ieee"``) 3xTF32, whose error is of float32's order; with TF32 allowed, TF32
    (one tensor-core pass instead of three, ~1e-3 relative error). Without ``follow_setting``
    float32 is always 3xTF32. bfloat16 data: TF32, whose operands (11 significant bits) are 8 times finer
    than the data's (8). float16 data: 3xTF32, as TF32 is no finer than float16 (11 bits both), and the
    tensor cores truncate TF32 operands, an error of one sign that compounds over chained products: with
    TF32, float16 spectral convolutions through ``dft_gemm`` (four GEMM stages) erred by 4.1e-3 of their
    largest output, past float16's tolerance (3.9e-3), where the torch variant erred by 4e-4
    (``OPFORGE_FUZZ_TC=1 OPFORGE_FUZZ_DTYPE=float16``, tests/test_api_fuzz.py, tensor cores emulated).
    """
    if dtype == torch.float16 or (dtype == torch.float32 and not (follow_setting and tf32_allowed())):
        return "tf32x3"
    return "tf32"


# 3xTF32 with an operand split once on the host. Triton's "tf32x3" dot splits both operands of every tile in
# the program that loads it (cvt.rna.tf32 and a subtraction per element) and patches NaN correction terms
# (a compare and a select per output element); for an operand that many programs load (a weight, a DFT
# matrix) that split is repeated by each of them. ``split_tf32`` makes it once, into two float32 tensors
# exact in TF32, and ``dot3`` (a kernel helper) splits only the other operand and accumulates three TF32
# products in place. Compiled for sm_90 (Triton 3.6) the KAN forward's basis loop takes 288 instructions per
# basis function for 408 with "tf32x3", the same 48 tensor-core instructions.
def split_tf32_torch(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``split_tf32`` in torch operations (any device; the reference of the Triton kernel's split)."""
    t = t.contiguous()
    hi = (t.view(torch.int32) & -8192).view(torch.float32)
    lo = (((t - hi).view(torch.int32) + 4096) & -8192).view(torch.float32)
    finite = torch.isfinite(t)  # (a NaN's payload bits cleared could read as infinity)
    return torch.where(finite, hi, t), torch.where(finite, lo, 0.0)


def split_tf32(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``t`` as ``(hi, lo)``, contiguous, for 3xTF32 dot products (``dot3``): ``hi`` is ``t`` with the
    13 mantissa bits TF32 drops cleared (never rounded up to infinity), ``lo = t - hi`` (exact) rounded to
    nearest at TF32's 10 bits, so ``hi + lo`` is ``t`` to 2^-22 of it (|t| >= 2^-100, where ``lo`` is
    normal) and both are exact in TF32 (the tensor cores' truncation of an operand loses nothing).
    Non-finite ``t``: ``hi = t``, ``lo = 0`` (the split itself makes no NaN; in ``dot3`` an infinite part
    times the other operand's zero part is NaN, as in an IEEE product sum with a zero term). One Triton pass
    where a kernel can run on ``t``'s device, else torch operations."""
    if t.dtype != torch.float32:
        raise TypeError(f"split_tf32 takes float32, got {t.dtype}")
    if not triton_can_run(t.device) or t.numel() == 0:
        return split_tf32_torch(t)
    t = t.contiguous()
    hi, lo = torch.empty_like(t), torch.empty_like(t)
    n = t.numel()
    _split_tf32_kernel[(cdiv(n, 1024),)](t, hi, lo, n, BLOCK=1024, **LAUNCH_OPTIONS)
    return hi, lo


# Offsets inside a Triton kernel are 32-bit unless made 64-bit explicitly (row index times row stride, say):
# past 2^31 - 1 elements they wrap around, and a kernel would read and write the wrong places. The kernels
# widen where a realistic size reaches that far (the batch and split offsets); the rest is checked here.
INT32_MAX = 2**31 - 1
GRID_YZ_MAX = 65535  # CUDA's limit on a launch grid's second and third dimensions


# Options every kernel launch passes. FP fusion (a * b + c compiled as one FMA) stays on, as every Triton up
# to 3.9 defaults to: the kernels were tuned, timed and checked on a GPU so (tests/test_precompile.py keeps them
# free of the one hazard it brings, an exact test of an FMA's result against 0). Triton 3.9 warns at a
# process's first compile that 3.10 turns the default off; a launch that names the option pins it and is not
# warned about.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

def offsets_fit(**elements: int) -> str | None:
    """None when every named tensor's element count stays within 32-bit offsets, else why not (for a
    variant's ``supports``: dispatch then runs the torch variant)."""
    for name, n in elements.items():
        if n > INT32_MAX:
            return (f"{name} would have {n} elements, past the 2^31 - 1 that the kernel's 32-bit offsets reach "
                    f"(the torch variant runs such calls)")
    return None


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset a strided tensor reaches from its first element."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def within_int32(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it when its strides reach past 32-bit offsets (a narrow view of a
    much wider tensor); ``offsets_fit`` has checked the element count itself."""
    return t.contiguous() if max_offset(t) > INT32_MAX else t


@functools.lru_cache(maxsize=None)
def device_info(device_index: int | None = None) -> dict:
    """Name and compute capability of the GPU at hand, or the CPU stand-in.

    Returns ``{"name", "cc", "triton", "tag"}``; ``tag`` names the autotune cache
    file and the perf results file for this device.
    """
    if torch.cuda.is_available():
        idx = torch.cuda.current_device() if device_index is None else device_index
        name = torch.cuda.get_device_name(idx)
        major, minor = torch.cuda.get_device_capability(idx)
        cc = f"{major}.{minor}"
    else:
        name = "cpu-interpreter" if interpreter_enabled() else "cpu"
        cc = "0.0"
    tv = triton_version()
    safe = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name)
    return {"name": name, "cc": cc, "triton": tv, "tag": f"{safe}_{cc}_triton{tv}"}


# Peak figures used to state the fraction of the roofline a kernel reaches.
# Dense tensor-core numbers without sparsity; HBM bandwidth as sold.
_PEAKS = [
    # (substring of the device name, HBM GB/s, FP32 (CUDA cores) TFLOP/s, TF32 TFLOP/s, BF16 TFLOP/s)
    ("H200", 4800.0, 67.0, 494.0, 989.0),
    ("H100 PCIe", 2000.0, 51.0, 378.0, 756.0),
    ("H100", 3350.0, 67.0, 494.0, 989.0),
    ("A100", 2039.0, 19.5, 156.0, 312.0),
]


def device_peaks(name: str) -> dict | None:
    """Peak bandwidth and FLOP/s for a known GPU name, else None."""
    for sub, gbs, fp32, tf32, bf16 in _PEAKS:
        if sub in name:
            return {"gbps": gbs, "fp32_tflops": fp32, "tf32_tflops": tf32, "bf16_tflops": bf16}
    return None


if HAS_TRITON:

    @triton.jit
    def tf32_hi_lo(a):
        """A float32 tile as ``hi + lo`` for 3xTF32: ``hi`` rounded to nearest at TF32's 10 mantissa bits (two
        integer ops on the bit pattern: cvt.rna.tf32's rounding), ``lo = a - hi`` exact. For tiles of bounded
        values (basis functions, gradients): a finite ``a`` within 2^-12 of float32's largest would round to
        infinity, and a NaN stays NaN in ``lo``."""
        hi = ((a.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)
        return hi, a - hi

    @triton.jit
    def dot3(acc, a_hi, a_lo, b_hi, b_lo):
        """``acc + (a_hi + a_lo) @ (b_hi + b_lo)`` by 3xTF32, each operand split beforehand (``split_tf32`` on
        the host, ``tf32_hi_lo`` in the kernel): three TF32 tensor-core products accumulated in place, small
        terms first (a_lo b_hi, a_hi b_lo, a_hi b_hi; a_lo b_lo, below 2^-22 of the product, dropped as by
        Triton's "tf32x3"), with no separate sum of the correction terms."""
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")

    @triton.jit
    def _split_tf32_kernel(T, HI, LO, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(T + offs, mask=mask, other=0.0)
        finite = tl.abs(t) <= 3.4028234663852886e38
        tf = tl.where(finite, t, 0.0)  # (no inf - inf below)
        hi = (tf.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        lo = (((tf - hi).to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)
        tl.store(HI + offs, tl.where(finite, hi, t), mask=mask)
        tl.store(LO + offs, lo, mask=mask)

    # what a variant that uses the split lists in its sources (its source hash then covers them)
    SPLIT_SOURCES = (split_tf32, split_tf32_torch, tf32_hi_lo, dot3, _split_tf32_kernel)
