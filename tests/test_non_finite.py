"""Non-finite inputs give non-finite results in the same places in every variant.

A NaN or an infinity in any input of any op (points, right-hand sides, fields, weights, biases) is put into
the small cases, and every Triton variant (interpreter) is checked against the torch variant, forward and
every gradient: the same entries are finite, and those agree within float32's tolerance. In bfloat16 and
float16 the public calls (modules, kernel_matvec) are checked alike, on x, for the places alone. Nothing that
torch reports as NaN or infinite comes back finite, and nothing finite turns NaN.

What is not compared is NaN against infinity: where the torch variant gives +-inf, a variant may give NaN.
Its products can take other routes to the same number: 3xTF32 forms a @ w as a_hi w_hi + a_hi w_lo +
a_lo w_hi, so an infinite a meets w's low part, which is 0 wherever w is a TF32 number (inf * 0 = NaN), and
an infinite a's own low part is inf - inf; complex products (spectral mode mixing) sum re * re - im * im,
and a sum of a Fourier transform's inf terms of both signs is NaN in one order and inf in another.
"""
from __future__ import annotations

import pytest
import torch

from opforge.kernels import (HAS_TRITON, ChebyKANLayer, FastKANLayer, FourierKANLayer, KANLinear, SpectralConv,
                             get_op, kernel_matvec, use_backend)

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (interpreter)"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # the interpreter's NumPy on inf and NaN

POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}


def _small(opname):
    op = get_op(opname)
    return [(opname, c) for c in op.cases if "small" in c.tags]


CASES = [(o, c, poison) for o, c in _small("kan") + _small("kernel_sum") + _small("spectral_conv")
         for poison in POISON if not (c.name == "3d-small-odd" and poison != "inf")]  # (20 s a call there)


def _poisoned(args, which: int, value: float, case):
    """``args`` detached and cloned, with ``value`` put into three entries of ``args[which]``: its first, its
    last and one in the middle (of a complex tensor's real and imaginary parts)."""
    out = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    t = out[which]
    flat = torch.view_as_real(t).view(-1) if t.is_complex() else t.view(-1)
    n = flat.numel()
    for i in {0, n // 2, n - 1}:
        flat[i] = value
    if case.params.get("same"):  # K(X, X): y is x
        out[1] = out[0]
    return out


def _run(op, variant, p, args):
    ins = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    if args[1] is args[0]:  # K(X, X): one leaf for both
        ins[1] = ins[0]
    out = op.run_variant(variant, p, *ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out.dtype)
    leaves = []
    for t in ins:
        if isinstance(t, torch.Tensor) and all(t is not s for s in leaves):
            leaves.append(t)
    return [out, *torch.autograd.grad(out, leaves, grad_outputs=g, allow_unused=True)]


def _compare(got, want, what):
    if want is None:
        assert got is None, what
        return
    got, want = got.detach(), want.detach()
    if got.is_complex():
        got, want = torch.view_as_real(got), torch.view_as_real(want)
    got, want = got.double(), want.double()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), (
        f"{what}: finite in {int(torch.isfinite(got).sum())} places against the torch variant's {int(fin.sum())}")
    scale = max(1.0, want[fin].abs().max().item()) if fin.any() else 1.0
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4 * scale, msg=what)


@pytest.mark.parametrize("opname,case,poison", CASES, ids=[f"{o}-{c.name}-{v}" for o, c, v in CASES])
def test_non_finite_inputs_are_non_finite_in_the_same_places(opname, case, poison):
    op = get_op(opname)
    p, args = op.make_inputs(case, "cpu", torch.float32, seed=5)
    args = list(args)
    which = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex())
             and not (i == 1 and case.params.get("same"))]  # K(X, X): y is x
    reached = 0  # (tanh(+-inf) = +-1: an infinite x is finite to Chebyshev bases, not to the others)
    for i in which:
        bad = _poisoned(args, i, POISON[poison], case)
        want = _run(op, "torch", p, bad)
        reached += not all(torch.isfinite(t).all() for t in want if t is not None)
        for variant in op.variants:
            if variant == "torch" or op.variant(variant).why_not(p):
                continue
            got = _run(op, variant, p, bad)
            for k, (a, b) in enumerate(zip(got, want)):
                _compare(a, b, f"{variant} {case.name}: {poison} in input {i}, result {k}")
    assert reached, "the poison reached no result"


def _public_call(name):
    """(op, module or function, input shape) of a public call, whose 16-bit paths (casts, TF32 or 3xTF32
    products, float32 accumulation) differ from the float32 ones above."""
    torch.manual_seed(7)
    if name == "kernel_matvec":
        y, b = torch.rand(11, 3), torch.randn(11, 2)
        return "kernel_sum", lambda x: kernel_matvec(x, y.to(x.dtype), b.to(x.dtype), "matern32",
                                                     lengthscale=0.4), (7, 3)
    if name == "SpectralConv":
        return "spectral_conv", SpectralConv(3, 4, n_modes=(6, 6)), (2, 3, 9, 8)
    layer = {"KANLinear": lambda: KANLinear(5, 3, grid_size=4), "FastKANLayer": lambda: FastKANLayer(5, 3, num_grids=6),
             "ChebyKANLayer": lambda: ChebyKANLayer(5, 3, 4), "FourierKANLayer": lambda: FourierKANLayer(5, 3, 3)}
    return "kan", layer[name](), (9, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["KANLinear", "FastKANLayer", "ChebyKANLayer", "FourierKANLayer", "SpectralConv",
                                  "kernel_matvec"])
def test_16_bit_non_finite_inputs_through_the_public_calls(name, dtype):
    """16-bit x with a NaN, a +inf and a -inf in it, through the modules and kernel_matvec as users call
    them: every Triton variant is non-finite in the same places as the torch variant, output, grad x and the
    parameters' gradients."""
    opname, f, shape = _public_call(name)
    if isinstance(f, torch.nn.Module):
        f = f.to(dtype)  # (a KANLinear keeps its knots in float32)
    x = (torch.rand(*shape, generator=torch.Generator().manual_seed(3)) * 3 - 1.5).to(dtype)
    flat = x.view(-1)
    flat[0], flat[flat.numel() // 2], flat[-1] = float("nan"), float("inf"), -float("inf")
    params = list(f.parameters()) if isinstance(f, torch.nn.Module) else []

    def run(**backend):
        xg = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        with use_backend(**backend):
            out = f(xg)
        out.backward(torch.ones_like(out))
        return [out, xg.grad] + [p.grad for p in params if p.requires_grad]

    want = run(backend="torch")
    assert not torch.isfinite(want[0].float()).all()
    for variant in get_op(opname).variants:
        if variant == "torch":
            continue
        got = run(backend="triton", **{opname: variant})
        for k, (a, w) in enumerate(zip(got, want)):
            a, w = (torch.view_as_real(t) if t.is_complex() else t for t in (a, w))
            assert torch.equal(torch.isfinite(a), torch.isfinite(w)), f"{name} {variant} {dtype}: result {k}"
