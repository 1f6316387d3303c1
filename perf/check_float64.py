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
    ap.add_argument("--tags", default="gpu")
    ap.add_argument("--cases", nargs="*", help="case names (default: every case with --tags)")
    ap.add_argument("--device", default="cuda", help="cpu runs the Triton kernels with TRITON_INTERPRET=1")
    ap.add_argument("--tf32", action="store_true", help="run float32 with TF32 allowed in torch's matmul setting")
    args = ap.parse_args()
    with allow_tf32(args.tf32):
        _run(args)


def _run(args) -> None:
    print(f"{'op':14} {'case':26} {'variant':9} {'rel err':>9} {'tol':>9} {'ms':>9}")
    for name in args.ops:
        op = get_op(name)
        for case in op.cases:
            if args.tags not in case.tags or (args.cases and case.name not in args.cases):
                continue
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
                    print(f"{name:14} {case.name:26} {v.name:9} {err:9.2e} {tol:9.2e} {ms:9.4f}{flag}", flush=True)


if __name__ == "__main__":
    main()
