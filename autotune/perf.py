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

CASE_SETS = ("small", "cpu", "gpu", "main", "all")


def case_sets(text: str) -> list[str]:
    """Comma-separated case-set names (``small,cpu``) checked against CASE_SETS."""
    sets = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in sets if t not in CASE_SETS]
    if bad or not sets:
        raise ValueError(f"unknown case set(s) {bad or [text]}; valid: {list(CASE_SETS)}, comma-separated")
    return sets


PERF_DTYPES = ("float32", "float32-tf32", "bfloat16", "float16", "float64")


def dtype_names(text: str) -> list[str]:
    """Comma-separated dtype names of the perf suites (``float32,bfloat16``), from PERF_DTYPES
    (``float32-tf32``: float32 with TF32 allowed)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in PERF_DTYPES]
    if bad or not names:
        raise ValueError(f"unknown dtype(s) {bad or [text]}; valid: {list(PERF_DTYPES)}, comma-separated")
    return names


def git_commit() -> str:
    """The short commit of the code that runs: ``OPFORGE_COMMIT`` when set (a copy of a checkout whose git
    metadata is not that of the code), else the working directory's HEAD, else "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.getcwd()).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return os.environ.get("OPFORGE_COMMIT") or commit


def suite_env() -> dict:
    """The environment a perf suite is started in: this one less pytest-xdist's worker variables, which a
    process started from a test under ``pytest -n`` inherits and which turn pytest-benchmark off."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}


def environment(device: dict) -> dict:
    import torch

    return {"gpu": device["name"], "cc": device["cc"], "torch": torch.__version__, "triton": device["triton"],
            "python": platform.python_version(), "commit": git_commit()}


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


def _load(path: Path, what: str):
    """The JSON in ``path``; a file that is missing or not JSON is a ValueError naming it (the CLI prints it)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable {what} ({type(exc).__name__}: {exc})") from None


def read(path: Path) -> dict:
    data = _load(path, "perf results file")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("records"), list):
        raise ValueError(f"{path} is not an opforge perf results file of format {FORMAT}")
    return data


def _key(r: dict) -> tuple:
    return (r["op"], r["case"], r["mode"], r["dtype"])


def speedup(r: dict, base: dict | None) -> tuple[float, float] | None:
    """(torch p50 / ``r``'s p50, the larger relative (p80 - p20) / p50 of the two timings), or None.

    The torch timings are ``r``'s own ``anchor_*`` quantiles where it has them (the torch variant timed in the
    same rounds, alternately: ``perf/conftest.py``), else those of ``base``, the torch variant's record.
    """
    if r.get("anchor_p50"):
        base = {"p20": r["anchor_p20"], "p50": r["anchor_p50"], "p80": r["anchor_p80"]}
    if base is None:
        return None
    spread = max((x["p80"] - x["p20"]) / x["p50"] for x in (r, base))
    return base["p50"] / r["p50"], spread


def ratios(records: list[dict], baseline_variant: str = "torch") -> dict:
    """``{(op, case, mode, dtype, variant): (ratio, spread)}`` for every non-baseline record.

    ratio = baseline p50 / variant p50 (>1: the variant is faster), from the record's interleaved baseline
    timings where it has them (``speedup``); spread is the larger relative (p80 - p20) / p50 of the two.
    """
    base = {_key(r): r for r in records if r["variant"] == baseline_variant}
    out = {}
    for r in records:
        if r["variant"] == baseline_variant:
            continue
        sp = speedup(r, base.get(_key(r)))
        if sp is not None:
            out[_key(r) + (r["variant"],)] = sp
    return out


def compare(current: list[dict], baseline: list[dict], threshold: float = 0.10) -> tuple[list[dict], list[dict]]:
    """Compare ratios; returns (rows for a table, failing rows).

    A baseline variant that the current run lacks where it ran that (op, case, mode, dtype) is "missing", a
    failure; one whose (op, case, mode, dtype) the run did not time at all is "not run" (a run narrowed by
    case sets, dtypes or -k), no failure.

    A peer's row (KeOps, neuraloperator, a published algorithm) gates opforge's torch path against that peer,
    the inverse of the peer's speedup over it (``_as_ours``): a peer's ratio that fell means opforge's path
    got faster beside it, no regression, and one that rose means opforge's path got slower, one."""
    cur, ref = (_as_ours(ratios(records)) for records in (current, baseline))
    ran = {_key(r) for r in current}
    rows, failures = [], []
    for key in sorted(set(cur) | set(ref)):
        op, case, mode, dtype, variant = key
        row = {"op": op, "case": case, "mode": mode, "dtype": dtype, "variant": variant,
               "speedup": f"torch over {variant}" if _is_peer(op, variant) else f"{variant} over torch"}
        if key not in cur and key[:4] not in ran:
            row.update(status="not run", baseline=ref[key][0])
        elif key not in cur:
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


def _as_ours(r: dict) -> dict:
    """``ratios`` with each peer's entry inverted: opforge's torch path's speedup over the peer, the number a
    regression of opforge lowers. opforge's own variants (and ``public-call``, its public function) keep
    their speedup over the torch path; an op not registered here keeps every entry as it is."""
    return {key: (1 / ratio, spread) if _is_peer(key[0], key[4]) and ratio > 0 else (ratio, spread)
            for key, (ratio, spread) in r.items()}


def _is_peer(op: str, variant: str) -> bool:
    ours = _opforge_variants(op)
    return bool(ours) and variant not in ours and variant != "public-call"


def _opforge_variants(op: str) -> set:
    o = _get_op(op)
    return set(o.variants) if o is not None else set()


def _get_op(op: str):
    try:
        from opforge.kernels import get_op

        return get_op(op)
    except (ImportError, KeyError, ValueError):
        return None


_ELEMENT_SIZE = {"float64": 8, "float32": 4, "float32-tf32": 4, "bfloat16": 2, "float16": 2}


def target_rows(records: list[dict]) -> list[dict]:
    """Each op's issue targets (``Op.targets``) checked against ``records``: one row per (target, dtype) for
    every op with a record of a target case; ``met`` is True/False, or None when a timing is missing."""
    rows = []
    for op_name in sorted({r["op"] for r in records}):
        op = _get_op(op_name)
        if op is None or not op.targets:
            continue
        mine = [r for r in records if r["op"] == op_name]
        if not {t.case for t in op.targets} & {r["case"] for r in mine}:
            continue
        ours_names = {v.name for v in op.triton_variants()}
        dtypes = sorted({r["dtype"] for r in mine}) or ["float32"]
        for t in op.targets:
            for dtype in dtypes:
                group = {r["variant"]: r for r in mine if (r["case"], r["mode"], r["dtype"]) == (t.case, t.mode, dtype)}
                rows.append(_check_target(op_name, t, dtype, group, ours_names))
    return rows


def _check_target(op_name: str, t, dtype: str, group: dict, ours_names: set) -> dict:
    row = {"op": op_name, "case": t.case, "mode": t.mode, "dtype": dtype, "met": None, "variant": "-",
           "against": "-", "measured": "not measured"}
    versus = next((group[v] for v in t.versus if v in group), None)
    row["target"] = {"speedup": f"speedup >= {t.bound:g}x vs {' or '.join(t.versus)}",
                     "frac_peak": f">= {100 * t.bound:.0f}% of peak",
                     "peak_memory": f"peak memory <= {t.bound:g}x {' or '.join(t.versus)}'s",
                     "activation_memory": f"activation memory <= {t.bound:g}x {' or '.join(t.versus)}'s"}[t.what]
    ours = [r for v, r in group.items() if v in ours_names]
    if not ours:
        return row
    best = min(ours, key=lambda r: r["p50"])
    row["variant"] = best["variant"]
    if t.what == "frac_peak":
        frac = best.get("frac_peak_bw") if best.get("frac_peak_bw") is not None else best.get("frac_peak_flops")
        if frac is not None:
            row.update(measured=f"{100 * frac:.1f}%", met=frac >= t.bound)
        return row
    if versus is None:
        return row
    row["against"] = versus["variant"]
    if t.what == "speedup":
        ratio = versus["p50"] / best["p50"]
        row.update(measured=f"{ratio:.2f}x ({best['p50']:.3f} vs {versus['p50']:.3f} ms)", met=ratio >= t.bound)
    elif t.what == "peak_memory":
        if best.get("peak_mb") is not None and versus.get("peak_mb"):
            ratio = best["peak_mb"] / versus["peak_mb"]
            row.update(measured=f"{ratio:.2f}x ({best['peak_mb']:.0f} vs {versus['peak_mb']:.0f} MB)",
                       met=ratio <= t.bound)
    else:  # activation memory: the inputs plus what the forward keeps for the backward
        if best.get("saved_mb") is not None and versus.get("saved_mb") is not None:
            params = _case_params(op_name, t.case)
            x_mb = t.inputs_mb(params, _ELEMENT_SIZE.get(dtype, 4)) if params is not None else 0.0
            a, b = best["saved_mb"] + x_mb, versus["saved_mb"] + x_mb
            ratio = a / b if b > 0 else float("inf") if a > 0 else 1.0
            row.update(measured=f"{ratio:.2f}x ({a:.0f} vs {b:.0f} MB)", met=ratio <= t.bound)
    return row


def _case_params(op_name: str, case: str) -> dict | None:
    op = _get_op(op_name)
    return next((c.params for c in (op.cases if op else []) if c.name == case), None)


def targets_table(records: list[dict]) -> str:
    """Markdown: each issue target of the ops in ``records`` and whether this file meets it ('' if none)."""
    rows = target_rows(records)
    if not rows:
        return ""
    lines = ["| op | case | mode | dtype | target | opforge variant | against | measured | met |",
             "|" + " --- |" * 9]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['dtype']} | {r['target']} | {r['variant']} | "
                     f"{r['against']} | {r['measured']} | {met} |")
    return "\n".join(lines)


def changed_ops(records: list[dict]) -> list[str]:
    """Ops whose records were timed on other code than today's: a recorded source hash that differs from the
    op's current one, or none recorded (files made before hashes were)."""
    out = []
    for op_name in sorted({r["op"] for r in records}):
        op = _get_op(op_name)
        if op is None:
            continue
        hashes = {r.get("source_hash") for r in records if r["op"] == op_name}
        if hashes != {op.source_hash()}:
            out.append(op_name)
    return out


#: the perf/ scripts whose JSON records ``opforge perf-table`` renders (results folder -> script, its columns as
#: (heading, key), what its speedup is)
SCRIPT_TABLES = {
    "solvers": ("perf/solver_paths.py", [("cholesky ms", "cholesky_ms"), ("cg ms", "cg_ms")],
                "the conjugate-gradient path's time over the Cholesky path's"),
    "gp": ("perf/gp_peer.py", [("GPyTorch ms", "gpytorch_ms"), ("opforge ms", "opforge_ms")],
           "GPyTorch's time over opforge's GPRegression's, same data and parameters"),
}
_AGREEMENT = {  # the records of how right the answers are: call -> (what the table says, its columns)
    "cg_vs_cholesky": ("How far apart the two solves are (largest difference, relative):",
                       [("solves' relative difference", "relative")]),
    "accuracy": ("Errors against the exact answer, the NumPy float64 reference (relative; means and variances: "
                 "the largest error over the largest value):",
                 [(f"{q} {lib}", f"{lib.lower()}_{key}_error") for q, key in
                  (("log-likelihood", "mll"), ("mean", "mean"), ("variance", "variance"))
                  for lib in ("GPyTorch", "opforge")]),
}


def read_script_records(path: Path) -> list[dict]:
    """The records a perf/ script wrote with ``--json`` (a list of objects with ``n`` and ``call``)."""
    data = _load(path, "perf script results file")
    if not isinstance(data, list) or not all(isinstance(r, dict) and "n" in r and "call" in r for r in data):
        raise ValueError(f"{path} is not a list of perf script records (objects with 'n' and 'call')")
    return data


def script_table(records: list[dict], kind: str) -> str:
    """Markdown of a perf/ script's records (``SCRIPT_TABLES[kind]``): a caption with where and how they were
    made, a row per (N, call) with both times and the speedup, then the agreement of the two answers."""
    script, cols, meaning = SCRIPT_TABLES[kind]

    def values(key):
        return ", ".join(dict.fromkeys(str(r[key]) for r in records if r.get(key) is not None)) or "?"

    versions = f"torch {values('torch')}" + (f", GPyTorch {values('gpytorch')}" if kind == "gp" else "")
    caption = (f"Made by `{values('command') if any(r.get('command') for r in records) else script}` on "
               f"{values('device')}, {versions}, commit {values('commit')}; kernel {values('kernel')}; the median "
               f"of {values('repeat')} calls after a warm-up, in ms; speedup: {meaning}.")
    timed = [r for r in records if r["call"] not in _AGREEMENT]
    lines = ["| N | call | " + " | ".join(h for h, _ in cols) + " | speedup |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " | --- |"]
    lines += [f"| {r['n']} | {r['call']} | " + " | ".join(f"{r[k]:.3f}" for _, k in cols)
              + f" | {r['speedup']:.2f}x |" for r in timed]
    agree = [r for r in records if r["call"] in _AGREEMENT]
    if agree:
        says, acols = _AGREEMENT[agree[0]["call"]]
        lines += ["", says, "", "| N | " + " | ".join(h for h, _ in acols) + " |",
                  "| --- | " + " | ".join("---" for _ in acols) + " |"]
        lines += [f"| {r['n']} | " + " | ".join(f"{r[k]:.1e}" for _, k in acols) + " |" for r in agree]
    return caption + "\n\n" + "\n".join(lines)


def markdown_table(records: list[dict], env: dict) -> str:
    """The README tables, one per op: a line per (case, mode, dtype) with each variant's time and
    speedup vs torch."""
    passes = max((r.get("passes", 1) for r in records), default=1)
    which = "p50 of the run" if passes == 1 else f"p50 of each record's least disturbed of {passes} passes"
    caption = (f"Measured on {env.get('gpu')} (cc {env.get('cc')}), torch {env.get('torch')}, "
               f"Triton {env.get('triton')}, commit {env.get('commit')}; {which}; "
               "forward+backward rows on CUDA add the peak memory allocated and, after the slash where measured, "
               "the memory a forward pass keeps for its backward (activations), in MB.")
    froms = [r["config_from"] for r in records if r.get("config_from")]
    if froms:
        caption += (f" Triton rows: {froms.count('cache')} at their fastest config in the autotune cache, "
                    f"{froms.count('heuristic')} at their heuristic default.")
    if any(r.get("anchor_p50") for r in records):
        caption += (" A speedup's torch time is, where recorded, the torch variant's timed in the same rounds as "
                    "that variant, alternately (perf/conftest.py, on a CPU by default), so the torch column, "
                    "timed in its own test, need not give it.")
    changed = changed_ops(records)
    if changed:
        caption += (f" **Code changed since** (source hash): {', '.join(changed)}; those rows time the code of "
                    f"commit {env.get('commit')}, not today's.")
    ops = sorted({r["op"] for r in records})
    targets = targets_table(records)
    if targets:
        targets = ("Against the issues' targets (the fastest opforge Triton variant of each case; "
                   "'-' where this run has no timing for it):\n\n" + targets + "\n\nAll rows:\n\n")
    return caption + "\n\n" + targets + "\n\n".join(_op_table([r for r in records if r["op"] == op]) for op in ops)


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
                sp = None if v == "torch" else speedup(r, t)
                cell = f"{r['p50']:.3f}" if sp is None else f"{r['p50']:.3f} ({sp[0]:.2f}x)"
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


def least_disturbed(passes: list[list[dict]]) -> list[dict]:
    """One record per (op, case, variant, mode, dtype) from several passes of the suite: the pass with the lowest
    median. On a shared machine interference only adds time, and it comes and goes between tests (a 2-core VM
    drifted by 1.5-2x from one test to the next): the fastest of a few passes is each variant's undisturbed
    time, and the ratios between variants come from like with like."""
    best: dict = {}
    for records in passes:
        for r in records:
            key = (r["op"], r["case"], r["variant"], r["mode"], r["dtype"])
            if key not in best or r["p50"] < best[key]["p50"]:
                best[key] = dict(r, passes=len(passes))
    return list(best.values())


SMALL_LOOP = 20  # static tables list loops of fewer SASS instructions only as a count


def merge_static(path: Path, records: list[dict], env: dict) -> None:
    """Merge one ``perf/inspect_kernels.py --json`` run's launch records into a static-counts file: records
    of the same (op, case, variant, mode, dtype) are replaced; each new record carries ``env`` (arch, Triton,
    commit). Written atomically."""
    path = Path(path)
    data = read_static(path) if path.exists() else {"format": 1, "kind": "static", "records": []}
    key = lambda r: (r["op"], r["case"], r["variant"], r["mode"], r["dtype"])  # noqa: E731
    new = {key(r) for r in records}
    data["records"] = sorted([r for r in data["records"] if key(r) not in new] + [dict(r, **env) for r in records],
                             key=key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_static(path: Path) -> dict:
    """A static-counts file written by ``perf/inspect_kernels.py --json``."""
    data = _load(path, "static-counts file")
    if not isinstance(data, dict) or data.get("kind") != "static" or not isinstance(data.get("records"), list):
        raise ValueError(f"{path} is not an opforge static-counts file")
    return data


def static_table(data: dict, hashes: dict) -> str:
    """Markdown of a static-counts file: per launch the registers, spills, MMA kind and the SASS
    instructions of each loop. Records made from kernels whose source has changed since (their op's source
    hash differs from ``hashes``) are left out and counted, so a table never describes code that is gone."""
    current = [r for r in data["records"] if hashes.get(r["op"]) == r.get("source_hash")]
    stale = len(data["records"]) - len(current)
    if not current:
        return f"_All {stale} records are from kernels that have changed since; rerun the commands._"
    arch = sorted({str(r["arch"]) for r in current})
    tritons = sorted({r["triton"] for r in current})
    commits = sorted({r["commit"] for r in current})
    cpus = sorted({str(r["host_cpus"]) for r in current if "host_cpus" in r})
    lines = [f"Compiled for sm_{'/'.join(arch)} with Triton {', '.join(tritons)} at commit {', '.join(commits)} by "
             "`python perf/inspect_kernels.py <op> <case> <variant> --mode <mode> --json <this file>`; nothing ran: "
             "these are the compiler's counts (per launch; a loop's instructions are per thread and iteration), "
             "not timings. Each variant ran with its heuristic default config; loops of fewer than "
             f"{SMALL_LOOP} instructions are only counted. Compile s: the seconds Triton took to compile the "
             "kernel in an empty cache"
             + (f" on the {' or '.join(cpus)}-CPU host that made the file" if cpus else "")
             + " (the compile wait of an op's first call, paid on the host; a kernel launched twice alike is "
             "compiled once; each command's first kernel includes Triton's one-time set-up)."
             + (f" {stale} records of kernels changed since are left out." if stale else ""), "",
             "| op | case | variant | mode | dtype | kernel | grid | warps | regs | spills st/ld B | MMA "
             "| loops: instructions (MUFU) | compile s |", "|" + " --- |" * 13]
    seen = set()
    for r in current:
        loops = r.get("loops") or []
        small = [n for n, _ in loops if n < SMALL_LOOP]  # e.g. libdevice's slow-path range reduction of cos
        loops = ", ".join([f"{n} ({mu})" for n, mu in loops if n >= SMALL_LOOP]
                          + ([f"{len(small)} loops of <= {max(small)}"] if small else [])) or "-"
        regs = r.get("regs", r.get("error", "-"))
        spills = f"{r['spill_st']}/{r['spill_ld']}" if "spill_st" in r else "-"
        grid = "x".join(str(g) for g in r["grid"]) if isinstance(r["grid"], list) else r["grid"]
        row = (f"| {r['op']} | {r['case']} | {r['variant']} | {r['mode']} | {r['dtype']} | {r['kernel']} | {grid} | "
               f"{r['warps']} | {regs} | {spills} | {' '.join(r['mma'])} | {loops} |")
        if row not in seen:  # one line for a kernel launched twice alike (forward and grad b, say): the first,
            # which compiled it (a later one found it compiled)
            lines.append(row + (f" {r['compile_s']:.2f} |" if "compile_s" in r else " - |"))
        seen.add(row)
    return "\n".join(lines)
