"""The ``opforge`` command line.

    opforge bench [--op NAME ...] [--interpret]      check every op vs its NumPy reference and time it (main job)
    opforge tune [--op NAME ...] [--mode fwd fwdbwd] tune the GPU at hand, write the cache, print the winners
    opforge perf-check [--update] [--threshold T]    rerun perf/ and gate speedup ratios vs the committed baseline
    opforge perf-table [FILE] [--readme README.md]   the tables of perf results files (README block)
    opforge list                                     registered ops and variants

Environment: OPFORGE_BACKEND, OPFORGE_AUTOTUNE, OPFORGE_CACHE_DIR, TRITON_INTERPRET.
Nothing is imported from opforge.kernels before the arguments are read, so
``--interpret`` can switch Triton to its CPU interpreter first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _kernels():
    import opforge.kernels as k

    return k


def _ops(names):
    k = _kernels()
    names = names or list(k.registered_ops())
    return [k.get_op(n) for n in names]


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[h for h, _ in cols]] + [[r.get(key, "") if isinstance(r.get(key), str) else _fmt(r.get(key))
                                       for _, key in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _to_numpy(t):
    if not hasattr(t, "detach"):
        return t  # None, or an op's own parameter object
    t = t.detach().cpu()
    return t.resolve_conj().to(__import__("torch").complex128).numpy() if t.is_complex() else t.double().numpy()


# --------------------------------------------------------------------------- bench (main job)


def cmd_bench(args) -> int:
    import torch

    from opforge.autotune.timing import bench
    from opforge.reference import rel_error, tolerance

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tag = args.cases or ("gpu" if dev.type == "cuda" else "small")
    rows, failed = [], 0
    for op in _ops(args.op):
        for case in [c for c in op.cases if tag in c.tags]:
            problem, tensors = op.make_inputs(case, dev, torch.float32)
            sub, out_index = op.reference_slice(tensors)
            expected = op.reference(*[_to_numpy(t) for t in sub], problem)
            tol = tolerance(problem.dtype_name, op.reduction(problem) if op.reduction else 1)
            if args.interpret:
                plan = [(v.name, None, "requested") for v in op.triton_variants()] + [("torch", None, "requested")]
            else:
                v, cfg, why = op.select(problem, tensors)
                plan = [(v.name, cfg, why)]
            rep_ms = 20 if args.interpret else 100
            with torch.no_grad():
                t_torch = None if op.baseline_skip(problem) else bench(
                    lambda: op.torch_variant.run(problem, *tensors, config=None), dev, rep_ms=rep_ms)["p50"]
                for name, cfg, why in plan:
                    reason = op.variants[name].why_not(problem)
                    if reason:
                        rows.append({"op": op.name, "case": case.name, "variant": name,
                                     "status": f"skip: {reason[:50]}"})
                        continue

                    def run(name=name, cfg=cfg):
                        return op.run_variant(name, problem, *tensors, config=cfg)

                    err = rel_error(run()[out_index], expected)
                    ok = err <= tol
                    failed += not ok
                    # the torch variant is the baseline itself: one timing, not two of the same code (on a
                    # 2-core CPU two timings of one call differed up to 3x, showing a 'speedup' of nothing)
                    t = t_torch if name == "torch" and t_torch is not None else bench(run, dev, rep_ms=rep_ms)["p50"]
                    rows.append({"op": op.name, "case": case.name, "variant": name, "why": why, "max_err": err,
                                 "tol": tol, "ms": t, "torch_ms": t_torch,
                                 "speedup": t_torch / t if t_torch is not None else None,
                                 "status": "ok" if ok else "FAIL"})
    from opforge.kernels._triton import device_info

    info = device_info()
    mode = "Triton interpreter (CPU; times are not GPU times)" if args.interpret else info["name"]
    from opforge.kernels._registry import REF_BATCH

    print(f"opforge bench on {mode}; reference: NumPy float64 on a slice of each output (the first "
          f"{REF_BATCH} batch entries, or an op's own subset); error = max|y - ref| / max|ref|")
    print(_table(rows, [("op", "op"), ("case", "case"), ("variant", "variant"), ("chosen by", "why"),
                        ("max err", "max_err"), ("tol", "tol"), ("ms", "ms"), ("torch ms", "torch_ms"),
                        ("speedup", "speedup"), ("status", "status")]))
    if any(r.get("ms") is not None and r.get("torch_ms") is None for r in rows):
        print("torch ms '-': the torch baseline is too slow to time at that size on a GPU (the op's untimed_baseline)")
    if failed:
        print(f"{failed} result(s) outside tolerance", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------- tune
def cmd_tune(args) -> int:
    import torch

    from opforge.autotune import cache, tuner
    from opforge.kernels._triton import allow_tf32, device_info

    if args.jobs is not None and args.jobs < 0:
        print(f"--jobs must be 0 or more, got {args.jobs}", file=sys.stderr)
        return 2
    if args.sms is not None and args.compile_only is None:  # (a tuning run times the GPU at hand)
        print("--sms only applies with --compile-only (the SM count of the GPU compiled for)", file=sys.stderr)
        return 2
    if args.compile_only is not None:
        return _compile_only(args)
    if not torch.cuda.is_available() and not args.interpret:
        print("opforge tune needs a CUDA GPU (or --interpret to exercise the tuner on the CPU "
              "interpreter with small shapes)", file=sys.stderr)
        return 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = device_info()
    out = Path(args.out) if args.out else cache.user_dir() / cache.file_name(info)
    work = _tune_work(args, args.cases or ("gpu" if dev == "cuda" else "small"))
    if not any(cases for _, cases in work):
        return 0  # (each op's note printed: nothing written)
    why = _out_problem(out, explicit=bool(args.out))
    if why:
        print(f"opforge tune: --out {out} {why}", file=sys.stderr)
        return 2
    if dev == "cuda":  # every config's kernels compiled first, on the other CPU cores (the interpreter compiles nothing)
        from opforge.autotune import precompile

        jobs = precompile.default_jobs() if args.jobs is None else args.jobs
        try:
            tasks = _plan(work, args) if jobs else []
        except Exception as exc:  # noqa: BLE001 - only a head start: the timing loop compiles what it meets
            print(f"precompile skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
            tasks = []
        if tasks:
            major, minor = torch.cuda.get_device_capability()
            sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            print(f"precompiling {len(tasks)} configs' kernels with {min(jobs, len(tasks))} workers",
                  file=sys.stderr, flush=True)
            try:
                precompile.precompile(tasks, jobs, 10 * major + minor, sms,
                                      log=lambda m: print(m, file=sys.stderr, flush=True))
            except KeyboardInterrupt:  # a time limit before any timing: nothing tuned, nothing written
                print("interrupted while precompiling: nothing tuned", file=sys.stderr)
                return 130
    rows, interrupted = [], False
    try:
        for op, cases in work:
            for dt in args.dtype:
                base = dt.removesuffix("-tf32")
                with allow_tf32(dt != base):  # float32-tf32: entries for calls under torch's TF32 setting
                    tuner.tune_op(op, cases, dev, getattr(torch, base), out=out, modes=tuple(args.mode), rows=rows)
    except KeyboardInterrupt:  # Ctrl-C or a time limit's SIGINT: what was timed is in the cache file already
        interrupted = True
    print(f"\nwinners on {info['name']} (cc {info['cc']}, Triton {info['triton']}) -> {out}"
          + (" (interrupted: the shapes finished so far, and the one in progress marked partial in the file)"
             if interrupted else ""))
    print(_table(rows, [("op", "op"), ("case", "case"), ("dtype", "dtype"), ("mode", "mode"), ("variant", "variant"),
                        ("config", "config"), ("ms", "ms"), ("torch ms", "torch_ms"), ("speedup", "speedup")]))
    return 130 if interrupted else 0


def _out_problem(out: Path, explicit: bool) -> str | None:
    """Why the cache file ``out`` cannot take the tuned entries, found before any tuning (an unwritable path
    failed at the first entry's write, after that shape's timing, with a traceback), or None. A file named
    with --out that is not an opforge cache is refused: the cache writer replaces an unreadable file (right
    for the user cache, whose corrupt file it warns about), which would lose a results file or any other
    file named by mistake."""
    from opforge.autotune import cache

    if out.is_dir():
        return "is a folder (name a .json file)"
    if explicit and out.exists() and out.stat().st_size:  # (an empty file holds nothing to lose)
        try:
            ok = cache.is_cache(json.loads(out.read_text()))
        except (OSError, UnicodeDecodeError, ValueError):
            ok = False
        if not ok:
            return "exists and is not an opforge autotune cache, which it would replace: name another file"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=out.name, suffix=".probe", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot be written: {exc.strerror or exc}"
    return None


def _tune_work(args, tag: str) -> list[tuple]:
    """(op, its cases) that ``opforge tune`` covers: the case set ``tag``, narrowed by ``--case``. A ``--case``
    outside that set is a usage error (exit 2) naming the sets it is in, not a run that leaves it out."""
    work = [(op, [c for c in op.cases if tag in c.tags and (not args.case or c.name in args.case)])
            for op in _ops(args.op)]
    covered = {c.name for _, cases in work for c in cases}
    outside = {c.name: sorted(c.tags) for op, _ in work for c in op.cases
               if c.name in (args.case or ()) and c.name not in covered}
    if outside:
        tunable = ("small", "gpu", "main")  # tune's --cases choices
        where = "; ".join(f"{n} is in {', '.join(t for t in tags if t in tunable) or 'no set tune covers'} "
                          f"(its sets: {', '.join(tags)})" for n, tags in outside.items())
        print(f"opforge tune: error: argument --case: not in the case set {tag!r}: {where}; name the set with "
              f"--cases", file=sys.stderr)
        raise SystemExit(2)
    for op, cases in work:
        if not cases:
            print(f"opforge tune: no case of {op.name} in the case set {tag!r}"
                  + (" among the --case names" if args.case else "") + ": nothing of it to tune", file=sys.stderr)
    return work


def _plan(work, args) -> list[tuple]:
    """Every (op, case, dtype, mode, variant, config) the tuner will time (``precompile.plan`` over ``work``)."""
    from opforge.autotune import precompile

    return [t for op, cases in work for t in precompile.plan(op, cases, args.dtype, args.mode)]


def _compile_only(args) -> int:
    """``opforge tune --compile-only ARCH``: a tuning run's precompile alone, for a GPU that need not be here:
    every config's kernels compiled into Triton's disk cache, nothing timed."""
    from opforge.autotune import precompile
    from opforge.kernels._triton import HAS_TRITON, TRITON_MISSING

    if not HAS_TRITON:
        print(f"--compile-only needs Triton: {TRITON_MISSING}", file=sys.stderr)
        return 2
    arch = args.compile_only
    sms = args.sms if args.sms is not None else precompile.SM_COUNT.get(arch)
    if sms is None or sms < 1:
        print(f"--compile-only {arch} needs --sms N, the GPU's SM count (known: "
              f"{', '.join(f'sm_{a}: {n}' for a, n in precompile.SM_COUNT.items())})", file=sys.stderr)
        return 2
    jobs = precompile.default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        print("--compile-only needs --jobs 1 or more", file=sys.stderr)
        return 2
    tasks = _plan(_tune_work(args, args.cases or "gpu"), args)
    cache_dir = os.environ.get("TRITON_CACHE_DIR") or "Triton's default cache folder (~/.triton/cache)"
    print(f"compiling {len(tasks)} configs' kernels for sm_{arch} ({sms} SMs) into {cache_dir}", flush=True)
    summary = precompile.precompile(tasks, jobs, arch, sms, log=lambda m: print(m, flush=True))
    return 0 if summary["compiled"] == summary["tasks"] else 1  # (a config that failed is named in the log)


# --------------------------------------------------------------------------- perf-check
def cmd_perf_check(args) -> int:
    from opforge.autotune import perf
    from opforge.kernels._triton import device_info

    perf_dir = Path(args.perf_dir)
    if not perf_dir.is_dir():
        print(f"--perf-dir {perf_dir} is not a folder (run from an opforge checkout or name it)", file=sys.stderr)
        return 2
    info = device_info()
    baseline = Path(args.baseline) if args.baseline else perf.results_path(perf_dir, info)
    if args.passes < 1:
        print(f"--passes must be at least 1, got {args.passes}", file=sys.stderr)
        return 2
    base = None
    if not args.update:  # the baseline read before the suite runs (minutes), not after it
        if not baseline.exists():
            print(f"no baseline for this device at {baseline}; create one with --update", file=sys.stderr)
            return 2
        try:
            base = perf.read(baseline)
        except ValueError as exc:  # not JSON, or not a results file: perf.read names it
            print(f"opforge perf-check: baseline: {exc}", file=sys.stderr)
            return 2
    suite = [sys.executable, "-m", "pytest", str(perf_dir), "-q", "-p", "no:cacheprovider",
             "--benchmark-disable-gc", "--benchmark-columns=median,iqr"]
    if args.cases:
        suite.append(f"--opforge-cases={args.cases}")
    if args.dtypes:
        suite.append(f"--opforge-dtypes={args.dtypes}")
    if args.k:
        suite += ["-k", args.k]
    passes = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.passes):
            current = Path(tmp) / f"current{i}.json"
            cmd = suite + [f"--opforge-results={current}"]
            print(f"running (pass {i + 1} of {args.passes}):", " ".join(cmd), flush=True)
            rc = subprocess.run(cmd, stdout=sys.stderr if args.quiet else None, env=perf.suite_env()).returncode
            if rc == 5:  # pytest: no tests collected
                print("the perf suite selected no benchmarks (check -k, --cases and --dtypes)", file=sys.stderr)
                return 2
            if rc != 0 or not current.exists():
                print(f"the perf suite failed (pytest exit {rc})", file=sys.stderr)
                return 2
            passes.append(perf.read(current))
        data = {"env": passes[0]["env"], "records": perf.least_disturbed([d["records"] for d in passes])}
        if args.update:
            perf.write(baseline, data["records"], data["env"])
            print(f"baseline written: {baseline} ({len(data['records'])} records)")
            return 0
    rows, failures = perf.compare(data["records"], base["records"], args.threshold)
    print(f"speedup ratios, this run vs {baseline} (threshold {args.threshold} + measured spread): opforge's "
          f"variants over its torch path, and its torch path over each peer")
    print(_table(rows, [("op", "op"), ("case", "case"), ("mode", "mode"), ("dtype", "dtype"),
                        ("speedup of", "speedup"), ("now", "current"), ("baseline", "baseline"),
                        ("allowed drop", "allowed"), ("status", "status")]))
    skipped = sum(r["status"] == "not run" for r in rows)
    if skipped:
        print(f"{skipped} baseline record(s) not run: this run's case sets, dtypes or -k left their cases out")
    if failures:
        print(f"{len(failures)} regression(s)", file=sys.stderr)
        return 1
    return 0


BEGIN, END = "<!-- perf-tables:begin (generated by opforge perf-table --readme) -->", "<!-- perf-tables:end -->"


def _perf_names(parser: str):
    """An argparse type for a comma-separated option that ``perf.<parser>`` checks (its ValueError a usage
    error), given back comma-joined (perf is imported when the option is read, not at start-up)."""
    def names(text: str) -> str:
        from opforge.autotune import perf

        try:
            return ",".join(getattr(perf, parser)(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _threshold(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not (t >= 0 and math.isfinite(t)):  # (NaN failed every ratio; a negative drop demanded a speedup)
        raise argparse.ArgumentTypeError(f"must be a finite relative drop >= 0 (0.10: 10%), got {text!r}")
    return t


def perf_tables(results_dir: Path) -> str:
    """Markdown for every results file in ``results_dir``, one section per device, then the static
    counts in ``results_dir/static/`` (compiled, never run), then the records of the perf/ scripts in
    ``results_dir/solvers/`` and ``results_dir/gp/``."""
    from opforge.autotune import perf

    parts = []
    for path in sorted(Path(results_dir).glob("*.json")):
        data = perf.read(path)
        parts.append(f"#### `{path.name}`\n\n" + perf.markdown_table(data["records"], data["env"]))
    for path in sorted((Path(results_dir) / "static").glob("*.json")):
        parts.append(f"#### `static/{path.name}`\n\n" + perf.static_table(perf.read_static(path), _current_hashes()))
    for kind in perf.SCRIPT_TABLES:  # (perf/solver_paths.py's and perf/gp_peer.py's records)
        for path in sorted((Path(results_dir) / kind).glob("*.json")):
            parts.append(f"#### `{kind}/{path.name}`\n\n" + perf.script_table(perf.read_script_records(path), kind))
    return "\n\n".join(parts) if parts else "_No results files yet._"


def _current_hashes() -> dict:
    k = _kernels()
    return {name: k.get_op(name).source_hash() for name in k.registered_ops()}


def cmd_perf_table(args) -> int:
    try:
        return _perf_table(args)
    except ValueError as exc:  # a results file missing, not JSON or not opforge's (perf.read names it)
        print(f"opforge perf-table: {exc}", file=sys.stderr)
        return 2


def _perf_table(args) -> int:
    from opforge.autotune import perf

    if not Path(args.results_dir).is_dir() and not args.file:
        raise ValueError(f"--results-dir {args.results_dir} is not a folder (run from an opforge checkout or name "
                         f"it)")
    if args.readme:
        if not Path(args.readme).is_file():
            raise ValueError(f"--readme {args.readme}: no such file")
        readme = Path(args.readme)
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            print(f"{readme} has no {BEGIN!r} ... {END!r} block", file=sys.stderr)
            return 2
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(head + BEGIN + "\n" + perf_tables(Path(args.results_dir)) + "\n" + END + tail)
        print(f"updated the perf tables in {readme}")
        return 0
    if not args.file:
        print(perf_tables(Path(args.results_dir)))
        return 0
    data = perf.read(args.file)
    print(perf.markdown_table(data["records"], data["env"]))
    return 0


def cmd_list(args) -> int:
    k = _kernels()
    for name, variants in k.registered_ops().items():
        op = k.get_op(name)
        print(f"{name}: {', '.join(variants)}  -- {op.doc}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="opforge", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="check every op against its NumPy reference and time it (start here)")
    b.add_argument("--op", nargs="*", help="ops to run (default: all)")
    b.add_argument("--interpret", action="store_true",
                   help="run every Triton variant through the CPU interpreter on small shapes")
    b.add_argument("--cases", choices=["small", "cpu", "gpu", "main"],
                   help="case set (default: gpu on CUDA, else small; main: the issues' headline shapes)")
    b.set_defaults(fn=cmd_bench)
    t = sub.add_parser("tune", help="autotune on the GPU at hand and write the cache")
    t.add_argument("--op", nargs="*")
    t.add_argument("--out", help="cache file to write (default: the user cache file of this GPU)")
    t.add_argument("--dtype", nargs="+", default=["float32"],
                   choices=["float32", "float32-tf32", "bfloat16", "float16"],
                   help="float32-tf32: float32 calls made while torch's float32 matmul setting allows TF32")
    t.add_argument("--cases", choices=["small", "gpu", "main"])
    t.add_argument("--case", nargs="+", metavar="NAME", help="only these cases of the set, by name")
    t.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"],
                   help="tune inference calls (fwd), training calls (fwdbwd, stored under '<key>|train'), or both")
    t.add_argument("--jobs", type=int, metavar="N",
                   help="worker processes that compile every config's kernels before the timing starts (default: "
                        "the CPU cores less one, at most one per 4 GiB of free memory; 0: each config compiles "
                        "at its first call, in the timing loop)")
    t.add_argument("--compile-only", type=int, metavar="ARCH",
                   help="only compile every config's kernels for compute capability ARCH x10 (90: H100/H200) into "
                        "Triton's disk cache, with --jobs workers; no GPU needed, nothing timed or written")
    t.add_argument("--sms", type=int, metavar="N", help="with --compile-only: the GPU's SM count (default: 132 for 90)")
    t.add_argument("--interpret", action="store_true", help="exercise the tuner on the CPU interpreter")
    t.set_defaults(fn=cmd_tune)
    p = sub.add_parser("perf-check", help="rerun the perf suite and gate speedup ratios against the baseline")
    p.add_argument("--perf-dir", default="perf")
    p.add_argument("--baseline", help="results file to compare with (default perf/results/<device>.json)")
    p.add_argument("--threshold", type=_threshold, default=0.10,
                   help="allowed relative drop of a ratio (>= 0), plus spread")
    p.add_argument("--update", action="store_true", help="write this run as the baseline instead of comparing")
    p.add_argument("--passes", type=int, default=1, help="run the suite this many times and keep each record's "
                   "least disturbed pass (lowest median; 3 on a shared CPU machine)")
    p.add_argument("--cases", type=_perf_names("case_sets"), help="case sets, comma-separated: small, cpu "
                   "(torch-path sizes a CPU user meets), gpu, main, all (default: gpu on CUDA, else small)")
    p.add_argument("--dtypes", type=_perf_names("dtype_names"), help="comma-separated dtypes: float32 (default), "
                   "float32-tf32, bfloat16, float16, float64")
    p.add_argument("-k", help="pytest -k expression to select benchmarks")
    p.add_argument("--quiet", action="store_true", help="send pytest's output to stderr")
    p.set_defaults(fn=cmd_perf_check)
    pt = sub.add_parser("perf-table", help="print (or write into the README) the tables of perf results files")
    pt.add_argument("file", nargs="?", help="one results file (default: every file in --results-dir)")
    pt.add_argument("--results-dir", default="perf/results")
    pt.add_argument("--readme", help="rewrite the generated block of this README instead of printing")
    pt.set_defaults(fn=cmd_perf_table)
    ls = sub.add_parser("list", help="registered ops and their variants")
    ls.set_defaults(fn=cmd_list)
    args = ap.parse_args(argv)
    if getattr(args, "interpret", False):
        os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs
        from opforge.kernels._triton import HAS_TRITON, TRITON_MISSING

        if not HAS_TRITON:
            print(f"opforge {args.cmd} --interpret runs the Triton kernels through Triton's interpreter, but "
                  f"{TRITON_MISSING} (`pip install -U triton`); without it opforge runs its torch variants "
                  f"(drop --interpret)", file=sys.stderr)
            return 2
        from opforge.kernels._triton import interpreter_problem

        problem = interpreter_problem()
        if problem:
            print(f"opforge {args.cmd} --interpret: {problem}", file=sys.stderr)
            return 2
    if args.cmd in ("bench", "tune"):
        _check_names(args, b if args.cmd == "bench" else t)
    return args.fn(args)


def _check_names(args, parser) -> None:
    """``--op`` and ``tune --case`` names: one that names nothing is a usage error (exit 2) that lists the valid
    ones, never a run that silently covers less (a mistyped case once tuned nothing and wrote an empty table).
    A case of an op left out by ``--op`` is no error (perf/gpu_session.sh passes one list of cases to a run per
    op). Checked after ``--interpret`` has set TRITON_INTERPRET: importing the kernels decorates them."""
    ops = _kernels().registered_ops()
    unknown = [n for n in args.op or () if n not in ops]
    if unknown:
        parser.error(f"argument --op: unknown op(s) {unknown}; registered: {sorted(ops)}")
    every_case = {c.name for op in _ops(None) for c in op.cases}
    unknown = [n for n in getattr(args, "case", None) or () if n not in every_case]
    if unknown:
        names = sorted(c.name for op in _ops(args.op) for c in op.cases)
        parser.error(f"argument --case: unknown case(s) {unknown}; the cases of {', '.join(args.op or sorted(ops))}: "
                     f"{names}")


if __name__ == "__main__":
    sys.exit(main())
