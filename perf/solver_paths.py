"""The solvers' two paths side by side: ``method="cholesky"`` (the dense float64 factor) against ``method="cg"``
(preconditioned conjugate gradients on kernel sums) on the same problems, which is what ``"auto"``'s switch at
800 points rests on.

    python perf/solver_paths.py [--n 200 800 1600] [--kernel matern52] [--device cuda] [--repeat 3] [--json FILE]

For each N (points uniform in [0, 1]^3, y = sin(3 (x1 + x2 + x3)) + 0.1 noise, lengthscale 0.3, noise 0.01) it
times, per method: ``kernel_solve`` (tol 1e-6), ``gp_marginal_log_likelihood`` with its gradient in the
lengthscale and the noise, and ``gp_posterior_variance`` at 1000 test points; the median of ``--repeat``
calls after one warm-up, in milliseconds, and the Cholesky path's speedup. Also the largest difference
between the two solves (relative to the largest entry), so a speed is never bought with a different
answer. A line per (N, call); ``--json FILE`` also writes them as records (n, call, cholesky_ms, cg_ms,
speedup; the solves' difference as the call "cg_vs_cholesky" with its value in "relative"), each with the
device, kernel, torch version, commit and this command (``perf/results/solvers/`` keeps the committed ones,
which ``opforge perf-table`` renders).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

from opforge.autotune.perf import git_commit
from opforge.autotune.timing import wall_ms
from opforge.kernels import KERNELS, gp_marginal_log_likelihood, gp_posterior_variance, kernel_solve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200, 800, 1600])
    ap.add_argument("--kernel", choices=KERNELS, default="matern52")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON records to this file")
    args = ap.parse_args()
    if min(args.n) < 1 or args.repeat < 1:
        ap.error("--n and --repeat must be positive")
    g = torch.Generator().manual_seed(0)
    dev = args.device
    device_name = (torch.cuda.get_device_name() if dev.startswith("cuda") else
                   f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"device {device_name}, kernel {args.kernel}, torch {torch.__version__}")
    command = "python perf/solver_paths.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    common = dict(device=device_name, kernel=args.kernel, torch=torch.__version__, commit=git_commit(),
                  repeat=args.repeat, command=command.strip())
    records = []
    print(f"{'N':>6} {'call':<14} {'cholesky ms':>12} {'cg ms':>10} {'speedup':>8}")
    for n in args.n:
        x = torch.rand(n, 3, generator=g).to(dev)
        y = (torch.sin(3 * x.sum(-1).cpu()) + 0.1 * torch.randn(n, generator=g)).to(dev)
        xt = torch.rand(1000, 3, generator=g).to(dev)
        ls = torch.tensor(0.3, device=dev, requires_grad=True)
        nz = torch.tensor(0.01, device=dev, requires_grad=True)
        calls = {
            "kernel_solve": lambda m: kernel_solve(x, y, args.kernel, 0.01, 0.3, method=m),
            "mll+grad": lambda m: torch.autograd.grad(
                gp_marginal_log_likelihood(x, y, args.kernel, nz, ls, method=m), [ls, nz]),
            "variance@1000": lambda m: gp_posterior_variance(x, xt, args.kernel, 0.01, 0.3, method=m),
        }
        for name, call in calls.items():
            ms = {m: wall_ms(lambda: call(m), dev, args.repeat) for m in ("cholesky", "cg")}
            print(f"{n:>6} {name:<14} {ms['cholesky']:>12.2f} {ms['cg']:>10.2f} {ms['cg'] / ms['cholesky']:>7.1f}x")
            records.append(dict(n=n, call=name, cholesky_ms=round(ms["cholesky"], 3), cg_ms=round(ms["cg"], 3),
                                speedup=round(ms["cg"] / ms["cholesky"], 2), **common))
        a, b = (kernel_solve(x, y, args.kernel, 0.01, 0.3, method=m) for m in ("cholesky", "cg"))
        rel = float((a - b).abs().max() / b.abs().max())
        print(f"{n:>6} {'cg_vs_cholesky':<14} {rel:>12.1e} (relative, tol 1e-6)")
        records.append(dict(n=n, call="cg_vs_cholesky", relative=rel, **common))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
