"""The command line shared by the one-case tools (profile_op.py, inspect_kernels.py): which op, case,
variant, call kind and dtype, and the inputs of that case."""
from __future__ import annotations

import argparse

import torch


def add_case_args(ap: argparse.ArgumentParser, mode: str, tf32_help: str) -> None:
    ap.add_argument("op")
    ap.add_argument("case")
    ap.add_argument("variant")
    ap.add_argument("--mode", choices=["fwd", "fwdbwd"], default=mode)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tf32", action="store_true", help=tf32_help)


def case_inputs(args: argparse.Namespace, device):
    """(op, problem, inputs) of ``args.case`` on ``device``, requiring grad in fwdbwd mode; a clear exit
    naming the valid cases on an unknown one. Imports opforge.kernels only when called."""
    from opforge.kernels import get_op

    op = get_op(args.op)
    cases = {c.name: c for c in op.cases}
    if args.case not in cases:
        raise SystemExit(f"unknown case {args.case!r} of {args.op}; valid: {sorted(cases)}")
    problem, inputs = op.make_inputs(cases[args.case], device, getattr(torch, args.dtype),
                                     requires_grad=args.mode == "fwdbwd")
    return op, problem, inputs
