"""How long the first call of each op takes (Triton compiling its kernels) against a warm call.

    python perf/first_call.py [--device cuda]

Each op runs its first GPU case's forward in a fresh process with an empty Triton cache
(TRITON_CACHE_DIR in a temp folder), then again in that process, then in a second fresh process
that finds the on-disk cache. Prints the three wall times per op. Where pykeops is installed, a
``keops`` row does the same for KeOps on the kernel-sum case (perf/keops_peer.py's formula, an empty
KEOPS_CACHE_FOLDER): the compile wait the issue holds against it, measured beside opforge's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time, torch
from opforge.kernels import get_op
op = get_op(sys.argv[1]); dev = sys.argv[2]
case = next(c for c in op.cases if ("gpu" if dev == "cuda" else "small") in c.tags)
problem, args = op.make_inputs(case, dev, torch.float32)
run = op
if len(sys.argv) > 3:  # KeOps on the same problem (kernel sums)
    sys.path.insert(0, sys.argv[3])
    import keops_peer
    def run(p, x, y, b):
        return keops_peer.kernel_matvec(x[0], y[0], b[0], p.kernel)
out = {}
for label in ("first", "again"):
    t0 = time.perf_counter()
    with torch.no_grad():
        run(problem, *args)
    if dev == "cuda":
        torch.cuda.synchronize()
    out[label] = time.perf_counter() - t0
out["case"] = case.name
out["variant"] = "keops" if run is not op else op.select(problem)[0].name
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ops", nargs="*", default=["spectral_conv", "kan", "kernel_sum"])
    args = ap.parse_args()
    print(f"{'op':14} {'case':24} {'variant':9} {'first s':>8} {'again s':>8} {'new process, disk cache s':>26}")
    rows = [(name, []) for name in args.ops]
    if "kernel_sum" in args.ops and importlib.util.find_spec("pykeops") is not None:
        rows.append(("kernel_sum", [str(Path(__file__).resolve().parent)]))
    for name, extra in rows:
        with tempfile.TemporaryDirectory() as cache_dir:
            env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, KEOPS_CACHE_FOLDER=cache_dir)
            runs = []
            for _ in range(2):
                done = subprocess.run([sys.executable, "-c", _CHILD, name, args.device, *extra], env=env,
                                      capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: {done.stderr.strip()[-400:]}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        a, b = runs
        print(f"{name:14} {a['case']:24} {a['variant']:9} {a['first']:8.2f} {a['again']:8.3f} {b['first']:26.2f}")


if __name__ == "__main__":
    main()
