"""Host time of one forward + backward step of each op's Triton path, the kernels themselves left out.

What a GPU call costs its host beyond the kernels (checks, dispatch, the autotune cache lookup, launch
arguments, the torch ops around the kernels) is CPU work, so it can be measured without a GPU: the
Triton interpreter runs the launchers on CPU tensors and its kernel runs are replaced by no-ops (the
outputs are garbage; only the time is read). Tiny shapes, so that the torch ops' own work stays small.
Interleave two checkouts' runs when comparing (this host's timings drift): the minimum of several rounds.

    python perf/host_overhead.py [--rounds 4] [op ...]      # ops: kan spectral_conv kernel_sum
"""
from __future__ import annotations

import argparse
import os
import timeit

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

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
    args = ap.parse_args(argv)
    interpreter.InterpretedFunction.run = lambda self, *a, **k: None  # kernel runs become no-ops
    steps = _steps()
    for name in args.ops or list(steps):
        step = steps[name]
        with use_backend("triton"):
            for _ in range(20):
                step()
            best = min(min(timeit.repeat(step, number=100, repeat=9)) for _ in range(args.rounds)) / 100
        print(f"{name:14s} {best * 1e6:7.1f} us per forward + backward step (host only)")


if __name__ == "__main__":
    main()
