"""float32 dot-product precision follows torch's float32 matmul setting (3xTF32 by default, TF32 when torch
allows it), is tuned and cached apart, fixed for a call's backward at its forward, and kernel sums keep
3xTF32 (their distances need exact products)."""
import contextlib
import importlib

import pytest
import torch

from opforge.autotune import cache
from opforge.kernels import get_op, use_backend
from opforge.kernels._triton import allow_tf32 as tf32_matmuls
from opforge.kernels._triton import dot_precision, tf32_allowed
from opforge.reference import tolerance

kan_mod = importlib.import_module("opforge.kernels.kan")
sc_mod = importlib.import_module("opforge.kernels.spectral_conv")  # the package exports a function of that name


class Spy:
    """Stands in for a Triton kernel: records the PREC of every launch, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.precs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.precs.append(kwargs["PREC"])
            return self.kernel[grid](*args, **kwargs)
        return launch


def _case(op, name):
    op = get_op(op)
    case = next(c for c in op.cases if c.name == name)
    return op, case


def test_default_is_3xtf32_and_the_setting_switches_float32_to_tf32():
    assert not tf32_allowed()
    assert dot_precision(torch.float32) == "tf32x3"
    assert dot_precision(torch.bfloat16) == "tf32"
    assert dot_precision(torch.float16) == "tf32x3"  # (TF32 is no finer than float16: dot_precision)
    op, case = _case("spectral_conv", "1d-small-odd")
    p, _ = op.make_inputs(case, "cpu", torch.float32)
    key = cache.entry_key(p)
    assert p.dtype_name == "float32" and p.precision == "tf32x3"
    with tf32_matmuls():
        assert tf32_allowed() and dot_precision(torch.float32) == "tf32"
        assert p.precision == "tf32" and p.dtype_name == "float32-tf32"
        assert cache.entry_key(p) != key  # tuned and cached apart from the 3xTF32 entry
        pb, _ = op.make_inputs(case, "cpu", torch.bfloat16)
        assert pb.dtype_name == "bfloat16"
        assert dot_precision(torch.float16) == "tf32x3"  # whatever the setting
    assert p.precision == "tf32x3"


def test_kernel_sums_keep_3xtf32_under_the_tf32_setting():
    op, case = _case("kernel_sum", next(c.name for c in get_op("kernel_sum").cases if "small" in c.tags))
    p, _ = op.make_inputs(case, "cpu", torch.float32)
    with tf32_matmuls():
        assert p.precision == "tf32x3" and p.dtype_name == "float32"


def test_tf32_tolerance_row():
    # looser than float32's, tighter than bfloat16's, and a fixed rounding level plus float32 accumulation
    for red in (1, 10_000):
        assert tolerance(torch.float32, red) < tolerance("float32-tf32", red) < tolerance(torch.bfloat16, red)
    with pytest.raises(ValueError, match="known"):
        tolerance("float32-tf31")


@pytest.mark.parametrize("setting", ["default", "tf32"])
def test_kernels_get_the_precision_and_backward_keeps_the_forwards(monkeypatch, setting):
    want = "tf32" if setting == "tf32" else "tf32x3"
    spies = {name: Spy(getattr(kan_mod, name)) for name in ("_kan_fwd_kernel", "_kan_dx_kernel", "_kan_dw_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(kan_mod, name, spy)
    op, case = _case("kan", next(c.name for c in get_op("kan").cases if "small" in c.tags and "rbf" in c.name))
    p, args = op.make_inputs(case, "cpu", torch.float32, requires_grad=True)
    with tf32_matmuls() if setting == "tf32" else contextlib.nullcontext():
        y = op.run_variant("fused", p, *args)
    y.sum().backward()  # after the block: the backward still uses the forward's precision
    assert all(s.precs == [want] for s in spies.values()), {n: s.precs for n, s in spies.items()}

    bmm = Spy(sc_mod._bmm_kernel)
    monkeypatch.setattr(sc_mod, "_bmm_kernel", bmm)
    op, case = _case("spectral_conv", "2d-small-odd")
    p, args = op.make_inputs(case, "cpu", torch.float32, requires_grad=True)
    with tf32_matmuls() if setting == "tf32" else contextlib.nullcontext():
        with use_backend("triton", spectral_conv="dft_gemm"):
            y = op(p, *args)
    y.sum().backward()
    assert bmm.precs and set(bmm.precs) == {want}


def test_tf32_calls_are_tuned_and_looked_up_apart(tmp_path):
    from opforge.autotune import tuner

    op, case = _case("spectral_conv", "1d-small-odd")
    p, args = op.make_inputs(case, "cpu", torch.float32)
    out = tmp_path / "tuned.json"
    device = {"name": "test", "cc": "0.0", "triton": "x", "tag": "test"}
    with tf32_matmuls():
        entry = tuner.tune_problem(op, p, args, persist=True, path=out, device=device)
        assert entry["timings"] and not entry["failures"]
    stored = cache.load(out)["ops"]["spectral_conv"][op.source_hash()]
    assert list(stored) == [f"{p.key}|float32-tf32"]
    # the entry serves calls under the TF32 setting only
    with tf32_matmuls():
        assert cache.entry_key(p) in stored
    assert cache.entry_key(p) not in stored


def test_split_tf32_host_split():
    """split_tf32: both parts exact in TF32 (13 low mantissa bits clear), their sum the value to 2^-22 of it
    (where the low part is a normal number: |t| >= 2^-100, as for Triton's own split), no rounding up to infinity, non-finite values kept whole (low part 0, a NaN stays NaN); the Triton pass
    (interpreter here) bit for bit the torch operations'."""
    from opforge.kernels._triton import split_tf32, split_tf32_torch

    g = torch.Generator().manual_seed(0)
    t = torch.randn(4099, generator=g) * torch.logspace(-35, 35, 4099)
    t[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4028234663852886e38, 0.0, -0.0])
    t[6] = torch.tensor(0x7F800001, dtype=torch.int32).view(torch.float32)  # a NaN whose payload is all low bits
    hi, lo = split_tf32(t)
    ref_hi, ref_lo = split_tf32_torch(t)
    assert torch.equal(hi.view(torch.int32), ref_hi.view(torch.int32))
    assert torch.equal(lo.view(torch.int32), ref_lo.view(torch.int32))
    assert ((hi.view(torch.int32) & 8191) == 0)[torch.isfinite(t)].all()
    assert ((lo.view(torch.int32) & 8191) == 0).all()
    fin = torch.isfinite(t) & (t.abs() >= 2.0 ** -100)
    err = ((hi.double() + lo.double() - t.double()).abs() / t.double().abs())[fin]
    assert err.max() <= 2.0 ** -22
    assert torch.isfinite(hi[3]) and hi[3] <= t[3]
    assert hi[0] == float("inf") and hi[1] == -float("inf") and torch.isnan(hi[2]) and torch.isnan(hi[6])
    assert (lo[:3] == 0).all() and lo[6] == 0
    with pytest.raises(TypeError, match="float32"):
        split_tf32(t.double())
