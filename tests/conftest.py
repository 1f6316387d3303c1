"""Test set-up: the Triton interpreter is switched on before opforge's kernels are imported,
so every Triton variant runs on CPU tensors; the user autotune cache points at a temp folder."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["OPFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="opforge-test-cache-")
os.environ.pop("OPFORGE_BACKEND", None)
os.environ.pop("OPFORGE_AUTOTUNE", None)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # a broken interpreter would fail every Triton test with the same error: say it once, with the fix
    from opforge.kernels._triton import interpreter_problem

    problem = interpreter_problem()
    if problem:
        pytest.exit(problem, returncode=4)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
    elif os.environ["TRITON_INTERPRET"] not in ("", "0"):
        # Triton reads TRITON_INTERPRET when a kernel is defined: GPU tests need a separate run.
        skip = pytest.mark.skip(reason="GPU tests need compiled kernels: run them with TRITON_INTERPRET=0 -m gpu")
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
