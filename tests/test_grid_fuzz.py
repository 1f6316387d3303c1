"""Every config `opforge tune` times on a GPU, checked here first: for each op's GPU cases, the whole
tuning grid of every Triton variant at that case's size, each config run through the interpreter on the
case shrunk to a few tiles (ragged ones included) and compared with the torch variant in float64, forward
and every gradient. A config that computes something wrong at some tile edge would otherwise be timed,
picked and shipped in a cache (the tuner's own screen only catches gross errors).

Slow (several minutes on 2 cores): ``python -m pytest -m slow tests/test_grid_fuzz.py``.

``OPFORGE_GRID_DTYPE=bfloat16`` (or ``float16``) runs the grids on 16-bit inputs, as ``opforge tune --dtype``
times them, and holds every result element to one 16-bit rounding of its float64 value on the same inputs
plus float32's tolerance of max |ref| (as tests/test_api_fuzz.py's 16-bit mode does; bfloat16 casts rounded
to nearest, as compiled: conftest's ``bf16_round_to_nearest``). A complex weight's gradient stays complex64
and keeps float32's bound.
"""
from __future__ import annotations

import os

import pytest
import torch

from opforge.autotune.tuner import _step
from opforge.kernels import get_op
from opforge.reference import rel_error, tolerance

pytestmark = pytest.mark.slow

OPS = ("spectral_conv", "kan", "kernel_sum")
# split counts the automatic choice only picks on a GPU (it needs the SM count): each config runs once more
# with its reduction split in two (kernel sums: column splits; KAN: grad-W batch splits)
SPLIT_KEY = {"kernel_sum": "SPLIT_M", "kan": "SPLITS"}
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
    os.environ.get("OPFORGE_GRID_DTYPE", "float32")]


def _shrink(op_name: str, params: dict) -> dict:
    """The case at interpreter size, keeping what picks kernels and configs (basis, K, order, D, R, kernel,
    mode counts, dimensionality) and leaving every size ragged against the tiles of the grid."""
    p = dict(params)
    if op_name == "kernel_sum":
        # 64-row tiles: one full and one ragged; 128: one ragged (K(X, X) cases, one tensor of points: 90 both)
        p.update(n=90 if p.get("same") else 70, m=90)
    elif op_name == "kan":
        p.update(batch=70, cin=37, cout=70)
    else:
        d = len(p["grid"])
        # the other axes keep at most 6 modes (4 in 3-D: the interpreter's mode mixing takes seconds per hundred
        # modes), the last axis all of them (its DFT tiles span 2 x modes columns: 66 at 33 modes, a ragged
        # second tile); every kept mode still fits, with a few points of zero fill beside them
        cap = 6 if d <= 2 else 4
        modes = tuple(min(m, cap) for m in p["modes"][:-1]) + (p["modes"][-1],)
        p["modes"] = modes
        grid = [min(n, m + 3) for n, m in zip(p["grid"][:-1], modes[:-1])] + [min(p["grid"][-1], 2 * modes[-1] + 1)]
        p.update(batch=min(p["batch"], 2), cin=5, cout=7, grid=tuple(grid))
    return p


def _cases():
    for name in OPS:
        op = get_op(name)
        for case in op.cases:
            if "gpu" in case.tags:
                yield pytest.param(name, case, id=f"{name}-{case.name}")


def _up(t):
    dt = torch.complex128 if t.is_complex() else torch.float64
    return t.detach().to(dt).requires_grad_(t.requires_grad)


def _excess16(a, e, bound: float) -> float:
    """How far past one 16-bit rounding of e (plus ``bound`` of max |e|) a 16-bit result a is, per element,
    normalised (> 0 fails); a complex result (a complex64 weight's gradient) against ``bound`` alone."""
    if e.is_complex():
        return rel_error(a, e) - bound
    a, e = a.detach().double(), e.detach().double()
    u = 2.0 ** -8 if DTYPE == torch.bfloat16 else 2.0 ** -11
    top = e.abs().max().clamp_min(1e-30)
    return float((((a - e).abs() - u * e.abs() - bound * top) / top).max()) if e.numel() else 0.0


@pytest.mark.parametrize("op_name,case", list(_cases()))
def test_every_tuned_config_matches_torch(op_name, case, request):
    from opforge.kernels._registry import Case

    if DTYPE == torch.bfloat16:
        request.getfixturevalue("bf16_round_to_nearest")
    op = get_op(op_name)
    p_full, _ = op.make_inputs(case, "cpu", DTYPE)  # the grids are those of the real size
    small = Case(case.name + "-shrunk", _shrink(op_name, case.params), case.tags)
    p, args = op.make_inputs(small, "cpu", DTYPE, requires_grad=True, seed=5)
    p64, args64 = op.make_inputs(small, "cpu", torch.float64, requires_grad=True, seed=5)
    ups = {}  # same values; one tensor passed twice (K(X, X): y is x) stays one tensor
    args64 = tuple(ups.setdefault(id(a), _up(a)) if isinstance(a, torch.Tensor) else b for a, b in zip(args, args64))
    with torch.no_grad():
        y64 = op.run_variant("torch", p64, *args64)  # the output's shape, for the cotangent
    g = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    g = g.to(DTYPE).double()  # (16-bit: the cotangent on the 16-bit grid, the same for every run)
    g32 = g.to(DTYPE)
    leaves, leaves64 = ([a for a in t if isinstance(a, torch.Tensor) and a.requires_grad] for t in (args, args64))
    out, grads = _step(op.torch_variant, p64, args64, leaves64, g, None)  # the tuner's own call
    want = [out, *grads]
    # the reduction behind each result: the output's, and for a gradient the larger of it and the number of
    # output elements (a gradient entry can sum over every output)
    red = op.reduction(p)
    bounds = [tolerance(torch.float32, red)] + [tolerance(torch.float32, max(red, y64.numel()))] * (len(want) - 1)
    checked = 0
    for v in op.triton_variants():
        if v.why_not(p_full) is not None:
            continue
        assert v.why_not(p) is None, f"{v.name} runs the full case but not the shrunk one: {v.why_not(p)}"
        cfgs = v.tuning_configs(p_full)  # the default config too, timed first by the tuner
        if op_name in SPLIT_KEY:
            cfgs = cfgs + [{**c, SPLIT_KEY[op_name]: 2} for c in cfgs]
        for cfg in cfgs:
            out, grads = _step(v, p, args, leaves, g32, dict(cfg))
            got = [out, *grads]
            for i, (a, e, bound) in enumerate(zip(got, want, bounds)):
                what = "output" if i == 0 else f"grad {i - 1}"
                if DTYPE != torch.float32:
                    over = _excess16(a, e, bound)
                    assert over <= 0, f"{v.name} {cfg} {DTYPE}: {what} past one rounding by {over:.2e} of max |ref|"
                    continue
                err = rel_error(a, e)
                assert err <= bound, f"{v.name} {cfg}: {what} error {err:.2e} > {bound:.2e}"
            checked += 1
    assert checked > 0, f"no Triton variant runs {case.name}"
