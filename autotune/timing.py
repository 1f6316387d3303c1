"""Timing: ``triton.testing.do_bench`` on CUDA (median and quantiles, L2 flushed), a wall-clock loop on CPU."""
from __future__ import annotations

import statistics
import time

import torch


def bench(fn, device, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3) -> dict:
    """Time ``fn()`` and return ``{"p20", "p50", "p80"}`` in milliseconds.

    On CUDA this is ``triton.testing.do_bench`` (it clears L2 before every
    repetition and times with CUDA events). On the CPU, a warm-up call and then
    at least ``min_reps`` calls or ``rep_ms`` of wall time, whichever is longer.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        first = _cuda_times(fn, 1)[0]  # also the warm-up: compiles and caches
        if first > rep_ms / 5:
            # do_bench would spend five calls estimating before it starts: time a slow call directly.
            times = sorted(_cuda_times(fn, min_reps))
            return {"p20": times[0], "p50": statistics.median(times), "p80": times[-1]}
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        return {"p20": float(q[0]), "p50": float(q[1]), "p80": float(q[2])}
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"p20": qs[1], "p50": statistics.median(times), "p80": qs[7]}


_L2_FLUSH: dict = {}


def wall_ms(fn, device, repeat: int) -> float:
    """The median wall-clock milliseconds of ``repeat`` calls of ``fn()`` after one warm-up call, each between
    CUDA synchronizes on a GPU: how the perf/ scripts time whole solver and GP calls (many kernels and host
    reads each, where a flushed L2 per kernel means nothing)."""
    cuda = torch.device(device).type == "cuda"
    fn()
    out = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def flush_l2(device) -> None:
    """Overwrite a 256 MB buffer (more than any GPU's L2) so the next kernel starts cold; no-op off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def _cuda_times(fn, n: int) -> list[float]:
    """``n`` CUDA-event timings of ``fn()`` in ms, each after an L2 flush."""
    out = []
    for _ in range(n):
        flush_l2("cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def peak_memory(fn, device) -> int | None:
    """Peak bytes allocated while running ``fn()`` on CUDA (None on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_memory(forward, device) -> int | None:
    """Bytes a forward pass leaves allocated for its backward (activation memory): allocated after
    ``forward()`` minus before, less the output itself (None on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    y = forward()
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - base
    if isinstance(y, torch.Tensor):
        held -= y.untyped_storage().nbytes()
    del y
    return max(held, 0)
