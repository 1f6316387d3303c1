"""opforge's public ops as ``torch.library`` custom ops, so that torch.compile and torch.export see one
graph node per call instead of a graph break.

A traced call (``torch.compile``, ``torch.export``) of ``spectral_conv``, ``kan_linear`` or
``kernel_matvec`` becomes ``torch.ops.opforge.<name>``: its implementation is the eager function itself,
so value checks, dispatch, the backend in force and the autotune cache are read when the graph runs,
not when it is traced; its fake implementation runs the eager function's shape checks and gives the
output's shape and dtype. Its backward is a second custom op, ``opforge::<name>_backward``, that
recomputes the forward through the op's usual autograd path and differentiates it: one more forward per
call and step, the price of a single graph (the op's saved tensors cannot cross a custom op's boundary).

Which traced calls become the custom op (``OPFORGE_COMPILE``, read when tracing):

* ``auto`` (default): calls that need no gradient (inference, ``torch.no_grad``) and every call under
  ``torch.export``; a call that will be differentiated under torch.compile runs eagerly at a graph
  break instead, with its autograd Function's saved tensors and no recompute (a break splits the graph;
  the node would run the op's forward twice per step).
* ``op``: every traced call, so ``torch.compile(fullgraph=True)`` trains too.

Under torch.func transforms and on forward-mode dual tensors a traced call keeps the graph break: it
runs the ops' plain torch math eagerly (see ``Op.run_plain``). The backward op is not differentiable
again: a double backward through a compiled graph is an error (autograd's own).
"""
from __future__ import annotations

import os
import re
import sys
import threading
from typing import Callable

import numpy as np
import torch

from ._registry import _SHAPES_ONLY, dual_inputs, transforms_active

COMPILE_MODES = ("auto", "op")


def compile_mode() -> str:
    """``OPFORGE_COMPILE``, checked. Run, not traced, when dynamo meets it (``_dynamo_marked_constant``, what
    ``torch._dynamo.assume_constant_result`` sets, set here without importing torch._dynamo): a traced raise
    reached the user of torch 2.7 as dynamo's "Observed exception", without this message."""
    mode = os.environ.get("OPFORGE_COMPILE", "auto").strip() or "auto"
    if mode not in COMPILE_MODES:
        raise ValueError(f"OPFORGE_COMPILE={mode!r} is not a compile mode; valid: {list(COMPILE_MODES)}")
    return mode


compile_mode._dynamo_marked_constant = True


def _exporting() -> bool:
    """Is torch.export tracing? Run, not traced, under dynamo (as ``compile_mode``). The flag torch.export
    sets is read directly: torch 2.11's dynamo folds ``torch.compiler.is_exporting()`` to True under every
    torch.compile trace (2.13 reads the flag), which made differentiated calls the recomputing node instead
    of the graph break. torch 2.7's strict export sets the flag only after its dynamo capture, so during the
    capture its translator's ``export`` is asked (without it a call needing a gradient met the graph break,
    which an export refuses)."""
    if getattr(torch.compiler, "_is_exporting_flag", False) is True:
        return True
    dynamo = sys.modules.get("torch._dynamo.symbolic_convert")
    tx = getattr(dynamo.tls, "current_tx", None) if dynamo is not None else None
    return getattr(tx, "export", False) is True


_exporting._dynamo_marked_constant = True


def traced(*args) -> bool:
    """Should this call be the custom op? True while torch.compile or torch.export traces it, outside
    torch.func transforms and forward-mode AD, and (``OPFORGE_COMPILE=auto``) when it needs no gradient
    or is being exported."""
    if not torch.compiler.is_compiling() or transforms_active() or dual_inputs(args):
        return False
    if compile_mode() == "op" or _exporting():
        return True
    return not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))


def traced_scalar(v, device=None):
    """A NumPy scalar argument (``np.float64(0.7)``, what ``np.median`` returns) under torch.compile. Eagerly
    it is the number it holds; dynamo traces it as a 0-d array of unknown value, which no check reads as a
    number and a graph node cannot take as a float (``fullgraph=True`` failed on one), so it becomes a 0-d
    tensor (on ``device``, else the CPU), taken as a tensor argument is (an integer one as float64, as
    ``number`` reads it eagerly; a boolean stays one, for the op's check to refuse). Anything else, and
    every eager call: ``v`` itself. (NumPy ints for sizes and counts, which shape the graph, cannot be
    made tensors: there the trace breaks and the call runs eagerly.)"""
    if not (isinstance(v, np.ndarray) and v.ndim == 0 and torch.compiler.is_compiling()):  # (eagerly: one isinstance)
        return v
    t = torch.as_tensor(v)
    if t.dtype != torch.bool and not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float64)
    return t if device is None else t.to(device)


def _fresh_thread_keys() -> tuple:
    """The dispatcher's thread-local key sets of ordinary eager code: a new thread's (read there, so that
    importing opforge inside ``torch.inference_mode`` or a dispatch mode does not change them)."""
    keys = []
    reader = threading.Thread(target=lambda: keys.append(
        (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())))
    reader.start()
    reader.join()
    return keys[0]


_EAGER_KEYS = _fresh_thread_keys()


def _eager_dispatch():
    """Ordinary eager dispatch inside a custom op's implementation. It runs below the Autograd keys (the
    backward op differentiates a recompute), and when a compiled graph (aot_eager, inductor) calls it,
    below Conjugate and Negative too, where a conj() view reads as the unconjugated tensor: the complex
    math of the ops would be silently wrong (found with the spectral convolution under aot_eager)."""
    return torch._C._ForceDispatchKeyGuard(*_EAGER_KEYS)


class GraphOp:
    """``torch.ops.opforge.<name>``: ``eager(*args)`` as a custom op with a recomputing backward.

    ``schema`` lists the arguments as torch.library spells them, e.g. ``"Tensor x, Tensor? bias, int d"``
    (one Tensor output); ``fake(*args)`` returns the output's shape and dtype as an empty tensor (it runs
    with value checks off: ``_registry.shapes_only``). Gradients flow to the floating tensor arguments.
    """

    def __init__(self, name: str, schema: str, eager: Callable, fake: Callable):
        self.name, self.eager = name, eager
        self.tensor_args = [bool(re.match(r"\s*Tensor\??\s", a)) for a in schema.split(",")]
        lib = "opforge"
        self.op = torch.library.custom_op(f"{lib}::{name}", self._forward, mutates_args=(),
                                          schema=f"({schema}) -> Tensor")
        self.op.register_fake(self._fake(fake))
        self.backward_op = torch.library.custom_op(f"{lib}::{name}_backward", self._backward, mutates_args=(),
                                                   schema=f"(Tensor grad, {schema}, bool[] needs) -> Tensor[]")
        self.backward_op.register_fake(self._fake_grads)
        self.op.register_autograd(self._vjp, setup_context=self._setup)

    def __call__(self, *args):
        return self.op(*args)

    def _forward(self, *args):
        with _eager_dispatch(), torch.no_grad():
            out = self.eager(*args)
        # a custom op may not return one of its inputs or a view of one (an empty sum can be one), and its
        # strides must be the fake implementation's (contiguous): inductor asserts them
        ptr = out.untyped_storage().data_ptr()
        shared = any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)
        return out.clone(memory_format=torch.contiguous_format) if shared else out.contiguous()

    @staticmethod
    def _fake(fake: Callable) -> Callable:
        def run(*args):
            token = _SHAPES_ONLY.set(True)
            try:
                return fake(*args)
            finally:
                _SHAPES_ONLY.reset(token)
        return run

    def _setup(self, ctx, inputs, output):
        ctx.save_for_backward(*(a if t else None for a, t in zip(inputs, self.tensor_args)))
        ctx.others = [None if t else a for a, t in zip(inputs, self.tensor_args)]

    def _vjp(self, ctx, grad):
        args = [s if t else o for s, o, t in zip(ctx.saved_tensors, ctx.others, self.tensor_args)]
        needs = [bool(n) and t and a is not None and (a.is_floating_point() or a.is_complex())
                 for a, n, t in zip(args, ctx.needs_input_grad, self.tensor_args)]
        grads = iter(self.backward_op(grad, *args, needs) if any(needs) else ())
        return tuple(next(grads) if n else None for n in needs)

    def _backward(self, grad, *args_needs):
        *args, needs = args_needs
        with _eager_dispatch(), torch.enable_grad():
            leaves = [a.detach().requires_grad_() if n else a for a, n in zip(args, needs)]
            out = self.eager(*leaves)
            want = [a for a, n in zip(leaves, needs) if n]
            got = torch.autograd.grad(out, want, grad, allow_unused=True)
        # contiguous, as the fake implementation's (a spectral dx can be a strided view; inductor asserts)
        return [torch.zeros_like(w, memory_format=torch.contiguous_format) if g is None else g.contiguous()
                for w, g in zip(want, got)]

    @staticmethod
    def _fake_grads(grad, *args_needs):
        *args, needs = args_needs
        return [torch.empty_like(a, memory_format=torch.contiguous_format) for a, n in zip(args, needs) if n]
