"""Perf results files and the regression gate.

A results file (``perf/results/<device tag>.json``) holds one record per
(op, case, variant, mode, dtype): p20/p50/p80 in ms, the achieved GB/s (and
TFLOP/s) against the op's roofline, the fraction of the device's peak, and the
GPU, torch, Triton and commit that produced it.

The gate compares *speedup ratios* measured in one run -- variant time vs the
torch variant's time, same case, same mode -- against the ratios in the
committed baseline for the same device, and fails a record whose ratio fell by
more than ``threshold`` plus the measured spread ((p80 - p20) / p50, the
largest of the four timings involved), a drop capped at ``max(threshold, 0.5)``:
a speedup that halved fails however noisy the run (without the cap a spread
over 1 - threshold, seen on a loaded 2-core CI machine, let any drop pass).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

MAX_NOISE_DROP = 0.5  # the measured spread never lets a ratio halve unflagged

FORMAT = 1


def environment(device: dict) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.getcwd()).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    # OPFORGE_COMMIT names the commit when the checkout's git metadata is not that of the code (a copy)
    commit = os.environ.get("OPFORGE_COMMIT") or commit
    return {"gpu": device["name"], "cc": device["cc"], "torch": torch.__version__, "triton": device["triton"],
            "python": platform.python_version(), "commit": commit}


def results_path(perf_dir: Path, device: dict) -> Path:
    return Path(perf_dir) / "results" / f"{device['tag']}.json"


def write(path: Path, records: list[dict], env: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "env": env,
            "records": sorted(records, key=lambda r: (r["op"], r["case"], r["mode"], r["dtype"], r["variant"]))}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def merge_write(path: Path, records: list[dict], env: dict) -> None:
    """Write ``records``, keeping those already in ``path`` from the same device, versions and commit
    (one suite per op run after another accumulates in one file); a record of the same
    (op, case, mode, dtype, variant) is replaced. A file from another environment is overwritten."""
    path = Path(path)
    same = ("gpu", "cc", "torch", "triton", "commit")
    if path.exists():
        try:
            old = read(path)
        except (ValueError, OSError, json.JSONDecodeError):
            old = None
        if old and all(old["env"].get(k) == env.get(k) for k in same):
            new_keys = {_key(r) + (r["variant"],) for r in records}
            records = [r for r in old["records"] if _key(r) + (r["variant"],) not in new_keys] + list(records)
    write(path, records, env)


def read(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT or not isinstance(data.get("records"), list):
        raise ValueError(f"{path} is not an opforge perf results file of format {FORMAT}")
    return data


def _key(r: dict) -> tuple:
    return (r["op"], r["case"], r["mode"], r["dtype"])


def ratios(records: list[dict], baseline_variant: str = "torch") -> dict:
    """``{(op, case, mode, dtype, variant): (ratio, spread)}`` for every non-baseline record.

    ratio = baseline p50 / variant p50 (>1: the variant is faster); spread is
    the larger relative (p80 - p20) / p50 of the two timings.
    """
    base = {_key(r): r for r in records if r["variant"] == baseline_variant}
    out = {}
    for r in records:
        b = base.get(_key(r))
        if r["variant"] == baseline_variant or b is None:
            continue
        spread = max((x["p80"] - x["p20"]) / x["p50"] for x in (r, b))
        out[_key(r) + (r["variant"],)] = (b["p50"] / r["p50"], spread)
    return out


def compare(current: list[dict], baseline: list[dict], threshold: float = 0.10) -> tuple[list[dict], list[dict]]:
    """Compare ratios; returns (rows for a table, failing rows)."""
    cur, ref = ratios(current), ratios(baseline)
    rows, failures = [], []
    for key in sorted(set(cur) | set(ref)):
        op, case, mode, dtype, variant = key
        row = {"op": op, "case": case, "mode": mode, "dtype": dtype, "variant": variant}
        if key not in cur:
            row.update(status="missing", baseline=ref[key][0])
            failures.append(row)
        elif key not in ref:
            row.update(status="new", current=cur[key][0])
        else:
            (c, cs), (b, bs) = cur[key], ref[key]
            allowed = min(threshold + max(cs, bs), max(threshold, MAX_NOISE_DROP))
            row.update(current=c, baseline=b, allowed=allowed,
                       status="ok" if c >= b * (1 - allowed) else "REGRESSED")
            if row["status"] != "ok":
                failures.append(row)
        rows.append(row)
    return rows, failures


def _opforge_variants(op: str) -> set:
    try:
        from opforge.kernels import get_op

        return set(get_op(op).variants)
    except (ImportError, KeyError, ValueError):
        return set()


def markdown_table(records: list[dict], env: dict) -> str:
    """The README tables, one per op: a line per (case, mode, dtype) with each variant's time and
    speedup vs torch."""
    caption = (f"Measured on {env.get('gpu')} (cc {env.get('cc')}), torch {env.get('torch')}, "
               f"Triton {env.get('triton')}, commit {env.get('commit')}; p50 of the run; "
               "forward+backward rows on CUDA add the peak memory allocated and, after the slash where measured, "
               "the memory a forward pass keeps for its backward (activations), in MB.")
    ops = sorted({r["op"] for r in records})
    return caption + "\n\n" + "\n\n".join(_op_table([r for r in records if r["op"] == op]) for op in ops)


def _op_table(records: list[dict]) -> str:
    groups: dict = {}
    for r in records:
        groups.setdefault(_key(r), {})[r["variant"]] = r
    variants = sorted({r["variant"] for r in records}, key=lambda v: (v != "torch", v))
    head = ("| op | case | mode | dtype | "
            + " | ".join("torch ms" if v == "torch" else f"{v} ms (speedup)" for v in variants)
            + " | fastest opforge variant: GB/s or TFLOP/s (% of peak) |")
    lines = [head, "|" + " --- |" * (5 + len(variants))]
    for key in sorted(groups):
        g = groups[key]
        t = g.get("torch")
        cells = []
        for v in variants:
            r = g.get(v)
            if r is None:
                cells.append("-")
            else:
                cell = f"{r['p50']:.3f}" if t is None or v == "torch" else f"{r['p50']:.3f} ({t['p50'] / r['p50']:.2f}x)"
                if r.get("peak_mb") is not None:
                    saved = r.get("saved_mb")
                    cell += f", {r['peak_mb']:.0f}" + ("" if saved is None else f"/{saved:.0f}") + " MB"
                cells.append(cell)
        # rates are the op's FLOPs or bytes over a time: only opforge's own variants compute the op
        # (a peer such as nn.Linear does less work, so its "rate" would mean nothing)
        ours = [r for v, r in g.items() if v in _opforge_variants(key[0])] or list(g.values())
        best = min(ours, key=lambda r: r["p50"])
        if best.get("tflops") is not None:
            val, frac, unit = best["tflops"], best.get("frac_peak_flops"), "TFLOP/s"
        else:
            val, frac, unit = best.get("gbps"), best.get("frac_peak_bw"), "GB/s"
        bw_cell = "-" if val is None else (f"{val:.3g} {unit} ({100 * frac:.0f}%)" if frac else f"{val:.3g} {unit}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + f" | {bw_cell} |")
    return "\n".join(lines)
