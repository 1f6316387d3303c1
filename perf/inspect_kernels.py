"""What the compiler makes of a variant's kernels, without a GPU: registers, spills, MMA kind, access widths.

    python perf/inspect_kernels.py spectral_conv 2d-256-b32-c64-m32 dft_gemm [--mode fwdbwd] [--arch 90]
                                   [--config '{"BLOCK_M": 128, ...}' | --grid] [--dtype float32] [--tf32]

``--grid`` compiles every config of the variant's tuning grid at the case instead, one line per config:
the shared memory each kernel needs against the GPU's per-block limit, registers, spills, or the error
(what ``opforge tune`` would spend device time finding out).

Runs one variant on one case with CPU tensors while every Triton launch only *compiles* for the target
GPU (sm_90 by default: the H100/H200) instead of running (``opforge.autotune.precompile.compile_only``: a
stand-in driver names the target, launches become Triton's ``warmup`` compile, and launchers that size their
grids to the GPU read ``--sms``). For each launched kernel it prints the grid, warps,
shared memory, the registers and spill bytes ptxas reports, the MMA instructions (wgmma = Hopper tensor
cores, mma.sync = the older warp-level ones, none = CUDA cores; with how many instructions: 3xTF32 has three
times TF32's, ``--tf32`` compiles under torch's TF32 setting) and a count of global loads/stores by
width (4-byte accesses where 16 were possible point at unaligned strides), and, from the SASS
(cuobjdump), the instructions in each loop with how many are MUFU (exp, sqrt, rcp, sin, cos): for a
kernel bound by instruction issue, a loop's count over the work it does per thread (say the (i, j)
pairs of a kernel-sum tile over the threads) is the cost to compare between versions. Outputs are garbage (nothing
runs); only the code generation is inspected, a leading question for the GPU, not a timing of it. Each
launch also reports the seconds Triton took to compile its kernel in an empty cache of the run's own: the
compile wait of an op's first call, on this host's CPU (a kernel compiled for an earlier launch of the run
shows its lookup time).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JIT functions, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

from case_args import add_case_args, case_inputs  # noqa: E402
from opforge.autotune.precompile import SM_COUNT, compile_only  # noqa: E402


_ACCESS = re.compile(r"^(?:@!?%p\d+\s+)?(ld\.global|st\.global|cp\.async\.c[ag]\.shared\.global|red\.global|atom\.global)"
                     r"([.\w]*)")


def _accesses(ptx: str) -> Counter:
    """Global memory instructions by kind and width: 'ld 4B', 'cp.async 16B', 'st 16B', ..."""
    out = Counter()
    for line in ptx.splitlines():
        line = line.strip()
        m = _ACCESS.match(line)
        if not m:
            continue
        kind, mods = m.group(1), m.group(2)
        if kind.startswith("cp.async"):
            size = re.search(r",\s*(0x[0-9a-f]+|\d+)\s*(?:,[^;]*)?;", line)
            width = int(size.group(1), 0) if size else 0
            out[f"cp.async {width}B"] += 1
            continue
        vec = re.search(r"\.v(\d)", mods)
        bits = re.search(r"\.[bfsu](8|16|32|64)\b", mods)
        width = (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 4)
        out[f"{kind.split('.')[0]} {width}B"] += 1
    return out


def _sass_loops(cubin: str, bindir: str) -> list[tuple[int, int]] | None:
    """Instructions in each loop of the SASS (a backward branch from ``end`` to ``start``), innermost
    first, and how many of them are MUFU (exp, sqrt, rcp: the special-function unit, 16 per clock per SM
    against 128 lanes for the rest). With the work a loop does per thread this gives an issue-bound rate.
    None without cuobjdump."""
    exe = os.path.join(bindir, "cuobjdump")
    if not os.path.exists(exe):
        return None
    r = subprocess.run([exe, "-sass", cubin], capture_output=True, text=True)
    return sass_loops(r.stdout)


def sass_loops(sass: str) -> list[tuple[int, int]]:
    """(instructions, MUFU instructions) of each loop in cuobjdump's SASS listing, smallest first."""
    ins = []  # (address, text)
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in ins:
        b = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            body = [t for a, t in ins if int(b.group(1), 16) <= a <= addr]
            loops.append((len(body), sum("MUFU" in t for t in body)))
    return sorted(loops)


def _ptxas_report(ptx: str, arch: int) -> dict:
    """{"regs", "spill_st", "spill_ld", "loops"} of ``ptx`` compiled by Triton's ptxas ({"error"} if it fails)."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exe = next((os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))),
               None)
    if exe is None:
        return {"error": "ptxas not found"}
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        r = subprocess.run([exe, "-v", "--gpu-name", sm, src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
        cubin = os.path.join(tmp, "k.cubin")
        loops = _sass_loops(cubin, bindir) if os.path.exists(cubin) else None
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    if not regs:
        return {"error": f"ptxas: {r.stderr.strip()[:200]}"}
    return {"regs": int(regs.group(1)), "spill_st": int(spill.group(1)) if spill else 0,
            "spill_ld": int(spill.group(2)) if spill else 0, "loops": loops}


def describe(rec: dict) -> str:
    """One launch record as the line the script prints."""
    if "error" in rec:
        report = rec["error"]
    else:
        report = f"{rec['regs']} regs, spills {rec['spill_st']}/{rec['spill_ld']} B st/ld"
        if rec.get("loops"):
            report += " | loops " + ", ".join(f"{n} ins ({mu} MUFU)" for n, mu in rec["loops"])
    compiled = f" | compiled in {rec['compile_s']:.2f} s" if "compile_s" in rec else ""
    return (f"  {rec['kernel']} grid {rec['grid']} warps {rec['warps']} smem {rec['smem']} B | {report} | "
            f"{' '.join(rec['mma'])} | {rec['access']}{compiled}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap, "fwd", "compile under torch's TF32 float32 matmul setting")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 to compile for (90: H100/H200)")
    ap.add_argument("--sms", type=int, default=None,
                    help="the GPU's SM count, which launchers size their grids by (default: 132, the H100 SXM's "
                         "and H200's, for --arch 90)")
    ap.add_argument("--config", default=None, help="JSON config of the variant (default: its heuristic default)")
    ap.add_argument("--grid", action="store_true", help="compile every config of the variant's tuning grid")
    ap.add_argument("--json", default=None, metavar="FILE",
                    help="also merge the launches into this static-counts file (e.g. perf/results/static/"
                         "sm90_triton3.6.json; `opforge perf-table --readme` renders it)")
    args = ap.parse_args()
    # an empty Triton cache of the run's own (Triton reads the variable when it compiles): each kernel is
    # compiled here, so its time is the first call's compile wait (a disk cache of an earlier run would make
    # it a lookup), and nothing of a compile-only run is kept
    cache = tempfile.mkdtemp(prefix="opforge-inspect-")
    os.environ["TRITON_CACHE_DIR"] = cache
    atexit.register(shutil.rmtree, cache, True)
    from opforge.kernels._triton import allow_tf32

    with allow_tf32(args.tf32):
        _inspect(args)


def _inspect(args) -> None:
    launches = []

    def on_launch(fn, grid, kw, kernel, seconds):  # seconds: compiling (a kernel compiled before: a lookup)
        launches.append((fn.fn.__name__, grid, kw.get("num_warps", 4), kernel, seconds))

    sms = args.sms if args.sms is not None else SM_COUNT.get(args.arch)
    with compile_only(args.arch, sms, on_launch):
        _inspect_launches(args, launches)


def _inspect_launches(args, launches) -> None:
    op, problem, inputs = case_inputs(args, "cpu")
    if args.variant not in op.variants or op.variants[args.variant].kind != "triton":
        raise SystemExit(f"{args.variant!r} is not a Triton variant of {args.op}; valid: "
                         f"{[v.name for v in op.triton_variants()]}")
    v = op.variants[args.variant]
    grad = args.mode == "fwdbwd"
    if args.grid:
        return _inspect_grid(args, v, problem, inputs, launches)
    cfg = json.loads(args.config) if args.config else v.default_config(problem)
    _run(v, problem, inputs, cfg, grad)
    tf32 = " (TF32 setting)" if args.tf32 else ""
    print(f"{args.op} {args.case} {args.variant} {args.mode} {args.dtype}{tf32}, compiled for sm_{args.arch} "
          f"with Triton {triton.__version__}; config {cfg}")
    dtype = problem.dtype_name
    records = []
    for name, grid, warps, k, seconds in launches:
        ptx = k.asm["ptx"]
        if os.environ.get("OPFORGE_DUMP_PTX"):
            open(os.path.join(os.environ["OPFORGE_DUMP_PTX"], f"{len(records)}_{name}.ptx"), "w").write(ptx)
        found = Counter(m.split(".sync")[0] + ":" + m.split(".")[-2] + "." + m.split(".")[-1]
                        for m in re.findall(r"(?:wgmma\.mma_async|mma\.sync)[.\w]*", ptx))
        rec = {"op": args.op, "case": args.case, "variant": args.variant, "mode": args.mode, "dtype": dtype,
               "source_hash": op.source_hash(), "config": cfg, "kernel": name,
               "grid": list(grid) if isinstance(grid, tuple) else "(callable)", "warps": warps, "smem": k.metadata.shared,
               "mma": [f"{kind} x{n}" for kind, n in sorted(found.items())] or ["no MMA"],
               "access": ", ".join(f"{k_} x{n}" for k_, n in sorted(_accesses(ptx).items())),
               "compile_s": round(seconds, 2), **_ptxas_report(ptx, args.arch)}
        records.append(rec)
        print(describe(rec))
    sys.stdout.flush()
    if args.json:
        from opforge.autotune import perf

        perf.merge_static(args.json, records, {"arch": args.arch, "triton": triton.__version__,
                                               "commit": perf.git_commit(), "host_cpus": os.cpu_count()})


def _run(v, problem, inputs, cfg, grad: bool) -> None:
    y = v.run(problem, *inputs, config=cfg)  # the raw launcher: the registry would refuse CPU tensors here
    if grad:
        y.backward(torch.zeros_like(y))


# Shared memory one block may use (dynamic, opt-in) per compute capability: sm_90 228 KB less 1 KB reserved.
SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}


def _inspect_grid(args, v, problem, inputs, launches) -> None:
    limit = SMEM_LIMIT.get(args.arch)
    cfgs = v.tuning_configs(problem)  # the grid, its default first
    print(f"{args.op} {args.case} {args.variant} {args.mode} {args.dtype}: {len(cfgs)} configs compiled for "
          f"sm_{args.arch} with Triton {triton.__version__}; shared memory limit per block "
          f"{limit if limit else 'unknown'} B")
    too_big = failed = 0
    for cfg in cfgs:
        launches.clear()
        try:
            _run(v, problem, inputs, cfg, args.mode == "fwdbwd")
        except Exception as exc:  # a config that does not compile: what the tuner would record as a failure
            failed += 1
            print(f"  {json.dumps(cfg)}: ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        parts = []
        for name, grid, warps, k, _ in launches:
            rep = _ptxas_report(k.asm["ptx"], args.arch)
            smem = k.metadata.shared
            over = limit is not None and smem > limit
            too_big += over
            body = rep.get("error") or f"{rep['regs']} regs, spills {rep['spill_st']}/{rep['spill_ld']} B"
            parts.append(f"{name} smem {smem}{' OVER' if over else ''} {body}")
        print(f"  {json.dumps(cfg)}: " + "; ".join(parts))
    print(f"{len(cfgs)} configs: {failed} failed to compile, {too_big} kernel launches over the shared-memory limit")


if __name__ == "__main__":
    main()
