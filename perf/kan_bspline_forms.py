"""Which B-spline form the KAN torch variant should take: the full Cox-de Boor recursion over all knot
intervals against the local de Boor form, bases and derivatives together, timed interleaved.

    python perf/kan_bspline_forms.py [--graph | --even] [--values 2048,16384,100000] [--grids 5:3,8:3,12:3,5:1]
                                     [--device cpu]
    python perf/kan_bspline_forms.py --layers 256:256,1024:256,100:1000 [--even] [--grids 5:3] [--device cpu]
    python perf/kan_bspline_forms.py --cardinal [--layers ...] [--values ...] [--grids ...]

--graph records the autograd graph (x requires grad, the sum of both outputs is backpropagated), as on the
create_graph path and ``KANLinear.b_splines``; without it, the forms run as inside the op's autograd
Function (no graph). --even lets the local form locate x by arithmetic on the evenly spaced knots (no
search; order >= 2, no graph), as the layers' own knots are until update_grid; without it, by search.
--cardinal times the cardinal form (every basis as M_p((x - t_0) / h - m) over [n, I, NB], evenly spaced
knots, no graph) against that local form instead of the full one: the columns read cardinal/local.
Each row: n * I values (I = 8 below 20000 values, else 32), bases and derivatives (--value-only: bases
alone), on a uniform grid of G intervals and spline order p on [-1, 1], x uniform on [-1.1, 1.1]; "ratio"
is (NK - 1) / (p + 1), the full form's arithmetic over the local form's; full/local is the median over 9
interleaved rounds of each form's mean time per call. ``_bspline_both``'s thresholds (kernels/kan.py)
come from this table.

--layers B:I,... times whole layers instead: KANLinear(I, I) on x [B, I], forward (no grad) and forward +
backward, with every B-spline evaluation of the call forced to each form. What the layer meets (its other
large buffers, the bases of a forward and then bases and derivatives in the backward) can differ from the
forms alone: large inputs are decided by this table.
"""
from __future__ import annotations

import argparse
import time

import torch

from opforge.kernels.kan import _bspline_both


def _grid(I, G, p, device):
    t = torch.arange(-p, G + p + 1, dtype=torch.float32, device=device) * (2.0 / G) - 1.0
    return t.expand(I, -1).contiguous()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="store_true", help="record the autograd graph and backpropagate")
    ap.add_argument("--values", default="2048,16384,100000", help="n * I values per row, comma separated")
    ap.add_argument("--grids", default="5:3,8:3,12:3,5:1", help="G:order pairs, comma separated")
    ap.add_argument("--layers", default="", help="B:I pairs: time KANLinear(I, I) layers on x [B, I] instead")
    ap.add_argument("--even", action="store_true", help="the local form's even-knots path (no search)")
    ap.add_argument("--value-only", action="store_true", help="the bases alone, no derivatives (a forward)")
    ap.add_argument("--cardinal", action="store_true",
                    help="the cardinal form against the local form on evenly spaced knots (implies --even)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.cardinal:
        a.even, a.graph = True, False
    other = "cardinal" if a.cardinal else "full"
    if a.layers:
        return _layers(a)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(x, g, p, full):
        v, d = _bspline_both(x, g, p, value=True, derivative=not a.value_only, **_form(a, full))
        if a.graph:
            (v.sum() + (0 if d is None else d.sum())).backward()

    torch.manual_seed(0)
    print(f"{'values':>8} {'G':>3} {'p':>2} {'ratio':>5} {other + '/local':>14} {'local us':>9}  "
          f"({'graph' if a.graph else 'no graph'}, {'even knots' if a.even else 'search'}, {dev})")
    for vals in (int(v) for v in a.values.split(",")):
        for G, p in (tuple(int(s) for s in gp.split(":")) for gp in a.grids.split(",")):
            I = 8 if vals < 20000 else 32
            g = _grid(I, G, p, dev)
            x = (torch.rand(max(1, vals // I), I, device=dev) * 2.2 - 1.1).requires_grad_(a.graph)
            reps = max(3, min(200, int(2e6 // (vals * g.shape[1]))))

            def step(full):
                for _ in range(reps):
                    run(x, g, p, full)
                sync()

            for full in (True, False, True, False):
                step(full)
            med = {k: v / reps for k, v in _interleaved(step, rounds=9, warm=False).items()}
            ratio = (g.shape[1] - 1) / (p + 1)
            print(f"{vals:8d} {G:3d} {p:2d} {ratio:5.2f} {med[True] / med[False]:14.2f} {med[False] * 1e6:9.0f}")


def _form(a, first: bool) -> dict:
    """``_bspline_both``'s form arguments: the compared form (full, or with --cardinal the cardinal one) when
    ``first``, else the local form."""
    if a.cardinal:
        return {"full": False, "even": True, "cardinal": first}
    return {"full": first, "even": a.even, "cardinal": False}


def _interleaved(step, forms=(True, False), rounds=15, warm=True):
    """The median time of one ``step(form)`` per form, the forms alternating in order round by round; with
    ``warm``, each timed step after an untimed one of the same form (what the other form left in the
    allocator is not timed)."""
    times = {f: [] for f in forms}
    for r in range(rounds):
        for f in (forms if r % 2 else forms[::-1]):
            if warm:
                step(f)
            t0 = time.perf_counter()
            step(f)
            times[f].append(time.perf_counter() - t0)
    return {f: sorted(v)[len(v) // 2] for f, v in times.items()}


def _layers(a):
    from opforge.kernels import KANLinear, kan

    both = kan._bspline_both
    torch.manual_seed(0)
    other = "cardinal" if a.cardinal else "full"
    print(f"{'B':>6} {'I':>5} {'G':>3} {'p':>2} {'mode':>7} {other + '/local':>14} {'local ms':>9}  "
          f"({'even knots' if a.even else 'search'}, {a.device})")
    for B, I in (tuple(int(s) for s in bi.split(":")) for bi in a.layers.split(",")):
        for G, p in (tuple(int(s) for s in gp.split(":")) for gp in a.grids.split(",")):
            layer = KANLinear(I, I, grid_size=G, spline_order=p).to(a.device)
            x = (torch.rand(B, I, device=a.device) * 2.2 - 1.1).requires_grad_()
            for mode in ("fwd", "fwdbwd"):
                def step(full):
                    kan._bspline_both = lambda *args, **kw: both(*args, **{**kw, **_form(a, full),
                                                                         "even": kw.get("even") and a.even})
                    try:
                        if mode == "fwd":
                            with torch.no_grad():
                                layer(x)
                        else:
                            layer(x).sum().backward()
                        if x.is_cuda:
                            torch.cuda.synchronize()
                    finally:
                        kan._bspline_both = both

                med = _interleaved(step)
                print(f"{B:6d} {I:5d} {G:3d} {p:2d} {mode:>7} {med[True] / med[False]:14.2f} "
                      f"{med[False] * 1e3:9.2f}", flush=True)


if __name__ == "__main__":
    main()
