"""The command line: the main job runs and reports, and misuse says what to do."""
import os
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("op, case, variant, kernels", [
    ("kan", "rbf-small-odd", "fused", ["_kan_fwd_kernel", "_kan_dx_kernel", "_kan_dw_kernel"]),
    ("kan", "chebyshev-small-odd", "fused", ["_kan_fwd_kernel", "_kan_dx_kernel", "_kan_dwk_kernel"]),
    ("kernel_sum", "small-d3-r1", "flash", ["_ksum_fwd_kernel", "_ksum_grad_kernel", "_ksum_grad_kernel",
                                            "_ksum_fwd_kernel"]),
])
def test_inspect_kernels_compiles_for_an_h100_without_one(op, case, variant, kernels):
    """perf/inspect_kernels.py compiles (never runs) every launch of a variant for sm_90 and reports each."""
    import re
    from pathlib import Path

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    script = Path(__file__).resolve().parents[1] / "perf" / "inspect_kernels.py"
    r = subprocess.run([sys.executable, str(script), op, case, variant, "--mode", "fwdbwd"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("  _")]
    assert [ln.split()[0] for ln in lines] == kernels, r.stdout
    assert all(re.search(r"\d+ regs", ln) and ("mma" in ln or "no MMA" in ln) for ln in lines), r.stdout
    assert all(re.search(r"loops \d+ ins \(\d+ MUFU\)", ln) for ln in lines), r.stdout


def test_sass_loop_counts():
    """Loops are backward branches; a loop's size counts every instruction from its target to the branch."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "perf" / "inspect_kernels.py"
    spec = importlib.util.spec_from_file_location("inspect_kernels_t", path)
    sass = "\n".join([
        "        Function : k",
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;       /* 0x00000a0000017a02 */",
        "        /*0010*/                   FADD R2, R2, R3 ;            /* 0x0000000302027221 */",
        "        /*0020*/                   MUFU.EX2 R4, R2 ;            /* 0x0000000200047308 */",
        "        /*0030*/                   FFMA R5, R4, R4, R5 ;        /* 0x0000000404057223 */",
        "        /*0040*/              @P0 BRA 0x20 ;                    /* 0xfffffffc00f80947 */",
        "        /*0050*/              @P1 BRA 0x10 ;                    /* 0xfffffff800e81947 */",
        "        /*0060*/                   BRA 0x60;                    /* 0xfffffffc00fc7947 */",
    ])
    import sys
    sys.path.insert(0, str(path.parent))  # inspect_kernels imports case_args beside it
    interp = os.environ.get("TRITON_INTERPRET")  # the script sets it to 0 on import: keep this process's
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
        if interp is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interp
    assert mod.sass_loops(sass) == [(3, 1), (5, 1)]
