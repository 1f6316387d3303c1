"""The autotuner: every Triton variant x config of an op vs the torch variant, on the GPU at hand.

Each config's output is checked against the torch variant before it is
timed, so a config that compiles but computes garbage can never win.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import cache
from .timing import bench


def _sanity_bound(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 1.0
    return ((a - b).abs().max().item() / (scale or 1.0)) if b.numel() else 0.0


def tune_problem(op, problem, args, persist: bool = True, path: Path | None = None, device: dict | None = None,
                 log=None) -> dict:
    """Time every (variant, config) on ``args`` and return the cache entry (winner first).

    With ``persist`` the entry is written to ``path`` (default: the user cache file of this GPU).
    """
    from opforge.kernels._triton import device_info

    if device is None:
        device = device_info(problem.device.index if problem.device.type == "cuda" else None)
    with torch.no_grad():
        expected = op.torch_variant.run(problem, *args, config=None)
        torch_ms = bench(lambda: op.torch_variant.run(problem, *args, config=None), problem.device)["p50"]
        timings, failures = [], []
        for v in op.triton_variants():
            if v.why_not(problem):
                continue
            for cfg in v.configs(problem):
                def fn(v=v, cfg=cfg):
                    return v.run(problem, *args, config=cfg)
                try:
                    err = _rel(fn(), expected)
                    if not err <= _sanity_bound(problem.dtype):
                        failures.append({"variant": v.name, "config": cfg, "error": f"wrong result (rel err {err:.2e})"})
                        continue
                    t = bench(fn, problem.device)
                except Exception as exc:  # a config that does not compile or does not fit is skipped
                    failures.append({"variant": v.name, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                timings.append({"variant": v.name, "config": cfg, "ms": t["p50"], "p20": t["p20"], "p80": t["p80"]})
                if log:
                    log(f"    {v.name} {cfg} {t['p50']:.4f} ms")
    timings.sort(key=lambda r: r["ms"])
    if timings and timings[0]["ms"] < torch_ms:
        win = timings[0]
        entry = {"variant": win["variant"], "config": win["config"], "ms": win["ms"]}
    else:
        entry = {"variant": "torch", "config": None, "ms": torch_ms}
    entry.update({"torch_ms": torch_ms, "timings": timings, "failures": failures})
    if persist:
        target = Path(path) if path else cache.user_dir() / cache.file_name(device)
        cache.record(target, device, op, problem, entry)
    return entry


def tune_op(op, cases, device: str, dtype: torch.dtype, out: Path | None = None, stream=sys.stderr) -> list[dict]:
    """Tune ``op`` over ``cases``; returns one row per case for the winners table."""
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {op.name} {case.name} ({str(dtype).replace('torch.', '')})", file=stream, flush=True)
        problem, args = op.make_inputs(case, device, dtype)
        entry = tune_problem(op, problem, args, persist=True, path=out,
                             log=lambda msg: print(msg, file=stream, flush=True))
        n = len(entry["timings"])
        print(f"    -> {entry['variant']} {entry['ms']:.4f} ms (torch {entry['torch_ms']:.4f} ms, {n} configs timed, "
              f"{len(entry['failures'])} skipped)", file=stream, flush=True)
        rows.append({"op": op.name, "case": case.name, "dtype": str(dtype).replace("torch.", ""),
                     "variant": entry["variant"], "config": entry["config"], "ms": entry["ms"],
                     "torch_ms": entry["torch_ms"], "speedup": entry["torch_ms"] / entry["ms"]})
    return rows
