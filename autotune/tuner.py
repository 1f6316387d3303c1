"""The autotuner: every Triton variant x config of an op vs the torch variant, on the GPU at hand.

Each config's output is checked against the torch variant before it is
timed, so a config that compiles but computes garbage can never win.

Two modes, stored under separate cache keys: the forward alone (inference
calls) and, with ``train``, forward + backward (calls whose tensors require
grad): the backward kernels have their own tiles and costs (KAN's grad-W
splits, the adjoint transforms of spectral convolutions), so a variant that
wins the forward can lose training steps. In ``train`` mode every gradient is
checked against the torch variant's too.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from . import cache
from .timing import bench


def _sanity_bound(problem) -> float:
    """Largest relative error a tuned config may show against the torch variant (a gross-error screen;
    the references check the dtype's real tolerance)."""
    return 1e-4 if problem.dtype_name in ("float32", "float64") else 3e-2


def _rel(a, b) -> float:
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64  # weights can be complex
    a, b = a.detach().to(wide), b.detach().to(wide)
    scale = b.abs().max().item() if b.numel() else 1.0
    return ((a - b).abs().max().item() / (scale or 1.0)) if b.numel() else 0.0


def _step(v, problem, args, leaves, grad_out, cfg):
    """One call of variant ``v``: the output, or with ``leaves`` (output, gradients wrt the leaves, of
    ``grad_out``; None: zeros, for calls made only to compile their kernels)."""
    if not leaves:
        with torch.no_grad():
            return v.run(problem, *args, config=cfg), ()
    with torch.enable_grad():
        out = v.run(problem, *args, config=cfg)
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out.detach(), grads


def _error(got, want) -> float:
    """Largest relative error over the output and every gradient of a step."""
    (out, grads), (out_w, grads_w) = got, want
    errs = [_rel(out, out_w)]
    for g, gw in zip(grads, grads_w):
        if (g is None) != (gw is None):
            return float("inf")
        if g is not None:
            errs.append(_rel(g, gw))
    return max(errs)


def tune_problem(op, problem, args, persist: bool = True, path: Path | None = None, device: dict | None = None,
                 log=None, train: bool = False, unwritable: str = "raise") -> dict:
    """Time every (variant, config) on ``args`` and return the cache entry (winner first).

    With ``train`` each timed call is forward + backward (gradients with respect to the arguments that
    require grad, of a fixed random output gradient) and the entry is stored under the ``|train`` key.
    With ``persist`` the entry is written to ``path`` (default: the user cache file of this GPU);
    ``unwritable`` as ``cache.record``'s.
    """
    from opforge.kernels._triton import device_info

    if device is None:
        device = device_info(problem.device.index if problem.device.type == "cuda" else None)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] if train else []
    if train and not leaves:
        raise ValueError(f"tune_problem(train=True) for {op.name!r} needs arguments that require grad")
    skip = op.baseline_skip(problem)
    # the screen's yardstick: the torch variant, or where that would take minutes the first Triton
    # variant that runs here at its default config (the tests check it against the reference)
    if skip:
        ruler = next((v for v in op.triton_variants() if not v.why_not(problem)), None)
        if ruler is None:
            raise ValueError(f"{op.name}: no Triton variant runs {problem.key} and the torch baseline is "
                             f"not timed here ({skip})")
        ruler_cfg = ruler.default_config(problem)
    else:
        ruler, ruler_cfg = op.torch_variant, None
    grad_out = None
    if train:  # a fixed random output gradient, the same for every call
        with torch.enable_grad():
            out = ruler.run(problem, *args, config=ruler_cfg)
        gen = torch.Generator().manual_seed(0)
        grad_out = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
        expected = out.detach(), torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
        del out
    else:
        expected = _step(ruler, problem, args, leaves, grad_out, ruler_cfg)
    torch_ms = None if skip else bench(lambda: _step(op.torch_variant, problem, args, leaves, grad_out, None),
                                       problem.device)["p50"]
    timings, failures = [], []
    calls = _calls(op, problem, train)
    interrupted = None
    for i, (v, cfg) in enumerate(calls):
        def fn(v=v, cfg=cfg):
            return _step(v, problem, args, leaves, grad_out, cfg)
        try:
            t0 = time.perf_counter()
            got = fn()  # the first call: Triton compiles the config's kernels, or finds them precompiled
            first_s = time.perf_counter() - t0
            err = _error(got, expected)
            del got
            if not err <= _sanity_bound(problem):
                what = "result or gradient" if train else "result"
                failures.append({"variant": v.name, "config": cfg, "error": f"wrong {what} (rel err {err:.2e})"})
                continue
            t = bench(fn, problem.device)
        except KeyboardInterrupt as exc:  # a time limit (SIGINT): keep what was timed, then stop
            interrupted = (exc, len(calls) - i)
            break
        except Exception as exc:  # a config that does not compile or does not fit is skipped
            failures.append({"variant": v.name, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        timings.append({"variant": v.name, "config": cfg, "ms": t["p50"], "p20": t["p20"], "p80": t["p80"],
                        "first_s": round(first_s, 3)})
        if log:
            log(f"    {v.name} {cfg} {t['p50']:.4f} ms (first call {first_s:.2f} s)")
    if interrupted and not timings and torch_ms is None:
        raise interrupted[0]
    timings.sort(key=lambda r: r["ms"])
    if timings and (torch_ms is None or timings[0]["ms"] < torch_ms):
        win = timings[0]
        entry = {"variant": win["variant"], "config": win["config"], "ms": win["ms"]}
    elif torch_ms is None:
        raise RuntimeError(f"{op.name} {problem.key}: every config failed and the torch baseline is not "
                           f"timed here ({skip}): {failures[:3]}")
    else:
        entry = {"variant": "torch", "config": None, "ms": torch_ms}
    entry.update({"torch_ms": torch_ms, "timings": timings, "failures": failures,
                  "mode": "fwdbwd" if train else "fwd"})
    if skip:
        entry["baseline"] = f"torch not timed: {skip}; configs screened against {ruler.name} at its default"
    if interrupted:
        entry["partial"] = f"interrupted with {interrupted[1]} of {len(calls)} configs untimed (the defaults first)"
    if persist:
        target = Path(path) if path else cache.user_dir() / cache.file_name(device)
        cache.record(target, device, op, problem, entry, train=train, unwritable=unwritable)
    if interrupted:
        if log:
            log(f"    interrupted: {entry['partial']}; kept the {len(timings)} timed")
        raise interrupted[0]
    return entry


def _calls(op, problem, train: bool = True) -> list[tuple]:
    """The (variant, config) pairs to time (``Variant.tuning_configs``, for training calls or for inference
    ones): every runnable Triton variant's default config first, then the rest of each grid, so a run cut
    short has timed what a miss runs."""
    first, rest = [], []
    for v in op.triton_variants():
        if v.why_not(problem):
            continue
        cfgs = v.tuning_configs(problem, train)
        n = 1 if v.default_config is not None and cfgs else 0
        first += [(v, c) for c in cfgs[:n]]
        rest += [(v, c) for c in cfgs[n:]]
    return first + rest


MODES = ("fwd", "fwdbwd")


def tune_op(op, cases, device: str, dtype: torch.dtype, out: Path | None = None, stream=None,
            modes: tuple = MODES, rows: list | None = None) -> list[dict]:
    """Tune ``op`` over ``cases`` in each mode (``fwd``, ``fwdbwd``); one row per case and mode for the
    winners table, appended to ``rows`` as each is done (so a caller stopped midway has the finished ones).
    Progress goes to ``stream``, by default the ``sys.stderr`` of the call (not of the import: a default bound
    then kept a test's closed capture stream)."""
    rows = [] if rows is None else rows
    stream = sys.stderr if stream is None else stream
    for i, case in enumerate(cases, 1):
        for mode in modes:
            train = mode == "fwdbwd"
            print(f"[{i}/{len(cases)}] {op.name} {case.name} ({str(dtype).replace('torch.', '')}, {mode})",
                  file=stream, flush=True)
            problem, args = op.make_inputs(case, device, dtype, requires_grad=train)
            entry = tune_problem(op, problem, args, persist=True, path=out, train=train,
                                 log=lambda msg: print(msg, file=stream, flush=True))
            n = len(entry["timings"])
            t_torch = entry["torch_ms"]
            vs = f"torch {t_torch:.4f} ms" if t_torch is not None else entry["baseline"]
            print(f"    -> {entry['variant']} {entry['ms']:.4f} ms ({vs}, {n} configs "
                  f"timed, {len(entry['failures'])} skipped)", file=stream, flush=True)
            rows.append({"op": op.name, "case": case.name, "dtype": problem.dtype_name, "mode": mode,
                         "variant": entry["variant"], "config": entry["config"], "ms": entry["ms"],
                         "torch_ms": t_torch, "speedup": t_torch / entry["ms"] if t_torch is not None else None})
            del args
    return rows
