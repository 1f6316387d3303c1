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


@pytest.fixture
def big_writes(monkeypatch):
    """``with big_writes(nbytes) as ops:`` lists the torch ops run inside that write ``nbytes`` or more into
    tensors other than their inputs (allocations aside): the passes over large tensors a call makes besides
    its Triton kernels, whose interpreted runs are hidden (the interpreter copies their arguments with
    torch ops). Needs the interpreter."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from opforge.kernels._triton import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    import triton.runtime.interpreter as interp

    run = interp.GridExecutor.__call__  # one launch, its argument copies included (Triton 3.2 to 3.9)

    def quiet_run(self, *args, **kwargs):
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    monkeypatch.setattr(interp.GridExecutor, "__call__", quiet_run)
    allocations = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}

    class Log(TorchDispatchMode):
        def __init__(self, nbytes):
            super().__init__()
            self.nbytes, self.ops = nbytes, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            outs = out if isinstance(out, (tuple, list)) else [out]
            written = sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor)
                          and o.untyped_storage().data_ptr() not in inputs)  # views of an input write nothing
            name = func._schema.name.split("::")[1]
            if written >= self.nbytes and name not in allocations:
                self.ops.append(name)
            return out

    @contextlib.contextmanager
    def watch(nbytes: int):
        log = Log(nbytes)
        with log:
            yield log.ops

    return watch
