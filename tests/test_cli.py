"""The command line: the main job runs and reports, and misuse says what to do."""
import os
import subprocess
import sys

from opforge.autotune.cli import main


def test_bench_torch_paths(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "spectral_conv" in out and "FAIL" not in out and "2d-small-odd" in out


def test_bench_interpret_checks_every_triton_variant():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "opforge.autotune.cli", "bench", "--interpret"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for v in ("dft_gemm", "fft_mix", "torch"):
        assert v in r.stdout
    assert "FAIL" not in r.stdout


def test_list_and_tune_without_gpu(capsys):
    assert main(["list"]) == 0
    assert "spectral_conv: torch" in capsys.readouterr().out
    import torch

    if not torch.cuda.is_available():
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        r = subprocess.run([sys.executable, "-m", "opforge.autotune.cli", "tune"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


def test_inspect_kernels_compiles_for_an_h100_without_one():
    """perf/inspect_kernels.py compiles (never runs) every launch of a variant for sm_90 and reports each."""
    import re
    from pathlib import Path

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    script = Path(__file__).resolve().parents[1] / "perf" / "inspect_kernels.py"
    r = subprocess.run([sys.executable, str(script), "kan", "rbf-small-odd", "fused", "--mode", "fwdbwd"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("  _kan_")]
    assert [ln.split()[0] for ln in lines] == ["_kan_fwd_kernel", "_kan_dx_kernel", "_kan_dw_kernel"], r.stdout
    assert all(re.search(r"\d+ regs", ln) and "mma" in ln for ln in lines), r.stdout
