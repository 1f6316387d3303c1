"""Triton availability, interpreter mode and device facts, shared by every op.

Nothing here touches the GPU at import time: device facts are read lazily.
"""
from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: opforge's torch paths work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(device: torch.device) -> bool:
    """Can a Triton kernel run on tensors of this device?"""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def triton_version() -> str:
    """Triton's major.minor, or "none"."""
    if not HAS_TRITON:
        return "none"
    return ".".join(triton.__version__.split(".")[:2])


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


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PREC`` of every opforge Triton dot for inputs of ``dtype``.

    float32 inputs: ``"split"``, 3xTF32 done by hand in :func:`dot` (float32-level error on tensor
    cores); 16-bit inputs: ``"tf32"`` on float32 tiles. ``OPFORGE_F32_DOT`` (``split``, ``tf32x3``,
    ``tf32``, ``ieee``) overrides the float32 choice, for diagnosis.
    """
    if dtype != torch.float32:
        return "tf32"
    choice = os.environ.get("OPFORGE_F32_DOT", "split")
    if choice not in ("split", "tf32x3", "tf32", "ieee"):
        raise ValueError(f"OPFORGE_F32_DOT={choice!r}: valid values are split, tf32x3, tf32, ieee")
    return choice


if HAS_TRITON:

    @triton.jit
    def _tf32_round(a):
        """``a`` rounded to the nearest TF32 value (10 mantissa bits; ties away from zero), which a
        TF32 tensor core then reads exactly (it would truncate the 13 low bits otherwise)."""
        return ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)

    @triton.jit
    def dot(a, b, acc, PREC: tl.constexpr):
        """``acc + a @ b`` on float32 tiles. ``PREC == "split"``: a = a_hi + a_lo, b = b_hi + b_lo with
        the parts rounded to TF32, then a_lo b_hi + a_hi b_lo + a_hi b_hi as three TF32 products
        (|a_lo b_lo| <= 2^-22 |a b|). Otherwise ``tl.dot`` with ``input_precision=PREC``.

        Triton 3.6's own "tf32x3" gave wrong results in some kernels on an H100 (KAN B-spline
        forward, large DFT GEMMs), while the same kernels with "tf32" were right: the split is
        written out here so it does not depend on that lowering.
        """
        if PREC == "split":
            a_hi = _tf32_round(a)
            b_hi = _tf32_round(b)
            acc = tl.dot(_tf32_round(a - a_hi), b_hi, acc, input_precision="tf32")
            acc = tl.dot(a_hi, _tf32_round(b - b_hi), acc, input_precision="tf32")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
        return acc
