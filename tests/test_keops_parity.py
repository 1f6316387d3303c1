"""Kernel sums against KeOps, the library people use for them today: the formulas a KeOps user writes
(perf/keops_peer.py, GPyTorch's form), on the CPU in float64, forward and the gradients of x, y, b, the
lengthscale (ARD) and the outputscale. Skips where pykeops is not installed or cannot compile here (KeOps
builds each formula with the host's C++ compiler and pybind11 on a CPU; ``.ci/run`` installs it from
``../shared/gpu-wheels`` when that folder is there)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from opforge.kernels import KERNELS, kernel_matvec, use_backend

_PATH = Path(__file__).resolve().parents[1] / "perf" / "keops_peer.py"
_spec = importlib.util.spec_from_file_location("keops_peer_t", _PATH)
keops_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(keops_peer)


@pytest.fixture(scope="module")
def keops():
    works, said = keops_peer.probe("cpu")
    if not works:
        pytest.skip(f"KeOps does not run here: {said.splitlines()[-1] if said else 'no output'}")
    return keops_peer


def _inputs(n=37, m=29, d=3, r=2, seed=0, coincide=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64) * 2
    y = torch.rand(m, d, generator=g, dtype=torch.float64) * 2
    if coincide:  # r = 0 pairs, where the Laplacian's and the Matérns' derivatives in r are unbounded or 0/0
        y[::2] = x[: (m + 1) // 2]
    b = torch.randn(m, r, generator=g, dtype=torch.float64)
    ls = torch.linspace(0.6, 1.4, d, dtype=torch.float64)
    os_ = torch.tensor(1.7, dtype=torch.float64)
    cot = torch.randn(n, r, generator=g, dtype=torch.float64)
    return [x, y, b, ls, os_], cot


def _run(fn, kernel, coincide):
    leaves, cot = _inputs(coincide=coincide)
    for t in leaves:
        t.requires_grad_(True)
    x, y, b, ls, os_ = leaves
    out = fn(x, y, b, kernel, ls, os_)
    grads = torch.autograd.grad((out * cot).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("coincide", [False, True], ids=["apart", "coincident"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matvec_matches_keops(keops, kernel, coincide):
    """opforge's public call (the torch variant on a CPU) and KeOps agree to float64 rounding: the same
    kernel formulas, the same lengthscale and outputscale conventions, the same gradients, also where
    points coincide (both take the gradient there as 0). Both point sets run the same KeOps formulas, so
    the coincident case compiles nothing more."""
    with use_backend("torch"):
        out, grads = _run(kernel_matvec, kernel, coincide)
    want_out, want_grads = _run(keops.kernel_matvec, kernel, coincide)
    assert out.shape == want_out.shape == (37, 2)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("x", "y", "b", "lengthscale", "outputscale"), grads, want_grads):
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")
