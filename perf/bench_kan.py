"""Perf suite of KAN layers: every opforge variant (staged, fused, the memory-lean torch one) vs each peer's
published algorithm.

efficient-kan, FastKAN and ChebyKAN are not on PyPI, so the peers here are their published forward
algorithms written plainly in torch (materialise the [batch, in, K] basis, then a matmul), labelled
``efficient-kan-algorithm``, ``fastkan-algorithm``, ``chebykan-algorithm`` and ``fourierkan-algorithm``.

    pytest perf/bench_kan.py --opforge-results /tmp/r.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opforge.kernels import get_op, kan_linear

OP = get_op("kan")
PEERS = {"bspline": "efficient-kan-algorithm", "rbf": "fastkan-algorithm", "chebyshev": "chebykan-algorithm",
         "fourier": "fourierkan-algorithm"}


def _efficient_kan(x, w, wb, grid, k):
    """efficient-kan's KANLinear.forward: Cox-de Boor over all knots, then two linears."""
    xe = x.unsqueeze(-1)
    bases = ((xe >= grid[:, :-1]) & (xe < grid[:, 1:])).to(x.dtype)
    for p in range(1, k + 1):
        bases = ((xe - grid[:, : -(p + 1)]) / (grid[:, p:-1] - grid[:, : -(p + 1)]) * bases[:, :, :-1]
                 + (grid[:, p + 1:] - xe) / (grid[:, p + 1:] - grid[:, 1:-p]) * bases[:, :, 1:])
    return F.linear(F.silu(x), wb) + F.linear(bases.reshape(x.shape[0], -1), w.reshape(w.shape[0], -1))


def _fastkan(x, w, centers, width):
    phi = torch.exp(-((x[..., None] - centers) / width) ** 2)
    return F.linear(phi.reshape(x.shape[0], -1), w.reshape(w.shape[0], -1))


def _chebykan(x, w):
    t = torch.tanh(x).unsqueeze(-1).expand(-1, -1, w.shape[2]).acos()
    t = (t * torch.arange(w.shape[2], device=x.device)).cos()
    return torch.einsum("bid,oid->bo", t, w)


def _fourierkan(x, w, bias):
    G = w.shape[2] // 2
    kx = x.unsqueeze(-1) * torch.arange(1, G + 1, device=x.device)
    return torch.einsum("bik,oik->bo", torch.cat([kx.cos(), kx.sin()], -1), w) + bias


def _peer(p, w, wb, bias, b):
    if p.basis == "bspline":
        return lambda x: _efficient_kan(x, w, wb, b.grid, b.order)
    if p.basis == "rbf":
        return lambda x: _fastkan(x, w, b.centers, b.width)
    if p.basis == "chebyshev":
        return lambda x: _chebykan(x, w)
    return lambda x: _fourierkan(x, w, bias)


# "linear": nn.Linear of the same in/out, the memory yardstick; "public-call": kan_linear itself (checks, dispatch)
VARIANTS = list(OP.variants) + ["peer", "linear", "public-call"]


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kan(perf, case, dtype, variant, mode):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    grad = mode == "fwdbwd"
    problem, (x, w, wb, bias, b) = OP.make_inputs(case, dev, dtype, requires_grad=grad)
    params = [t for t in (x, w, wb, bias) if t is not None]
    if variant == "peer":
        fwd = _peer(problem, w, wb, bias, b)
        name = PEERS[problem.basis]
    elif variant == "linear":
        lin = torch.randn(problem.cout, problem.cin, device=dev, dtype=dtype, requires_grad=grad)
        params = [x, lin]

        def fwd(x):
            return F.linear(x, lin)

        name = "nn.Linear"
    elif variant == "public-call":
        perf.skip_public_call_on_gpu(problem)

        def fwd(x):
            return kan_linear(x, w, problem.basis, base_weight=wb, bias=bias, grid=b.grid, spline_order=b.order,
                              centers=b.centers, width=b.width)

        name = variant
    else:
        perf.skip_unless_timed(OP, variant, problem)

        def fwd(x, variant=variant):
            return OP.run_variant(variant, problem, x, w, wb, bias, b)

        name = variant
    g = torch.randn((problem.rows, problem.cout), device=dev, dtype=dtype)

    anchor = perf.anchor(OP, variant, problem, (x, w, wb, bias, b), [t for t in (x, w, wb, bias) if t is not None],
                         g, grad)
    perf.run(OP, case, name, mode, problem, perf.step(fwd, (x,), params, g, grad), anchor=anchor)
