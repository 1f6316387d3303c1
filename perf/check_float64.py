"""Every variant of an op, torch included, in its float32 run against the torch variant run in
float64 on the same (upcast) inputs, on the GPU: normalised max error and median ms per variant.

    python perf/check_float64.py [--ops spectral_conv kan kernel_sum] [--cases NAME ...] [--device cuda] [--tf32]

``--tf32`` makes the float32 run with torch's float32 matmul setting at TF32 (opforge's dots follow it);
the tolerance column is the table's row for the run (``float32`` or ``float32-tf32``).

The tuner checks configs against the torch variant in the same dtype; this checks the torch variant
too (a float32 torch path that is itself off would otherwise pass unnoticed).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from opforge.autotune.timing import bench
from opforge.kernels import get_op
from opforge.kernels._triton import allow_tf32
from opforge.reference import tolerance


def _f64(a):
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return dataclasses.replace(a, **{f.name: _f64(getattr(a, f.name)) for f in dataclasses.fields(a)
                                         if isinstance(getattr(a, f.name), torch.Tensor)})
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.double()
    if isinstance(a, torch.Tensor) and a.is_complex():
        return a.to(torch.complex128)
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="*", default=["spectral_conv", "kan", "kernel_sum"])
    ap.add_argument("--tags", default="gpu", help="the case set to run (default gpu)")
    ap.add_argument("--cases", nargs="*", help="case names, of any of the ops (default: every case with --tags)")
    ap.add_argument("--device", default="cuda", help="cpu runs the Triton kernels with TRITON_INTERPRET=1")
    ap.add_argument("--tf32", action="store_true", help="run float32 with TF32 allowed in torch's matmul setting")
    args = ap.parse_args()
    try:
        ops = [get_op(name) for name in args.ops]
    except ValueError as exc:
        ap.error(str(exc))
    known = {c.name for op in ops for c in op.cases}
    bad = [c for c in args.cases or () if c not in known]
    if bad:
        ap.error(f"unknown case(s) {bad} of {args.ops}")
    selected = [(op, c) for op in ops for c in op.cases
                if (c.name in args.cases if args.cases else args.tags in c.tags)]
    if not selected:  # (it printed a header and passed)
        ap.error(f"no case of {args.ops} is in the set {args.tags!r}")
    with allow_tf32(args.tf32):
        over = _run(args, selected)
    if over:
        print(f"{over} variant(s) over their tolerance", file=sys.stderr)
        sys.exit(1)


def _run(args, selected) -> int:
    """Print each selected case's variants' errors and times; return how many were over their tolerance."""
    over = 0
    print(f"{'op':14} {'case':26} {'variant':9} {'rel err':>9} {'tol':>9} {'ms':>9}")
    for op, case in selected:
        name = op.name
        p, inputs = op.make_inputs(case, args.device, torch.float32)
        p64, _ = op.make_inputs(case, args.device, torch.float64)
        with torch.no_grad():
            want = op.run_variant("torch", p64, *[_f64(a) for a in inputs])
            for v in op.variants.values():
                reason = v.why_not(p)
                if reason:
                    print(f"{name:14} {case.name:26} {v.name:9} skipped: {reason}"[:160])
                    continue
                got = op.run_variant(v.name, p, *inputs)
                err = ((got.double() - want).abs().max() / want.abs().max()).item()
                tol = tolerance(p.dtype_name, op.reduction(p) if op.reduction else 1)
                ms = bench(lambda: op.run_variant(v.name, p, *inputs), p.device, rep_ms=40)["p50"]
                flag = "" if err <= tol else "  OVER"
                over += bool(flag)
                print(f"{name:14} {case.name:26} {v.name:9} {err:9.2e} {tol:9.2e} {ms:9.4f}{flag}", flush=True)
    return over


if __name__ == "__main__":
    main()
