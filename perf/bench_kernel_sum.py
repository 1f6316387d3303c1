"""Perf suite of kernel sums: flash vs the blocked torch variant vs KeOps (pykeops) and dense torch.

The peers: KeOps' LazyTensor reduction when pykeops runs here (variant ``keops``, the formulas of
``keops_peer.py``; it compiles each formula at first use, outside the timed rounds: with nvrtc on a GPU,
with the C++ compiler on a CPU), and dense torch (``dense-torch``: the N x M kernel matrix, then a
matmul), run only while that matrix fits in 2^28 elements.

    pytest perf/bench_kernel_sum.py --opforge-results /tmp/r.json
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import pytest
import torch

from opforge.kernels import get_op, kernel_matvec

import keops_peer  # beside this file (pytest puts perf/ on sys.path)

OP = get_op("kernel_sum")

# "keops" is a variant wherever pykeops imports; whether it compiles and runs here is probed at its first
# test (not at collection, which `-k` runs of other cases also pay)
PEERS = (["keops"] if importlib.util.find_spec("pykeops") is not None else []) + ["dense-torch"]


@functools.cache
def _keops_probe() -> tuple[bool, str]:
    works, said = keops_peer.probe("cuda" if torch.cuda.is_available() else "cpu")
    if not works:  # in pytest's warnings summary, which -q keeps: the lead for making it work
        warnings.warn(f"pykeops is installed but failed a tiny reduction; no keops rows. Its last output:\n{said}",
                      stacklevel=1)
    return works, said


def _peer(variant, problem):
    if variant == "keops":
        def keops(x, y, b):
            return keops_peer.kernel_matvec(x[0], y[0], b[0], problem.kernel).unsqueeze(0)
        return keops
    if problem.n * problem.m > 2**28:
        return None

    def dense(x, y, b):
        s = torch.cdist(x, y).square()
        return keops_peer.kernel_of_s(s, problem.kernel, torch.sqrt, torch.exp) @ b
    return dense


VARIANTS = list(OP.variants) + PEERS + ["public-call"]  # "public-call": kernel_matvec itself (checks, dispatch)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_sum(perf, case, dtype, variant, mode):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    grad = mode == "fwdbwd"
    problem, (x, y, b) = OP.make_inputs(case, dev, dtype, requires_grad=grad)
    if variant == "keops" and not _keops_probe()[0]:
        # installed but failing (on the H100 image, CUDA 13 and pykeops 2.3, its compile segfaulted)
        pytest.skip("pykeops is installed but failed a tiny reduction (its output: the warnings summary)")
    if variant in PEERS:
        fwd = _peer(variant, problem)
        if fwd is None:
            pytest.skip("dense torch would need more than 2^28 kernel entries")
    elif variant == "public-call":
        perf.skip_public_call_on_gpu(problem)

        def fwd(x, y, b):
            return kernel_matvec(x, y, b, problem.kernel)
    else:
        perf.skip_unless_timed(OP, variant, problem)
        if variant == "torch" and OP.baseline_skip(problem):
            pytest.skip(OP.baseline_skip(problem))

        def fwd(x, y, b, variant=variant):
            return OP.run_variant(variant, problem, x, y, b)

    g = torch.randn((1, problem.n, problem.r), device=dev, dtype=dtype)

    step = perf.step(fwd, (x, y, b), [x, y, b], g, grad)
    if variant == "keops":
        step()  # KeOps compiles each formula (forward, and each gradient) at its first call: not in the timing
    anchor = perf.anchor(OP, variant, problem, (x, y, b), [x, y, b], g, grad)
    perf.run(OP, case, variant, mode, problem, step, rounds=5 if problem.n * problem.m >= 10**11 else None,
             anchor=anchor)
