"""The op registry and dispatch.

An :class:`Op` has one ``torch`` variant (runs anywhere; the CPU path and the
baseline) and any number of Triton variants, each with a grid of configs, a
heuristic default config and an optional ``supports(problem)`` predicate.

Dispatch of a call (``Op.__call__``):

1. the backend in force: :func:`use_backend` context > ``OPFORGE_BACKEND`` env >
   ``"auto"``; a per-op variant pin from :func:`use_backend` wins over both;
2. CPU tensors go to ``torch`` unless a Triton backend is asked for and the
   Triton interpreter is on (``TRITON_INTERPRET=1``);
3. CUDA tensors: the autotune cache entry for (GPU, op, shape key, dtype) --
   for a call that will be differentiated (a tensor argument requires grad
   under grad mode) the entry tuned on forward + backward, else the forward
   one -- then on a miss tuning on the spot when ``OPFORGE_AUTOTUNE=1``, else
   the first supporting Triton variant with its heuristic default config;
4. under torch.func transforms (vmap, grad, jacrev, jacfwd, hessian) and on
   forward-mode AD dual tensors, on any device, the op's ``plain``
   differentiable torch math: Triton kernels and custom autograd Functions do
   not compose with them.

An impossible or unknown choice raises a ``ValueError`` naming the valid ones.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import operator
import os
import re
import textwrap
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _fwad

from ._triton import HAS_TRITON, TRITON_MISSING, dot_precision, interpreter_enabled, triton_can_run

BACKENDS = ("auto", "torch", "triton")
REF_BATCH = 2  # batch entries a reference checks when an op declares no ref_subset


def pow2(n: int) -> int:
    """Next power of two (1 for n <= 1): the bucketing of shape keys."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def number(v, name: str) -> float:
    """A numeric argument as a Python float: anything ``float()`` takes (int, float, a NumPy or one-element
    tensor scalar) except text, which ``float("1")`` would parse, and booleans (``True`` is 1.0): either
    there is a misplaced argument."""
    try:
        if (isinstance(v, (str, bytes)) or type(v).__name__ in ("bool", "bool_")
                or (isinstance(v, torch.Tensor) and v.dtype == torch.bool)):
            raise TypeError
        return float(v)
    except (TypeError, ValueError, RuntimeError):  # (RuntimeError: a tensor of many values, or a meta one)
        raise TypeError(f"{name} must be a number, got {type(v).__name__}") from None


def as_int(v) -> int | None:
    """v as a Python int when it is an int of any integer kind (NumPy's too), never a boolean (``True`` is 1
    to Python), a float, text or a tensor; else None. (A NumPy array has ``__index__``, which only its
    one-element integer arrays pass.)"""
    if isinstance(v, (bool, str, bytes, torch.Tensor)) or type(v).__name__ == "bool_":
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def int_tuple(v, one: bool = False) -> tuple | None:
    """``v`` as a tuple of Python ints: a sequence of ints of any integer kind (NumPy's too), or with ``one``
    a single int as a 1-tuple; never booleans, floats, text or tensors. None if it is not one, for the
    caller's error naming the argument."""
    if one and (i := as_int(v)) is not None:
        return (i,)
    if isinstance(v, (str, bytes, torch.Tensor)) or not hasattr(v, "__iter__"):
        return None
    try:
        out = tuple(as_int(m) for m in v)
    except TypeError:  # (an object whose __iter__ refuses, as a 0-d NumPy array's does)
        return None
    return None if None in out else out


def an_int(v, name: str, minimum: int) -> int:
    """A count argument (an order, a degree, an iteration limit) as a Python int >= ``minimum``: an int of any
    integer kind, never a boolean; else a ValueError naming it."""
    i = as_int(v)
    if i is None or i < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return i


def positive_ints(**sizes) -> tuple:
    """A module's sizes (``in_features=4, ...``) as Python ints, in order: each a positive int of any integer
    kind, never a boolean; else a ValueError naming it."""
    out = []
    for name, v in sizes.items():
        i = as_int(v)
        if i is None or i < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
        out.append(i)
    return tuple(out)


def wants_grad(args: tuple) -> bool:
    """Will this call be differentiated? (grad mode on and a tensor argument requires grad)"""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


class ProblemBase:
    """What every op's frozen Problem dataclass shares: ``dtype``/``device`` fields, a ``key`` and this."""

    #: Do the op's float32 dot products follow torch's TF32 setting (``_triton.dot_precision``)? An op
    #: whose accuracy hinges on exact float32 products sets False and keeps 3xTF32.
    follows_tf32 = True

    @property
    def precision(self) -> str:
        """``input_precision`` of the op's Triton dot products for this call."""
        return dot_precision(self.dtype, self.follows_tf32)

    @property
    def dtype_name(self) -> str:
        """The dtype's name, ``float32-tf32`` for float32 computed with TF32 dots (cache keys, tolerances,
        perf records: such calls are tuned, checked and timed apart)."""
        name = str(self.dtype).replace("torch.", "")
        return name + "-tf32" if self.dtype == torch.float32 and self.precision == "tf32" else name


_SHAPES_ONLY: contextvars.ContextVar = contextvars.ContextVar("opforge_shapes_only", default=False)


def shapes_only() -> bool:
    """Is a custom op's fake implementation running (``_graph_op``)? Value checks are skipped there: fake
    tensors hold no values, and the real implementation checks them when the graph runs."""
    return _SHAPES_ONLY.get()


_CHECKED: dict = {}  # (id(tensor), check, args) -> (weakref to it, its state when checked, result, CPU values or None)


def eager_under_compile(fn: Callable) -> Callable:
    """``fn`` run eagerly at a graph break when torch.compile traces a call to it, instead of being traced:
    ``torch.compiler.disable`` applied at trace time, so that importing opforge does not import
    torch._dynamo (a second or more)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _capturing(t: torch.Tensor) -> bool:
    """Is a CUDA graph being captured on the current stream, t being a GPU tensor (its values unreadable)?"""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


_SNAPSHOT_MAX = 1 << 16  # elements of a CPU tensor whose checked values checked_once keeps to compare


@eager_under_compile  # under torch.compile too: a value check is a host read, not graph material
def checked_once(t: torch.Tensor, check: Callable, *args):
    """``check(t, *args)`` -- a validation that reads t's values, so a host sync on a GPU -- run once per
    version of ``t`` and its result remembered.

    A tensor is seen again as unchanged while it is the same object with the same ``_version`` (bumped by
    every in-place write: optimizer steps, ``copy_``, ``load_state_dict``) and the same storage (``.data =``
    swaps it without a bump), so a module's buffers and parameters are not re-read every forward pass.
    Writes through ``.data`` (``t.data.copy_(...)``, whose version counter is its own) or a NumPy view are
    invisible to both: a CPU tensor (these are small: knots, centres, scales) is therefore also compared
    with a copy of the values checked (``torch.equal``, microseconds, no sync on a CPU); a GPU tensor is not
    (that would read it back every call), so on a GPU such writes go unseen until the next versioned one.
    Inference tensors track no version: they are checked every call. So is a tensor seen through torch.func
    transforms (a vmap over stacked parameters), lane by lane (``lanes``); the lanes' common result is
    returned, None if they differ.
    While a CUDA graph is being captured (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.graph``) a
    GPU tensor's values cannot be read (a sync is an error there): the remembered result is used if this
    version was checked before, else nothing is checked and None (unknown) is returned. Such a graph replays
    whatever values its inputs hold later, so a check at capture would not cover them either; the same call
    run eagerly checks them.
    """
    if shapes_only() or t.is_meta:  # a custom op's fake implementation, meta tensors: no values (None: unknown)
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        results = [check(lane, *args) for lane in lanes(t)]
        return results[0] if all(r == results[0] for r in results) else None
    try:
        state = (t._version, t.data_ptr())
    except RuntimeError:  # inference tensors do not track a version counter
        return None if _capturing(t) else check(t, *args)
    key = (id(t), check, args)
    seen = _CHECKED.get(key)
    if (seen is not None and seen[0]() is t and seen[1] == state
            and (seen[3] is None or torch.equal(t.detach(), seen[3]))):
        return seen[2]
    if _capturing(t):
        return None
    result = check(t, *args)
    snapshot = t.detach().clone() if t.device.type == "cpu" and t.numel() <= _SNAPSHOT_MAX else None
    # the entry (and its snapshot) goes when the tensor does (no sweep over the entries, which a callback run
    # by the garbage collector in the middle of it would change under it)
    _CHECKED[key] = (weakref.ref(t, lambda _, key=key: _CHECKED.pop(key, None)), state, result, snapshot)
    return result


def kept_tensor(cache: dict, key, make: Callable[[], torch.Tensor], limit: int = 1024) -> torch.Tensor:
    """``cache[key]``, made by ``make()`` on a miss: a small constant tensor that launchers reuse call after call
    instead of making it (a torch op each, a launch on a GPU). Made outside inference mode, so a later
    differentiated call may save it; not kept when fake or meta (tracing), made during CUDA graph capture
    (the graph's memory pool), or past ``limit`` entries."""
    t = cache.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = make()
        if (type(t) is torch.Tensor and not t.is_meta and len(cache) < limit
                and not (t.is_cuda and torch.cuda.is_current_stream_capturing())):
            cache[key] = t
    return t


def transforms_active() -> bool:
    """Is a torch.func transform (vmap, grad, jacrev, jacfwd, jvp, hessian) in force? Ops then run their
    ``plain`` math: custom autograd Functions and Triton kernels do not compose with them."""
    return torch._C._are_functorch_transforms_active()


def dual_inputs(args: tuple) -> bool:
    """Does a tensor argument carry a forward-mode tangent (``torch.autograd.forward_ad`` dual tensors)?
    Custom autograd Functions without a ``jvp`` cannot take them: such calls run the plain math too."""
    return _fwad._current_level >= 0 and any(
        isinstance(a, torch.Tensor) and _fwad.unpack_dual(a).tangent is not None for a in args)


_AUTOCAST_DEVICES = ("cpu", "cuda")  # where opforge's ops run


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on ``device``'s type, None where it is off."""
    kind = device.type
    if kind not in _AUTOCAST_DEVICES:  # autocast raises for other device types (meta)
        return None
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def no_autocast(device: torch.device):
    """``torch.autocast`` off for ``device``'s type (a no-op where it is off): an op's variants run in the op's
    own precision policy (16-bit inputs read, float32 accumulation), which autocast would otherwise change
    under them by casting their torch matmuls to 16 bits, and differently per variant."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without its dispatch when t has that dtype already (t itself either way): a no-op
    ``.to`` costs 1.5 us, which the hot paths of small calls pay several times."""
    return t if t.dtype == dtype else t.to(dtype)


def amp_cast(t, dtype: torch.dtype):
    """``t`` cast to ``dtype`` as autocast casts an argument: floating tensors other than float64 only."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.dtype != dtype:
        return t.to(dtype)
    return t


def variant_backward(backward: Callable) -> Callable:
    """An autograd Function's ``backward`` as the variants need it: with autocast off for its gradients'
    device (a backward pass started inside an autocast region, which autograd carries into it, would have
    its torch matmuls cast to 16 bits and meet float32 operands) and with lazy views among the incoming
    gradients resolved (``resolved``: the kernels read raw memory)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        dev = next((g.device for g in grads if isinstance(g, torch.Tensor)), None)
        with contextlib.nullcontext() if dev is None else no_autocast(dev):
            return backward(ctx, *resolved(grads))

    return wrapper


def resolved(args: tuple) -> tuple:
    """``args`` with lazy negative and conjugate views materialised (``x.conj().imag`` is a real tensor whose
    negative bit flips its sign on read): torch resolves the bits when an op reads a tensor, a Triton kernel
    reads the raw memory and would take such a tensor with its sign or imaginary part flipped. A no-op (no
    copy) for the usual tensors; differentiable."""
    if not any(isinstance(a, torch.Tensor) and (a.is_neg() or a.is_conj()) for a in args):
        return args
    return tuple(a.resolve_conj().resolve_neg() if isinstance(a, torch.Tensor) else a for a in args)


def lanes(t: torch.Tensor) -> torch.Tensor:
    """The values behind a tensor seen through torch.func transforms, as [lanes, *t.shape]: grad-tracking
    wrappers unwrapped, each vmap level's batch dimension moved to the front and all of them flattened
    (one lane for a tensor no vmap batches). What a value check must read: every lane, not the wrapper."""
    fn, shape = torch._C._functorch, tuple(t.shape)
    while fn.is_functorch_wrapped_tensor(t):
        if fn.is_batchedtensor(t):
            t, bdim = fn._unwrap_batched(t, fn.maybe_get_level(t))
            t = t.unsqueeze(0) if bdim is None else t.movedim(bdim, 0)
        else:
            t = fn.get_unwrapped(t)
    return t.reshape((-1,) + shape)


def graph_grads(recompute: Callable, inputs: tuple, needs, grad_out: torch.Tensor) -> tuple:
    """The gradients of ``recompute(*inputs)`` (paired with ``grad_out``) for the inputs marked in ``needs``,
    None for the others, as tensors with a graph: what a Triton variant's backward returns when it is run
    with ``create_graph=True`` (second derivatives, physics-informed losses on du/dx). Its kernels are
    not differentiable, so the op is recomputed with the torch variant's differentiable math on the
    saved inputs, which are the caller's tensors, so the graph reaches their history."""
    want = [t for t, n in zip(inputs, needs) if n]
    if not want:  # only an input handled by the caller (a bias) needs a gradient
        return (None,) * len(inputs)
    with torch.enable_grad():
        out = recompute(*inputs)
        got = iter(torch.autograd.grad(out, want, grad_out, create_graph=True, allow_unused=True))
    res = []
    for t, n in zip(inputs, needs):
        g = next(got) if n else None
        res.append(torch.zeros_like(t) if n and g is None else g)
    return tuple(res)


def on_device(device: torch.device):
    """Make ``device`` the current CUDA device for the call (Triton launches on the current device, so a
    tensor on cuda:1 under current device 0 would otherwise be handed to a kernel running on GPU 0);
    a no-op off CUDA or when it is current already. Autograd runs backward with the device set."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("opforge_backend", default=None)


@dataclass
class Variant:
    """One implementation of an op.

    ``run(problem, *args, config=dict|None)`` computes the op; ``configs(problem)``
    returns the autotune grid (fresh list of dicts, already pruned for the
    problem); ``default_config(problem)`` the heuristic pick on a cache miss;
    ``supports(problem)`` returns ``None`` when the variant can run, else the
    reason it cannot. ``sources`` are the functions/kernels whose source code
    scopes this variant's cache entries. ``train_keys`` are the config keys
    only its backward reads (a forward-only tuning times one config of those
    that differ in them alone).
    """

    name: str
    kind: str  # "torch" or "triton"
    run: Callable[..., Any]
    configs: Callable[[Any], list] | None = None
    default_config: Callable[[Any], dict] | None = None
    supports: Callable[[Any], str | None] | None = None
    sources: tuple = ()
    train_keys: tuple = ()

    def tuning_configs(self, problem, train: bool = True) -> list[dict]:
        """The configs ``opforge tune`` times: the heuristic default first (what a cache miss runs, so a
        tuned winner has always been compared with it, in or out of the grid), then the rest of the grid.
        ``train=False`` (tuning inference calls): configs that differ only in ``train_keys`` run the same
        forward, so the first of each such group stands for it (the default's backward keys where it is one
        of them; a training call without an entry of its own falls back to that forward entry, config and
        all). A GPU's time is scarce: at the main KAN cases ``fused``'s 19 or 20 configs hold 6 such pairs."""
        grid = list(self.configs(problem)) if self.configs else []
        if self.default_config is not None:
            default = self.default_config(problem)
            grid = [default] + [c for c in grid if c != default]
        if train or not self.train_keys:
            return grid
        seen, out = set(), []
        for c in grid:
            fwd = tuple(sorted((k, v) for k, v in c.items() if k not in self.train_keys))
            if fwd not in seen:
                seen.add(fwd)
                out.append(c)
        return out

    def why_not(self, problem) -> str | None:
        if self.kind == "triton" and not triton_can_run(problem.device):
            return (f"Triton variants need CUDA tensors or TRITON_INTERPRET=1 with CPU tensors "
                    f"(got {problem.device.type} tensors, interpreter "
                    f"{'on' if interpreter_enabled() else 'off'})")
        return self.supports(problem) if self.supports else None


@dataclass
class Case:
    """A named problem size for tuning, benchmarking and perf checks."""

    name: str
    params: dict
    tags: tuple = ()  # e.g. ("gpu",) realistic; ("small",) CPU/interpreter sized


@dataclass
class Target:
    """A number an issue asks of an op, checked by ``opforge perf-table`` against each results file.

    ``what``: ``"speedup"`` (the op's fastest Triton variant vs the first of ``versus`` in the run, at
    least ``bound``), ``"frac_peak"`` (of the GPU's bandwidth or FLOP/s, at least ``bound``),
    ``"peak_memory"`` (forward+backward peak allocation over ``versus``'s, at most ``bound``) or
    ``"activation_memory"`` (inputs plus what the forward keeps for its backward, over ``versus``'s, at most
    ``bound``; ``inputs_mb(case params, element size)`` gives the inputs' MB).
    """

    case: str
    mode: str
    what: str
    bound: float
    versus: tuple = ()
    inputs_mb: Callable[[dict, int], float] | None = None

    WHATS = ("speedup", "frac_peak", "peak_memory", "activation_memory")

    def __post_init__(self):
        if self.what not in self.WHATS:
            raise ValueError(f"Target.what={self.what!r}; valid: {list(self.WHATS)}")
        if self.what != "frac_peak" and not self.versus:
            raise ValueError(f"a {self.what!r} target needs `versus` (the variant names compared against)")
        if self.what == "activation_memory" and self.inputs_mb is None:
            raise ValueError("an 'activation_memory' target needs `inputs_mb`")


@dataclass
class Op:
    """A registered operation; see the module docstring for dispatch."""

    name: str
    doc: str
    variants: dict = field(default_factory=dict)
    # make_inputs(case, device, dtype, requires_grad) -> (problem, args)
    make_inputs: Callable[..., Any] | None = None
    # reference(args as numpy float64) -> numpy output, and its gradients
    reference: Callable[..., Any] | None = None
    cases: list = field(default_factory=list)
    # roofline(problem) -> {"bytes": floor bytes, "flops": useful flops}
    roofline: Callable[[Any], dict] | None = None
    # reduction(problem) -> terms summed into one output element (scales the tolerance)
    reduction: Callable[[Any], int] | None = None
    # ref_subset(args) -> (args for the reference, index of the output they give); default: 2 batch entries
    ref_subset: Callable[[tuple], tuple] | None = None
    # untimed_baseline(problem) -> why the torch variant is not timed on a GPU at this size (one call would
    # take seconds to minutes), or None; the tuner then screens configs against the Triton default and
    # `opforge bench` shows no torch time
    untimed_baseline: Callable[[Any], str | None] | None = None
    # the numbers the op's issue asks for on a GPU (Target), checked in the README's generated tables
    targets: list = field(default_factory=list)
    # plain(problem, *args) -> the op in differentiable torch math, no custom autograd.Function: what runs
    # under torch.func transforms (``transforms_active``); None when the torch variant is plain already
    plain: Callable[..., Any] | None = None
    _hash: str | None = None
    _broken: set = field(default_factory=set)  # (variant, key, dtype, config) that raised under "auto"

    def baseline_skip(self, problem) -> str | None:
        """Why the torch variant is not timed for ``problem`` (only ever on a GPU), or None."""
        if self.untimed_baseline is None or problem.device.type != "cuda":
            return None
        return self.untimed_baseline(problem)

    def add(self, variant: Variant) -> Variant:
        self.variants[variant.name] = variant
        self._hash = None
        return variant

    @property
    def torch_variant(self) -> Variant:
        return self.variants["torch"]

    def triton_variants(self) -> list[Variant]:
        return [v for v in self.variants.values() if v.kind == "triton"]

    def source_hash(self) -> str:
        """Hash of every variant's source and grid: an edit invalidates cached entries."""
        if self._hash is None:
            h = hashlib.sha256()
            for v in self.variants.values():
                h.update(v.name.encode())
                for src in v.sources:
                    h.update(_source_of(src).encode())
                if v.configs is not None:
                    h.update(_source_of(v.configs).encode())
            self._hash = h.hexdigest()[:16]
        return self._hash

    def variant(self, name: str) -> Variant:
        """The variant called ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
        if name not in self.variants:
            raise ValueError(f"unknown variant {name!r} for op {self.name!r}; valid: {sorted(self.variants)}"
                             f"{_no_triton_note()}")
        return self.variants[name]

    # ---------------------------------------------------------------- dispatch
    def select(self, problem, args: tuple = ()) -> tuple[Variant, dict | None, str]:
        """Pick (variant, config, why) for a problem under the backend in force.

        ``args`` are the call's tensors: whether they require grad picks the forward + backward cache
        entry, and they are what is tuned on the spot (OPFORGE_AUTOTUNE=1).
        """
        backend, pins = current_backend()
        pinned = pins.get(self.name)
        if pinned is None and backend == "auto" and problem.device.type != "cuda":
            return self.torch_variant, None, "cpu"  # first: small CPU calls are bound by this overhead
        train = wants_grad(args)
        if pinned is not None:
            v = self.variant(pinned)
            reason = v.why_not(problem)
            if reason:
                raise ValueError(f"variant {pinned!r} of {self.name!r} cannot run here: {reason}")
            return v, self.config_for(v, problem, train=train), "pinned"
        if backend == "torch":
            return self.torch_variant, None, "backend=torch"
        candidates = [v for v in self.triton_variants() if v.why_not(problem) is None]
        if backend == "triton" and not candidates:
            reasons = {v.name: v.why_not(problem) for v in self.triton_variants()}
            raise ValueError(f"OPFORGE_BACKEND=triton but no Triton variant of {self.name!r} "
                             f"can run this call: {reasons}; valid backends: {list(BACKENDS)}"
                             f"{_no_triton_note()}")
        if not candidates:
            return self.torch_variant, None, TRITON_MISSING or "no triton variant supports the call"
        allowed = {v.name for v in candidates}
        if backend == "auto":
            allowed.add("torch")
        from opforge.autotune import cache as _cache  # lazy: keeps import light

        entry = _cache.lookup(self, problem, train=train)
        if entry is not None and entry["variant"] in allowed:
            return self.variants[entry["variant"]], entry.get("config"), "cache"
        timed = [t for t in (entry or {}).get("timings", []) if t["variant"] in allowed]
        if timed:  # the winner is not allowed here (torch under OPFORGE_BACKEND=triton): the fastest that is
            best = min(timed, key=lambda t: t["ms"])
            return self.variants[best["variant"]], best["config"], "cache"
        if problem.device.type == "cuda" and autotune_on():
            from opforge.autotune import tuner

            # (an unwritable user cache keeps the entry in this process: the user's call goes on)
            entry = tuner.tune_problem(self, problem, args, persist=True, train=train, unwritable="memory")
            if entry["variant"] in allowed:
                return self.variants[entry["variant"]], entry.get("config"), "tuned"
        v = candidates[0]
        return v, (v.default_config(problem) if v.default_config else None), "heuristic"

    def reference_slice(self, args: tuple) -> tuple:
        """(args for the NumPy reference, index of the output it checks): the op's ``ref_subset``,
        else the first ``REF_BATCH`` entries of the first argument (ops are batch-independent)."""
        if self.ref_subset is not None:
            return self.ref_subset(args)
        return (args[0][:REF_BATCH],) + tuple(args[1:]), slice(0, REF_BATCH)

    def run_variant(self, name: str, problem, *args, config: dict | None = None):
        """Run one named variant directly (tests, tuner, benchmarks)."""
        v = self.variant(name)
        reason = v.why_not(problem)
        if reason:
            raise ValueError(f"variant {name!r} of {self.name!r} cannot run here: {reason}")
        if config is None:
            config = self.config_for(v, problem, train=wants_grad(args))
        with on_device(problem.device), no_autocast(problem.device):
            return v.run(problem, *resolved(args), config=config)

    def config_for(self, v: Variant, problem, entry: dict | None = None, train: bool = False) -> dict | None:
        """The config to run variant ``v`` with: its fastest timed config in this GPU's autotune cache
        entry for the problem (the forward + backward entry first with ``train``), else its heuristic
        default (None for the torch variant)."""
        if v.kind == "triton":
            if entry is None:
                from opforge.autotune import cache as _cache

                entry = _cache.lookup(self, problem, train=train)
            timed = [t for t in (entry or {}).get("timings", []) if t["variant"] == v.name]
            if timed:
                return min(timed, key=lambda t: t["ms"])["config"]
        return v.default_config(problem) if v.default_config else None

    # Opaque to torch.compile: dispatch reads the backend context, env and autotune cache, which a traced
    # graph would bake in (a later use_backend would be ignored); the op runs eagerly at a graph break.
    @eager_under_compile
    def __call__(self, problem, *args):
        if transforms_active():
            return self.run_plain(problem, *args, why="under torch.func transforms (vmap, grad, jacrev, jacfwd, "
                                                      "hessian), with which Triton kernels do not compose")
        if dual_inputs(args):
            return self.run_plain(problem, *args, why="on forward-mode AD dual tensors (no jvp kernels)")
        if torch.jit.is_tracing():
            # the tracer records tensor operations only: a Triton launch would be missing from the traced graph
            # (its output left unwritten), and the torch variants' autograd Functions fail inside it
            return self.run_plain(problem, *args, why="under torch.jit.trace, which records torch operations "
                                                      "only (not Triton launches)")
        with on_device(problem.device), no_autocast(problem.device):
            return self._dispatch(problem, *args)

    def run_plain(self, problem, *args, why: str):
        """Run the op's ``plain`` differentiable torch math (the torch variant where it is plain already),
        whatever the device: for calls the other variants cannot serve, ``why``. A Triton backend or variant
        asked for explicitly cannot serve them either and raises, saying ``why``."""
        backend, pins = current_backend()
        pinned = pins.get(self.name)
        if (self.variants[pinned].kind if pinned is not None else backend) == "triton":
            asked = "backend 'triton'" if pinned is None else f"variant {pinned!r}"
            raise ValueError(f"{self.name}: {asked} cannot run {why}; use backend 'auto' or 'torch' there, "
                             f"which run the op's differentiable torch math")
        with on_device(problem.device), no_autocast(problem.device):
            return (self.plain or self.torch_variant.run)(problem, *args, config=None)

    def _dispatch(self, problem, *args):
        args = resolved(args)  # before the variants (and the tuner) read raw memory
        v, config, why = self.select(problem, args)
        if v.kind != "triton" or why == "pinned" or current_backend()[0] == "triton":
            return v.run(problem, *args, config=config)
        def key():  # formed only when needed: json.dumps costs microseconds a call
            return (v.name, problem.key, problem.dtype_name, json.dumps(config, sort_keys=True))

        if self._broken and key() in self._broken:
            return self.torch_variant.run(problem, *args, config=None)
        try:
            return v.run(problem, *args, config=config)
        except Exception as exc:  # e.g. a config that does not compile on this GPU: say so, stay correct
            self._broken.add(key())
            warnings.warn(f"opforge: {self.name} variant {v.name!r} with config {config} failed on this device "
                          f"({type(exc).__name__}: {exc}); using the torch variant for this shape from now on. "
                          f"Force it with use_backend('triton') to see the error.", RuntimeWarning, stacklevel=2)
            return self.torch_variant.run(problem, *args, config=None)


_OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    if op.name in _OPS:
        raise ValueError(f"op {op.name!r} is registered twice")
    _OPS[op.name] = op
    return op


def get_op(name: str) -> Op:
    """The registered :class:`Op` named ``name`` (its variants, cases, grids and references), e.g.
    ``get_op("kan").variants``; an unknown name raises ``ValueError`` listing the registered ones."""
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; registered: {sorted(_OPS)}")
    return _OPS[name]


def registered_ops() -> dict[str, list[str]]:
    """``{op name: [variant names]}`` for everything registered."""
    return {name: list(op.variants) for name, op in _OPS.items()}


def _no_triton_note() -> str:
    """What an error about missing Triton variants adds when Triton is not installed (or is too old)."""
    return "" if HAS_TRITON else f" ({TRITON_MISSING}, so only the torch variants exist: `pip install -U triton`)"


def _check_backend(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}={name!r} is not a backend; valid: {list(BACKENDS)}")
    return name


def current_backend() -> tuple[str, dict]:
    """The backend in force and the per-op variant pins."""
    override = _OVERRIDE.get()
    if override is not None:
        return override
    env = os.environ.get("OPFORGE_BACKEND", "auto").strip().lower() or "auto"
    return _check_backend(env, "OPFORGE_BACKEND"), {}


def autotune_on() -> bool:
    """``OPFORGE_AUTOTUNE``: "1" tunes a CUDA call with no cache entry on the spot; unset, empty or "0" does
    not; any other value ("true", "yes") is an error naming it, not silently off."""
    value = os.environ.get("OPFORGE_AUTOTUNE", "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"OPFORGE_AUTOTUNE={value!r} is not a setting; valid: '1' (tune on the spot) or '0'")
    return value == "1"


@contextlib.contextmanager
def use_backend(backend: str = "auto", **variants: str):
    """Force a backend (``"auto"``, ``"torch"``, ``"triton"``) and optionally pin
    variants per op, e.g. ``use_backend("triton", spectral_conv="dft_gemm")``.

    Unknown backends, ops or variants raise ``ValueError`` listing the valid names.
    """
    _check_backend(backend, "backend")
    for op_name, vname in variants.items():
        get_op(op_name).variant(vname)
    token = _OVERRIDE.set((backend, dict(variants)))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def _source_of(obj) -> str:
    src = getattr(obj, "src", None)  # triton.JITFunction keeps its source here
    if isinstance(src, str):
        return src
    fn = getattr(obj, "fn", obj)
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        return json.dumps(repr(obj))
    if fn is not obj:  # a Triton function under the interpreter: the source as JITFunction.src has it
        text = textwrap.dedent(text)
        start = re.search(r"^def\s+\w+\s*\(", text, re.MULTILINE)
        text = text[start.start():] if start else text
    return text
