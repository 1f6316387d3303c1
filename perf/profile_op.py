"""Where the time goes: one op variant on one case under torch.profiler, a table of its kernels.

    python perf/profile_op.py spectral_conv 2d-256-b32-c64-m32 dft_gemm [--mode fwdbwd] [--dtype float32] [--tf32]
                              [--config '{"BLOCK_N": 128, ..., "GRAD_B_FUSED": 0}']

Prints the kernels (CUDA time, calls) of a few profiled repetitions after a warm-up, longest first,
and the total (``--config``: the variant's whole config, for an A/B of one key; default: what dispatch picks); on a CPU it profiles the CPU ops (the Triton kernels then run through the interpreter
only with TRITON_INTERPRET=1). Use it before changing a variant: it names the stage to fix.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from case_args import add_case_args, case_inputs
from opforge.kernels._triton import allow_tf32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap, "fwdbwd", "float32 with TF32 allowed in torch's matmul setting")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--config", type=json.loads, default=None, help="JSON config of the variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    with allow_tf32(args.tf32):
        profile_case(args)


def profile_case(args: argparse.Namespace) -> None:
    op, problem, inputs = case_inputs(args, args.device)
    grad = args.mode == "fwdbwd"
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        if not grad:
            with torch.no_grad():
                return op.run_variant(args.variant, problem, *inputs, config=args.config)
        for t in leaves:
            t.grad = None
        y = op.run_variant(args.variant, problem, *inputs, config=args.config)
        y.backward(torch.ones_like(y))

    cuda = problem.device.type == "cuda"
    step()  # compile and warm up
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.reps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) / args.reps
    dtype = problem.dtype_name
    print(f"{args.op} {args.case} {args.variant} {args.mode} {dtype}: {total / 1e3:.3f} ms per step "
          f"({'device' if cuda else 'cpu'} time, {args.reps} steps)")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  name")
    for e in events[:20]:
        t = getattr(e, key) / args.reps
        print(f"{t / 1e3:9.3f} {100 * t / total:5.1f}% {e.count // args.reps:6d}  {e.key[:110]}")


if __name__ == "__main__":
    main()
