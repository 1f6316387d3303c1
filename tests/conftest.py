"""Test set-up: the Triton interpreter is switched on before opforge's kernels are imported,
so every Triton variant runs on CPU tensors; the user autotune cache points at a temp folder."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["OPFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="opforge-test-cache-")
atexit.register(shutil.rmtree, os.environ["OPFORGE_CACHE_DIR"], ignore_errors=True)
os.environ.pop("OPFORGE_BACKEND", None)
os.environ.pop("OPFORGE_AUTOTUNE", None)

import pytest  # noqa: E402
import torch  # noqa: E402


# Under pytest-xdist (`-n auto`, the README's test command) the workers share the cores: torch's threads
# are split between them rather than each worker taking them all.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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


@pytest.fixture
def bf16_round_to_nearest(monkeypatch):
    """The interpreter's float32 -> bfloat16 casts rounded to nearest even, as compiled kernels round them
    (``cvt.rn.bf16.f32``). Triton 3.6-3.9's interpreter truncates them (``InterpreterBuilder.cast_impl``), a
    bfloat16 result then off by up to a whole step where a GPU's is within half of one. NaN stays NaN."""
    import numpy as np

    interpreter = pytest.importorskip("triton.runtime.interpreter")
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    real = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            out = np.where(np.isnan(src.data), ((bits >> 16) | 0x40).astype(np.uint16), out)
            return interpreter.TensorHandle(out, dst_type.scalar)
        return real(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)


@pytest.fixture
def tf32_tensor_cores(monkeypatch):
    """The interpreter's float32 dot products as a GPU's tensor cores make them. Without this the interpreter
    multiplies in full float32 whatever the input precision, so a kernel that hands a TF32 product an operand
    not exact in TF32 (an unsplit 3xTF32 operand, say) passes here and errs by ~2^-11 on a GPU. With it,
    "tf32" reads only each operand's top 19 bits (the 13 low mantissa bits truncated, as the tensor cores
    read a float32 register) and "tf32x3" is Triton's split (high part rounded to nearest at 10 bits, low part
    the rest, three products of truncated operands, low x low dropped)."""
    import numpy as np

    interpreter = pytest.importorskip("triton.runtime.interpreter")
    ir = interpreter._ir
    builder = interpreter.InterpreterBuilder

    def trunc(a):
        return (a.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)

    def rna(a):
        return ((a.view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)

    real = builder.create_dot
    seen = []

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype == np.float32 and b.data.dtype == np.float32:
            seen.append(input_precision)
            if input_precision == ir.INPUT_PRECISION.TF32:
                out = np.matmul(trunc(a.data), trunc(b.data), dtype=np.float32)
                return interpreter.TensorHandle(out + d.data, d.dtype.scalar)
            if input_precision == ir.INPUT_PRECISION.TF32x3:
                with np.errstate(invalid="ignore", over="ignore"):
                    a_hi, b_hi = rna(a.data), rna(b.data)
                    a_lo, b_lo = a.data - a_hi, b.data - b_hi
                    small = (np.matmul(trunc(a_lo), b_hi, dtype=np.float32)
                             + np.matmul(a_hi, trunc(b_lo), dtype=np.float32))
                    out = np.where(np.isnan(small), 0, small) + np.matmul(a_hi, b_hi, dtype=np.float32)
                return interpreter.TensorHandle(out + d.data, d.dtype.scalar)
        return real(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    return seen
