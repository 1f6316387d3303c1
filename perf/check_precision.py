"""Float32 dot modes on the GPU: every Triton variant of every op, each OPFORGE_F32_DOT mode, against
the torch variant run in float64 on the same inputs (forward), with each mode's time.

    python perf/check_precision.py [--ops kan spectral_conv kernel_sum] [--tags gpu]

Prints one row per (op, case, variant, mode): normalised max error and median ms. This is how the
"split" default was chosen over Triton's own "tf32x3" (see kernels/_triton.py: dot).
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from opforge.autotune.timing import bench
from opforge.kernels import get_op

MODES = ("split", "tf32x3", "tf32", "ieee")


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
    ap.add_argument("--ops", nargs="*", default=["kan", "spectral_conv", "kernel_sum"])
    ap.add_argument("--tags", default="gpu")
    ap.add_argument("--cases", nargs="*", help="case names (default: every case with --tags)")
    ap.add_argument("--device", default="cuda", help="cpu runs the kernels through TRITON_INTERPRET=1")
    args = ap.parse_args()
    print(f"{'op':14} {'case':26} {'variant':9} {'mode':7} {'rel err':>9} {'ms':>9}")
    for name in args.ops:
        op = get_op(name)
        for case in op.cases:
            if args.tags not in case.tags or (args.cases and case.name not in args.cases):
                continue
            p, inputs = op.make_inputs(case, args.device, torch.float32)
            p64, _ = op.make_inputs(case, args.device, torch.float64)
            with torch.no_grad():
                want = op.run_variant("torch", p64, *[_f64(a) for a in inputs])
                for v in op.triton_variants():
                    if v.why_not(p):
                        continue
                    for mode in MODES:
                        os.environ["OPFORGE_F32_DOT"] = mode
                        try:
                            got = op.run_variant(v.name, p, *inputs)
                            err = ((got.double() - want).abs().max() / want.abs().max()).item()
                            ms = bench(lambda: op.run_variant(v.name, p, *inputs), p.device, rep_ms=40)["p50"]
                            print(f"{name:14} {case.name:26} {v.name:9} {mode:7} {err:9.2e} {ms:9.4f}", flush=True)
                        except Exception as exc:  # report and go on: this is a diagnosis tool
                            print(f"{name:14} {case.name:26} {v.name:9} {mode:7} {type(exc).__name__}: {exc}"[:200])
            os.environ.pop("OPFORGE_F32_DOT", None)


if __name__ == "__main__":
    main()
