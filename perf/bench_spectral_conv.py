"""Perf suite of the FNO spectral convolution: every variant vs torch vs the peer library.

The peer is neuraloperator's ``SpectralConv`` when neuraloperator is installed
(variant ``neuraloperator``); otherwise neuraloperator 2.0.0's dense forward
algorithm written plainly in torch (``neuralop-algorithm``: rfftn, fftshift,
a zero-filled full spectrum, slice assignment, fftshift, irfftn), labelled as such.

A second test times a Tucker-factorized layer (TFNO's, rank 0.1) where neuraloperator is installed:
its ``SpectralConv(factorization="tucker")`` against opforge's ``SpectralConv`` built from it
(``from_neuraloperator``: the same factors), under each opforge variant, as case ``<case>-tucker0.1``.
Both rebuild the dense weight from the factors at every call (neuraloperator's default
"reconstructed" implementation), then run the convolution.

    pytest perf/bench_spectral_conv.py --opforge-results /tmp/r.json
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from opforge.kernels import SpectralConv, get_op, spectral_conv, use_backend

OP = get_op("spectral_conv")

try:
    from neuralop.layers.spectral_convolution import SpectralConv as _NeuralopConv

    PEER = "neuraloperator"
except Exception:  # not installed (the usual case on CPU machines)
    _NeuralopConv = None
    PEER = "neuralop-algorithm"


def _neuralop_algorithm(x, w, bias):
    """neuraloperator 2.0.0's dense SpectralConv forward, written plainly (the baseline when it is absent)."""
    d = w.dim() - 2
    dims = tuple(range(-d, 0))
    X = torch.fft.rfftn(x.float(), dim=dims, norm="forward")
    if d > 1:
        X = torch.fft.fftshift(X, dim=dims[:-1])
    out = torch.zeros((x.shape[0], w.shape[1]) + tuple(X.shape[2:]), dtype=torch.complex64, device=x.device)
    sl = [slice(None), slice(None)]
    sl += [slice(n // 2 - m // 2, n // 2 - m // 2 + m) for n, m in zip(X.shape[2:-1], w.shape[2:-1])]
    sl += [slice(0, w.shape[-1])]
    out[tuple(sl)] = torch.einsum("bi...,io...->bo...", X[tuple(sl)], w)
    if d > 1:
        out = torch.fft.fftshift(out, dim=dims[:-1])
    y = torch.fft.irfftn(out, s=x.shape[2:], dim=dims, norm="forward")
    return y + bias.reshape((1, -1) + (1,) * d)


def _peer_forward(problem, w, bias):
    if _NeuralopConv is None:
        return lambda x: _neuralop_algorithm(x, w, bias)
    modes = list(problem.modes)
    n_modes = modes[:-1] + [2 * (modes[-1] - 1)]
    layer = _NeuralopConv(problem.cin, problem.cout, n_modes, bias=True).to(problem.device)
    with torch.no_grad():
        t = layer.weight.tensor  # complex, or a real [..., 2] view (tltorch's ComplexDenseTensor)
        t.copy_(w.detach() if t.is_complex() else torch.view_as_real(w.detach()))
        layer.bias.copy_(bias.detach().reshape(layer.bias.shape))
    return layer


VARIANTS = list(OP.variants) + [PEER, "public-call"]  # "public-call": spectral_conv itself (checks, dispatch)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_spectral_conv(perf, case, dtype, variant, mode):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    grad = mode == "fwdbwd"
    problem, (x, w, b) = OP.make_inputs(case, dev, dtype, requires_grad=grad)
    if variant == PEER:
        if problem.out_grid != problem.grid or dtype != torch.float32:
            pytest.skip("the peer runs float32 without resampling")
        fwd = _peer_forward(problem, w, b)
        params = [x] + (list(fwd.parameters()) if isinstance(fwd, torch.nn.Module) else [w, b])
    elif variant == "public-call":
        perf.skip_public_call_on_gpu(problem)

        def fwd(x):
            return spectral_conv(x, w, b, output_shape=problem.out_grid)

        params = [x, w, b]
    else:
        perf.skip_unless_timed(OP, variant, problem)

        def fwd(x, variant=variant):
            return OP.run_variant(variant, problem, x, w, b)

        params = [x, w, b]
    g = torch.randn((problem.batch, problem.cout) + problem.out_grid, device=dev, dtype=dtype)

    anchor = perf.anchor(OP, variant, problem, (x, w, b), [x, w, b], g, grad)
    perf.run(OP, case, variant, mode, problem, perf.step(fwd, (x,), params, g, grad), anchor=anchor)


TUCKER_RANK = 0.1  # TFNO's rank in neuraloperator's examples and papers


@pytest.mark.skipif(_NeuralopConv is None, reason="the Tucker layers are built from neuraloperator's")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", list(OP.variants) + ["neuraloperator"])
def test_tucker_layer(perf, case, dtype, variant, mode):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    grad = mode == "fwdbwd"
    problem, (x, _, _) = OP.make_inputs(case, dev, dtype, requires_grad=grad)
    if problem.out_grid != problem.grid or dtype != torch.float32:
        pytest.skip("the peer runs float32 without resampling")
    if variant != "neuraloperator":
        perf.skip_unless_timed(OP, variant, problem)
    modes = list(problem.modes)
    torch.manual_seed(0)
    theirs = _NeuralopConv(problem.cin, problem.cout, modes[:-1] + [2 * (modes[-1] - 1)], bias=True,
                           factorization="tucker", rank=TUCKER_RANK).to(dev)
    ours = SpectralConv.from_neuraloperator(theirs)

    def with_variant(v):
        def fwd(x):
            with use_backend("torch") if v == "torch" else use_backend("triton", spectral_conv=v):
                return ours(x)
        return fwd

    fwd = theirs if variant == "neuraloperator" else with_variant(variant)
    params = [x] + list((theirs if variant == "neuraloperator" else ours).parameters())
    g = torch.randn((problem.batch, problem.cout) + problem.out_grid, device=dev, dtype=dtype)
    tucker = dataclasses.replace(case, name=f"{case.name}-tucker{TUCKER_RANK}",
                                 params={**case.params, "factorization": "tucker", "rank": TUCKER_RANK})
    anchor = perf.anchor(OP, variant, problem, (x,), [x] + list(ours.parameters()), g, grad,
                         torch_fwd=with_variant("torch"))
    perf.run(OP, tucker, variant, mode, problem, perf.step(fwd, (x,), params, g, grad), anchor=anchor)
