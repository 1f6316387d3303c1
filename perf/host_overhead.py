"""Host time of one forward + backward step of each op's Triton path, the kernels themselves left out.

What a GPU call costs its host beyond the kernels (checks, dispatch, the autotune cache lookup, launch
arguments, the torch ops around the kernels) is CPU work, so it can be measured without a GPU: the
Triton interpreter runs the launchers on CPU tensors and its kernel runs are replaced by no-ops (the
outputs are garbage; only the time is read). Tiny shapes, so that the torch ops' own work stays small.
Interleave two checkouts' runs when comparing (this host's timings drift): the minimum of several rounds.

    python perf/host_overhead.py [--rounds 4] [--json FILE] [op ...]   # ops: kan spectral_conv kernel_sum

``--json`` adds this run's records (op, microseconds, the commit as perf results record it: the working
directory's, run the script from the checkout it times, or OPFORGE_COMMIT; torch and Triton versions)
to FILE, keeping the lower time where a record of the same commit and op is there: runs of two checkouts
interleaved into one file converge on each one's least disturbed time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import timeit
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

from opforge.autotune.perf import git_commit  # noqa: E402
from opforge.kernels import KANLinear, SpectralConv, kernel_matvec, use_backend  # noqa: E402


def _steps() -> dict:
    torch.manual_seed(0)
    kan = KANLinear(8, 8, grid_size=5)
    xk = torch.randn(4, 8, requires_grad=True)
    spec = SpectralConv(4, 4, n_modes=(4, 4))
    xs = torch.randn(2, 4, 8, 8, requires_grad=True)
    xq, yq, bq = torch.randn(16, 3, requires_grad=True), torch.randn(16, 3), torch.randn(16, 1)
    return {
        "kan": lambda: kan(xk).sum().backward(),
        "spectral_conv": lambda: spec(xs).sum().backward(),
        "kernel_sum": lambda: kernel_matvec(xq, yq, bq).sum().backward(),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*", help="ops to time (default: all)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of 9 x 100 steps; the minimum is reported")
    ap.add_argument("--json", help="add the records to this JSON file")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    records, commit = [], git_commit()
    interpreter.GridExecutor.__call__ = lambda self, *a, **k: None  # kernel runs become no-ops (Triton 3.2-3.9)
    steps = _steps()
    bad = [n for n in args.ops if n not in steps]
    if bad:
        ap.error(f"unknown op(s) {bad}; valid: {list(steps)}")
    for name in args.ops or list(steps):
        step = steps[name]
        with use_backend("triton"):
            for _ in range(20):
                step()
            best = min(min(timeit.repeat(step, number=100, repeat=9)) for _ in range(args.rounds)) / 100
        print(f"{name:14s} {best * 1e6:7.1f} us per forward + backward step (host only)")
        records.append({"op": name, "us": round(best * 1e6, 1), "commit": commit, "torch": torch.__version__,
                        "triton": triton.__version__,
                        "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "rounds": args.rounds})
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        merged = {(r["commit"], r["op"]): r for r in old}
        for r in records:
            prev = merged.get((r["commit"], r["op"]))
            merged[(r["commit"], r["op"])] = r if prev is None or r["us"] < prev["us"] else prev
        path.write_text(json.dumps(list(merged.values()), indent=1) + "\n")


if __name__ == "__main__":
    main()
