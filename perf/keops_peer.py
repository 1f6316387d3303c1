"""KeOps (pykeops) as the kernel-sum peer: the formulas a KeOps user writes, and a probe that it runs here.

The kernels are written the way GPyTorch's KeOps kernels write them: points divided by the lengthscale in
torch first (so ARD and the lengthscale's gradient go through torch autograd), then a LazyTensor formula
of the squared distance s, reduced against b. KeOps differentiates that formula itself (x, y and b).

Used by ``perf/bench_kernel_sum.py`` (the ``keops`` variant) and ``tests/test_keops_parity.py``. KeOps
compiles each formula at its first call, with nvrtc on a GPU and with the host's C++ compiler and pybind11
on a CPU (``~/.cache/keops<version>``); a formula compiled once is reused by later processes.
"""
from __future__ import annotations

import math
import signal
import subprocess
import sys

_PROBE = """
import torch
try:  # what KeOps found of CUDA (libraries, version, include path, arch flags): the lead when it fails below
    from keopscore.config import cuda_config
    cuda_config.print_all()
except Exception as e:
    print("keopscore's CUDA configuration did not print:", repr(e))
from pykeops.torch import LazyTensor
x = torch.rand(100, 3, device={device!r})
print(float((-(((LazyTensor(x[:, None, :]) - LazyTensor(x[None, :, :])) ** 2).sum(-1))).exp().sum(1).sum()))
"""


def probe(device: str = "cpu", timeout: float = 300.0) -> tuple[bool, str]:
    """(works, what it printed): pykeops imports and compiles and runs a tiny Gaussian sum on ``device``.

    Run in a child process: KeOps' compile segfaulted on the H100 image (CUDA 13, pykeops 2.3), and a
    crash there must not take the caller with it. The child prints keopscore's CUDA configuration first and
    runs with Python's faulthandler, so a crash names the Python call it happened in."""
    try:
        import pykeops  # noqa: F401
    except Exception as e:  # not installed, or its import fails here
        return False, f"pykeops does not import: {e!r}"
    try:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _PROBE.format(device=device)],
                              capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"the probe did not finish: {e!r}"
    # what KeOps printed (its compiler and library lookups) and how the child ended (on the H200 image it
    # printed only 'Generating code ...' before dying): the lead for making it work
    said = (done.stdout + done.stderr).decode(errors="replace").strip()[-4000:]
    rc = done.returncode
    if rc != 0:
        how = f"killed by signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals() \
            else f"exit status {rc}"
        said += f"\n[the probe process ended: {how}]"
    return rc == 0, said


def kernel_of_s(s, kernel: str, sqrt, exp):
    """The kernel as a function of the squared scaled distance s, for LazyTensors or tensors alike."""
    if kernel == "gaussian":
        return exp(-0.5 * s)
    if kernel == "imq":
        return 1 / sqrt(1 + s)
    if kernel == "cauchy":
        return 1 / (1 + s)
    r = sqrt(s)
    if kernel == "laplacian":
        return exp(-r)
    if kernel == "matern32":
        return (1 + math.sqrt(3) * r) * exp(-math.sqrt(3) * r)
    if kernel == "matern52":
        return (1 + math.sqrt(5) * r + 5.0 / 3.0 * s) * exp(-math.sqrt(5) * r)
    raise ValueError(f"unknown kernel {kernel!r}")


def kernel_matvec(x, y, b, kernel: str = "gaussian", lengthscale=1.0, outputscale=1.0):
    """KeOps' out[i] = outputscale * sum_j k(|(x_i - y_j) / lengthscale|) b[j]: x [N, D], y [M, D], b [M, R]
    (torch tensors on one device), lengthscale a number or a [D] tensor (ARD)."""
    from pykeops.torch import LazyTensor

    xi = LazyTensor((x / lengthscale)[:, None, :])
    yj = LazyTensor((y / lengthscale)[None, :, :])
    s = ((xi - yj) ** 2).sum(-1)
    return outputscale * (kernel_of_s(s, kernel, lambda t: t.sqrt(), lambda t: t.exp()) @ b)
