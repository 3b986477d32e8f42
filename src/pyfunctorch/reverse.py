"""Reverse mode: the grad interpreter, GradTensor, and ``grad``, ``grad_and_value``, ``vjp``.

Each grad level wraps its inputs in ``GradTensor`` objects created with
``requires_grad=True``: torch's own autograd engine records this level's graph on
the wrapper objects, while the inner values keep recording the graphs of lower
levels. ``torch.autograd.grad`` on the wrappers then differentiates exactly this
level.

Speed (the *shadow graph*): a grad/vjp level that no other transform encloses records
its graph a second time on the inner values, plain torch tensors (its inputs replaced by
plain aliases that require grad), and differentiates that plain graph: its backward pass
then runs in torch's C++ autograd instead of one Python dispatch per op on the wrappers
(jacrev of a 256x256 MLP, paired: 1.38x -> 1.27x torch.func). The forward pass still runs on the
wrappers, so everything the function does is checked and seen as before (writes into
outside tensors, escapes, nested transforms); only the backward differs. See ``_Shadow``.
Per-sample gradients (a grad level directly inside the outermost vmap) record it on the vmap
level's physical values (``_Shadow._start_per_sample``).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _fwad

from . import _nested_decomp  # noqa: F401  (registers the nested-differentiation decompositions)
from ._core import (Interpreter, LevelTensor, WrapperInterpreter, _functorch_active, _install_patches,
                    _resolve_dead, _uninstall_patches, interpreter_stack, level_of,
                    lowered, no_inference_mode, peel, push_interpreter)
from ._ownership import lift_into_live_levels
from ._state import _state
from ._compiler import opaque_to_compiler
from ._pytree import tree_flatten, tree_map, tree_unflatten
from ._saved_hooks import wrap_hooks
from .errors import ArgumentError, ArgumentTypeError

aten = torch.ops.aten

# torch.autograd.grad itself, never the entry point patched while transforms are live
# (pyfunctorch/patches.py): the library's own calls stay below the user-facing layer
_torch_autograd_grad = torch.autograd.grad


class GradTensor(LevelTensor):
    """A tensor differentiated at one grad/vjp level."""

    @staticmethod
    def __new__(cls, value: torch.Tensor, interp: Interpreter, requires_grad: bool = False):
        return LevelTensor._same_shape(cls, value, interp, requires_grad)

    def _describe(self) -> str:
        return f"GradTensor[grad level {self._interp.level}]"

    # Hooks act on this level's own graph, the wrappers': a level that records a shadow
    # graph then differentiates the wrappers (the shadow's backward would skip the hook).
    def register_hook(self, hook):
        _shadow_unusable(self)
        return super().register_hook(hook)

    def register_post_accumulate_grad_hook(self, hook):
        _shadow_unusable(self)
        return super().register_post_accumulate_grad_hook(hook)

    def retain_grad(self):
        _shadow_unusable(self)
        return super().retain_grad()

    def _escaped(self):
        # After its level ends, a grad wrapper is just its value (with lower levels intact).
        value = _resolve_dead(self._value)
        shadow = self._interp.shadow
        return value if shadow is None else shadow.outside(value)


def _shadow_unusable(t) -> None:
    shadow = t._interp.shadow
    if shadow is not None:
        shadow.usable = False


class GradInterpreter(WrapperInterpreter):
    kind = "grad"
    wrapper = GradTensor
    shadow: "_Shadow | None" = None  # the plain graph recorded below the wrappers (see _Shadow)

    def __init__(self) -> None:
        super().__init__()
        # Grad mode is per level (as in functorch): the function runs with grad enabled at
        # this level, but the ops it sends to the levels below run in the grad mode that
        # was in force where the transform was called. Under an outer torch.no_grad() the
        # results are then constants below (e.g. for an enclosing grad), as in torch.func.
        self.grad_below = torch.is_grad_enabled()
        if not self.grad_below:  # (an instance attribute: the common case pays nothing)
            self.process = self._process_no_grad_below  # type: ignore[method-assign]

    def rewrap_detached(self, t):
        # With a shadow graph the inner value must be cut too where the wrapper is cut: a
        # user's ``x.data`` (or ``new_tensor(x)``) reaches here like autograd's saving of an
        # output, and the plain graph would keep the edge the wrappers' graph drops. The
        # wrappers' saved copies then hold cut values: fine for differentiating the shadow,
        # and for the wrappers' graph where nothing from outside requires grad; where
        # something does, the value stays whole (trap 2) and the wrappers are differentiated.
        v = t._value
        shadow = self.shadow
        if shadow is not None and shadow.physical(v).requires_grad:
            cut = shadow.outside(v)
            if cut is v:  # (reaches outside: kept whole)
                shadow.usable = False
            v = cut
        return GradTensor(v, self)

    def _process_no_grad_below(self, func, args, kwargs):
        if not torch.is_grad_enabled():
            return WrapperInterpreter.process(self, func, args, kwargs)
        torch._C._set_grad_enabled(False)
        try:
            return WrapperInterpreter.process(self, func, args, kwargs)
        finally:
            torch._C._set_grad_enabled(True)


_peel = peel


def _levels_live(skip_top: bool) -> bool:
    stack = interpreter_stack()
    for it in stack[:-1] if skip_top else stack:
        if it.kind in ("grad", "jvp"):
            return True
    return False


def _needs_graph(primals_flat, outputs_flat=(), skip_top: bool = True) -> bool:
    """Whether the backward pass must be recorded (create_graph=True). Trap 3: with an
    outer differentiation level live it must, or the outer level sees 0. Otherwise only
    where plain autograd below needs it: inputs that require grad, or outputs whose
    inner values require grad -- the function closed over a tensor that requires grad
    (``grad(lambda a: (a @ W).sum())`` with ``W.requires_grad``), so the gradient
    depends on it, as with ``torch.autograd.grad(..., create_graph=True)``."""
    if _levels_live(skip_top):
        return True
    return any(_requires_grad_below(p) for p in primals_flat) or any(
        _requires_grad_below(o._value if isinstance(o, LevelTensor) else o) for o in outputs_flat
    )


def _requires_grad_below(t) -> bool:
    while isinstance(t, LevelTensor):
        t = t._value
    return isinstance(t, torch.Tensor) and t.requires_grad


_plain_detach = torch._C.TensorBase.detach  # (never the entry point patched while transforms are live)
_saved_tensor_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled


#: record per-sample gradients' graph on the vmap level's physical values (``_Shadow``); a switch
#: for tests and measurements
PER_SAMPLE_SHADOW = True


class _Shadow:
    """The graph a grad/vjp level records on its inner values, besides its wrappers' own.

    Taken where the level is the only transform (nothing live when it starts), grad mode
    is on, inference mode, forward AD and saved-tensor hooks are off, and the inputs are
    plain tensors: the inner values are then plain tensors, whose plain autograd records
    exactly this level's ops (the wrapper level runs each op on them with autograd on,
    trap 1). The inputs are replaced by aliases that require grad (``inputs``): a fresh
    leaf, or a view that keeps the user's graph where the input requires grad.

    Differentiating the plain graph (``grad``) gives what differentiating the wrappers
    gives, in torch's C++ engine. Where an output of the level requires grad but its
    inner value does not (some mechanism recorded on the wrappers only), the shadow is
    not used (``usable``) and the wrappers are differentiated as before.

    Seen from outside the level (results, aux, escaped tensors; ``outside``) an inner
    value must not carry the aliases' graph: it is detached unless its graph reaches a
    tensor that requires grad from outside the level (a closed-over weight, an input
    that required grad), as the unwrapped value would, where it is kept whole (the
    aliases then only add a branch that ends in them). ``foreign`` says that of the
    outputs: then the backward pass is recorded (create_graph), as with the wrappers."""

    __slots__ = ("inputs", "usable", "foreign", "own", "own_nodes", "clean", "vmap")

    def __init__(self, inputs, vmap=None):
        self.inputs = inputs
        self.vmap = vmap  # the vmap level the aliases are batched at (per-sample gradients), or None
        self.usable = True
        self.foreign = False
        if vmap is not None:
            vmap.grad_shadow = self  # (ops whose rules are not differentiated physically turn it off)
        phys = [self.physical(a) for a in inputs]
        self.own = {id(a) for a in phys if a.grad_fn is None}
        self.own_nodes = {a.grad_fn for a in phys if a.grad_fn is not None}
        self.clean: set = set()  # graph nodes that reach no tensor from outside

    @staticmethod
    def start(flat, per_sample: bool = False) -> "tuple[list, Any] | None":
        """The inputs' aliases where a shadow graph can be recorded, and the vmap level they
        are batched at (or None); else None. ``per_sample``: the level may be directly inside
        one vmap level (``vmap(grad(f))``): see ``_start_per_sample``."""
        stack = _state.stack
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled() \
                or _fwad._current_level >= 0 or _saved_tensor_hooks(True) is not None \
                or _dispatch_modes() or _function_modes() or _functorch_active():
            # (modes: pyfunctorch.compile's tracing, a user's; torch.func: its clear error)
            return None
        if stack:
            return _Shadow._start_per_sample(flat, stack) if per_sample else None
        for x in flat:
            if type(x) not in _PLAIN or x.is_inference():  # (an inference tensor cannot require grad)
                return None
        return [_alias(x) for x in flat], None

    @staticmethod
    def _start_per_sample(flat, stack):
        """Per-sample gradients (a grad level directly inside the outermost vmap level): the
        plain graph is recorded on the vmap level's *physical* values, below both levels.
        A batched input's alias is its physical value's alias; an unbatched one (a weight,
        ``in_dims=None``) is expanded along the batch with stride 0, so that its gradient
        comes out per example (the products and convolutions with such an operand are one
        product forward: batching.linalg.matmul_batched, batching.convolution._SharedFilters).
        The backward pass ran two Python dispatches per op (this level's wrappers, then the
        vmap level), now none: paired against the wrappers' graph, per-sample gradients of an
        MLP 1.85x -> 1.54x torch.func at B=8, 1.13x -> 1.04x at B=256, of a CNN 1.35x -> 1.23x
        at B=64. (The batched wrappers themselves record nothing: a shadow on them was measured
        slower. Batch size 1 -- the per-example re-run's levels -- has nothing to gain.)"""
        if len(stack) != 1 or not PER_SAMPLE_SHADOW:
            return None
        vm = stack[0]
        if vm.kind != "vmap" or not vm.bottom or vm.batch_size < 2 or vm.grad_shadow is not None:
            return None
        aliases = []
        for x in flat:
            if isinstance(x, LevelTensor):
                v = x._value
                if x._interp is not vm or type(x) is not vm.tensor_type or x._lazy or type(v) not in _PLAIN \
                        or v.is_inference():
                    return None
                aliases.append(vm.wrap_physical(_alias(v), x._bdim))
            elif type(x) in _PLAIN and not x.is_inference():
                e = x.expand((vm.batch_size,) + x.shape)
                aliases.append(vm.wrap_physical(e if x.requires_grad else _plain_detach(e).requires_grad_(), 0))
            else:
                return None
        return aliases, vm

    def physical(self, t):
        """The plain tensor holding ``t`` (an alias, an inner value of the level)."""
        if self.vmap is not None and isinstance(t, LevelTensor) and t._interp is self.vmap:
            return t._value
        return t

    def seal(self, interp, outputs) -> None:
        """After the function returned: whether the shadow is usable, and foreign."""
        for o in outputs:
            if isinstance(o, GradTensor) and o._interp is interp:
                v = self.physical(o._value)
                if o.requires_grad and (not v.requires_grad or isinstance(v, LevelTensor)):
                    self.usable = False
                o = v
            if isinstance(o, torch.Tensor) and self.reaches_outside(self.physical(o)):
                self.foreign = True

    def reaches_outside(self, t) -> bool:
        """Whether ``t``'s graph reaches a tensor requiring grad other than the aliases
        (conservatively: any end of the graph that is not an alias's leaf). Nodes found
        not to are remembered (the outputs' graph is walked once)."""
        if not t.requires_grad:
            return False
        fn = t.grad_fn
        if fn is None:
            return id(t) not in self.own
        clean = self.clean
        if fn in clean:
            return False
        own, own_nodes = self.own, self.own_nodes
        seen, stack = {fn}, [fn]
        while stack:
            node = stack.pop()
            if node in own_nodes:
                # an alias that views an input requiring grad: the user's graph beyond it
                return True
            var = getattr(node, "variable", None)
            if var is not None:
                if id(var) not in own:
                    return True
                continue
            nxt = node.next_functions
            if not nxt:
                return True
            for n, _ in nxt:
                if n is not None and n not in seen and n not in clean:
                    seen.add(n)
                    stack.append(n)
        clean |= seen
        return False

    def peeled(self, x, interp):
        """An output of the level seen from outside it (``peel``, then ``outside``)."""
        return self.outside(_peel(x, interp))

    def outside(self, value):
        """``value`` (an inner value of the level) as seen outside it: see the class."""
        if not isinstance(value, torch.Tensor):
            return value
        v = self.physical(value)
        if v.requires_grad and not self.reaches_outside(v):
            return _plain_detach(v) if v is value else self.vmap.wrap_physical(_plain_detach(v), value._bdim)
        return value

    def grad(self, interp, outputs, grad_outputs, create: bool, retain_graph):
        """torch.autograd.grad of this level's outputs on the plain graph; zeros for inputs
        that no output depends on."""
        keep = _differentiated(outputs, interp)
        if not keep:
            return [torch.zeros_like(a) for a in self.inputs]
        outs = [self.physical(outputs[i]._value) for i in keep]
        gouts = None if grad_outputs is None else [_resolve_dead(grad_outputs[i]) for i in keep]
        vm = self.vmap
        if vm is not None:
            # each example's output is a scalar, which depends on its own example only: the sum
            # over the batch seeds every one with 1 (explicit ones as grad_outputs cost more:
            # torch.autograd.grad compares their shapes symbolically, ~20 us)
            outs = [outs[0].sum() if len(outs) == 1 else torch.stack([o.sum() for o in outs]).sum()]
        phys = [self.physical(a) for a in self.inputs]
        # (while the level is live: tensors a backward creates are not its own, nor the vmap level's)
        with lowered(interp.level if vm is None else vm.level):
            grads = _torch_autograd_grad(outs, phys, gouts, retain_graph=retain_graph, create_graph=create,
                                         allow_unused=True)
        if vm is None:
            return [torch.zeros_like(a) if g is None else g for g, a in zip(grads, self.inputs)]
        return [vm.wrap_physical(torch.zeros_like(p) if g is None else g, a._bdim)
                for g, p, a in zip(grads, phys, self.inputs)]


def _alias(x):
    """A plain tensor's alias that requires grad: a view keeping its graph where it requires
    grad, else a fresh leaf."""
    return x.view_as(x) if x.requires_grad else _plain_detach(x).requires_grad_()


def _differentiated(outputs, interp) -> list:
    """Positions of the outputs that are this level's wrappers carrying its derivative."""
    return [i for i, o in enumerate(outputs) if isinstance(o, GradTensor) and o._interp is interp and o.requires_grad]


@contextmanager
def wrapper_backward(shadow):
    """The block differentiates the wrappers of a level that recorded a shadow graph: saved-
    tensor hooks pushed in it (checkpoint's recomputation) skip plain tensors as the
    forward pass's did (see saved_hooks_entry)."""
    if shadow is None:
        yield
        return
    st = _state
    st.shadow_backward += 1
    _install_patches()
    try:
        yield
    finally:
        _uninstall_patches()
        st.shadow_backward -= 1


def saved_hooks_entry(original, args, kwargs):
    """Saved-tensor hooks pushed while a transform is live on this thread: wrapped
    (``_saved_hooks.wrap_hooks``: the hook keeps the graphs of the levels below the one
    that saves). Inside a function whose grad/vjp level records a shadow graph
    (``torch.utils.checkpoint``, ``save_on_cpu``) the hooks get the tensors the wrappers'
    graph saves, as without the shadow; the plain tensors the shadow graph saves are kept as
    they are (checkpoint counts the saved tensors of its region and recomputes them per
    wrapper graph; the shadow's backward then never recomputes). Where the wrappers are
    differentiated instead (``wrapper_backward``), a recomputation sees the same."""
    st = _state
    shadow = st.shadow_backward or any(getattr(it, "shadow", None) is not None for it in st.stack)
    if not (shadow or st.stack) or kwargs or len(args) != 2:
        return original(*args, **kwargs)
    return original(*wrap_hooks(args[0], args[1], LevelTensor, keep_plain=bool(shadow)))


def _check_argnums(argnums, nargs: int, who: str):
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        nums = (argnums,)
    elif isinstance(argnums, tuple) and argnums and all(isinstance(a, int) and not isinstance(a, bool) for a in argnums):
        nums = argnums
    else:
        raise ArgumentTypeError(f"{who}: argnums must be an int or a non-empty tuple of ints; got {argnums!r}.")
    norm = []
    for a in nums:
        if not -nargs <= a < nargs:
            raise ArgumentError(
                f"{who}: argnums {a} is out of range: the function was called with {nargs} positional "
                f"argument(s), so valid argnums are {-nargs}..{nargs - 1}."
            )
        norm.append(a % nargs)
    if len(set(norm)) != len(norm):
        raise ArgumentError(f"{who}: argnums {argnums!r} names the same argument twice; each may appear once.")
    return norm


def _check_diff_inputs(flat, who: str):
    for x in flat:
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(
                f"{who}: can only differentiate with respect to tensors, but an input selected by argnums "
                f"is a {type(x).__name__}. Move it out of argnums or pass it as a tensor."
            )
        if not (x.is_floating_point() or x.is_complex()):
            raise ArgumentTypeError(
                f"{who}: inputs to differentiate must be floating point or complex; got a tensor of dtype "
                f"{x.dtype}. Convert it (e.g. x.float()) or exclude it from argnums."
            )


def _split_aux(out, has_aux: bool, who: str):
    """``(output, aux)`` of a ``has_aux=True`` function, checked as torch.func does: a
    tuple of two, and aux a tensor or a pytree whose leaves are all tensors."""
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ArgumentTypeError(
            f"{who}(..., has_aux=True) expects the function to return a pair, the tuple (output, aux); it returned "
            f"{'a ' + type(out).__name__ if not isinstance(out, (tuple, list)) else f'a {type(out).__name__} of length {len(out)}'}."
        )
    aux = out[1]
    for leaf in tree_flatten(aux)[0]:
        if not isinstance(leaf, torch.Tensor):
            raise ArgumentTypeError(
                f"{who}(..., has_aux=True): aux must be a tensor or a pytree (tuple/list/dict) of tensors, "
                f"as in torch.func; it contains a {type(leaf).__name__} ({leaf!r:.40}). Wrap numbers with "
                "torch.tensor(...) or return them outside the transform."
            )
    return out[0], aux


def _wrap_constants(tree, interp):
    """The tensors of a non-differentiated argument, wrapped at this level without
    requiring grad (as torch.func): what the function creates from them (a clone, a
    view) is then this level's own tensor, so writing differentiated values into it is
    recorded instead of refused as a write into an outside tensor."""
    return tree_map(lambda x: GradTensor(x, interp) if isinstance(x, torch.Tensor) else x, tree)


def _grad_and_value_impl(func, argnums, has_aux, args, kwargs, who):
    nums = _check_argnums(argnums, len(args), who)
    flats, specs = [], []
    for n in nums:
        flat, spec = tree_flatten(args[n])
        _check_diff_inputs(flat, who)
        flats.append(flat)
        specs.append(spec)
    start = _Shadow.start([x for flat in flats for x in flat], per_sample=True)
    interp = GradInterpreter()
    aliases = None
    if start is not None:
        aliases, vm = start
        interp.shadow = shadow = _Shadow(aliases, vm)
        it = iter(aliases)
        flats = [[next(it) for _ in flat] for flat in flats]
    try:
        return _grad_and_value_level(func, nums, has_aux, args, kwargs, who, argnums, interp, flats, specs, aliases)
    finally:
        if aliases is not None and shadow.vmap is not None:
            shadow.vmap.grad_shadow = None


def _grad_and_value_level(func, nums, has_aux, args, kwargs, who, argnums, interp, flats, specs, aliases):
    shadow = interp.shadow
    with push_interpreter(interp):
        diff_flat_all = []
        new_args = list(args)
        for n, flat, spec in zip(nums, flats, specs):
            wrapped = [GradTensor(lift_into_live_levels(x, interp.level), interp, requires_grad=True) for x in flat]
            diff_flat_all.append(wrapped)
            new_args[n] = tree_unflatten(wrapped, spec)
        for n in range(len(args)):
            if n not in nums:
                new_args[n] = _wrap_constants(args[n], interp)
        if kwargs:
            kwargs = _wrap_constants(kwargs, interp)
        with torch.enable_grad():  # as torch.func: grad works under an outer no_grad
            out = func(*new_args, **kwargs)
        out, aux = _split_aux(out, has_aux, who)
        if not isinstance(out, torch.Tensor):
            raise ArgumentTypeError(
                f"{who}: the function must return a tensor (the value to differentiate); got "
                f"{type(out).__name__}. Use vjp for non-tensor or pytree outputs."
            )
        if out.dim() != 0:
            raise ArgumentError(
                f"{who}: the function must return a scalar (0-dim) tensor, but returned shape "
                f"{tuple(out.shape)}. Reduce it (e.g. .sum()), or use vjp/jacrev for non-scalar outputs."
            )
        if not (out.is_floating_point() or out.is_complex()):
            raise ArgumentTypeError(
                f"{who}: the function's output must be floating point to differentiate; got {out.dtype}."
            )
        inputs = [w for group in diff_flat_all for w in group]
        if aliases is not None:
            shadow.seal(interp, [out])
            if shadow.usable:
                grads = shadow.grad(interp, [out], None, shadow.foreign, None)
            else:
                with wrapper_backward(shadow):
                    grads = [_peel(g, interp) for g in _autograd_grad(out, inputs, None, interp, shadow.foreign)]
            grads = [shadow.outside(g) for g in grads]
            value = shadow.peeled(out, interp)
            aux = tree_map(lambda x: shadow.peeled(x, interp), aux)
            shadow.clean = set()  # (graph nodes: not kept alive by wrappers that escaped)
        else:
            create = _needs_graph(inputs, [out], skip_top=True) if interp.grad_below else _levels_live(skip_top=True)
            grads = _autograd_grad(out, inputs, None, interp, create)
            grads = [_peel(g, interp) for g in grads]
            value = _peel(out, interp)
            aux = tree_map(lambda x: _peel(x, interp), aux)
    res = []
    i = 0
    for spec, group in zip(specs, diff_flat_all):
        res.append(tree_unflatten(grads[i : i + len(group)], spec))
        i += len(group)
    g = res[0] if isinstance(argnums, int) else tuple(res)
    return g, value, aux


def _autograd_grad(outputs, inputs, grad_outputs, interp, create: bool, retain_graph: bool | None = None):
    """torch.autograd.grad at this level; unused inputs get zeros."""
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    gouts = None if grad_outputs is None else list(grad_outputs)
    keep = _differentiated(outs, interp)
    if not keep:
        return [torch.zeros_like(x._value) for x in inputs]
    sel_outs: list[Any] = [outs[i] for i in keep]
    # The cotangents are lifted to this level (as functorch's are: they are wrappers of
    # the current level there). Unlifted, (a) a dual of a lower jvp level would reach this
    # level's backward kernels, whose forward-AD formulas (and jvp decompositions such as
    # native_layer_norm_backward's) would then run on this level's wrappers, where
    # autograd's internal detach aliases the inner value (trap 2) and the lower tangent
    # comes out wrong; (b) a backward formula updating its incoming gradient in place
    # (``gI.sub_(...)``) would write this level's derivative into a lower-level tensor.
    if gouts is None:
        sel_gouts = [GradTensor(torch.ones_like(o._value), interp) for o in sel_outs]
    else:
        # (a cotangent of a higher level -- vmap(vjp_fn) -- is peeled by that level first)
        sel_gouts = [g if level_of(g) >= interp.level else GradTensor(g, interp) for g in (gouts[i] for i in keep)]
    with torch.enable_grad():
        grads = _torch_autograd_grad(sel_outs, inputs, sel_gouts, retain_graph=retain_graph, create_graph=create,
                                    allow_unused=True)
    return [torch.zeros_like(x._value) if g is None else g for g, x in zip(grads, inputs)]


def grad_and_value(func: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable:
    """Like ``grad``, but also returns the function's value: ``(grad, value)``
    (``(grad, (value, aux))`` with ``has_aux=True``).

    Examples:
        >>> import torch
        >>> from pyfunctorch import grad_and_value
        >>> g, v = grad_and_value(lambda x: (x ** 2).sum())(torch.tensor([1., 2.]))
        >>> g, v
        (tensor([2., 4.]), tensor(5.))
    """

    @functools.wraps(func)
    @opaque_to_compiler
    def wrapper(*args, **kwargs):
        g, value, aux = _grad_and_value_impl(func, argnums, has_aux, args, kwargs, "grad_and_value")
        if has_aux:
            return g, (value, aux)
        return g, value

    return wrapper


def grad(func: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable:
    """The gradient of a scalar-valued ``func`` with respect to the inputs ``argnums``.

    Composes with every other transform (``vmap(grad(f))`` gives per-example
    gradients; ``grad(grad(f))`` second derivatives). With ``has_aux=True`` ``func``
    returns ``(output, aux)`` and the result is ``(grad, aux)``.

    Examples:
        >>> import torch
        >>> from pyfunctorch import grad
        >>> x = torch.tensor(0.5)
        >>> torch.allclose(grad(torch.sin)(x), torch.cos(x))
        True
        >>> torch.allclose(grad(grad(torch.sin))(x), -torch.sin(x))
        True
    """

    @functools.wraps(func)
    @opaque_to_compiler
    def wrapper(*args, **kwargs):
        g, _value, aux = _grad_and_value_impl(func, argnums, has_aux, args, kwargs, "grad")
        if has_aux:
            return g, aux
        return g

    return wrapper


@opaque_to_compiler
def vjp(func: Callable, *primals: Any, has_aux: bool = False):
    """Run ``func(*primals)`` and return ``(output, vjp_fn)`` (plus ``aux`` with
    ``has_aux=True``); ``vjp_fn(cotangents)`` gives the vector-Jacobian products,
    one per primal, as a tuple. Outputs and primals may be pytrees.

    Examples:
        >>> import torch
        >>> from pyfunctorch import vjp
        >>> x = torch.tensor([1., 2.])
        >>> out, vjp_fn = vjp(torch.sin, x)
        >>> torch.allclose(vjp_fn(torch.ones(2))[0], torch.cos(x))
        True
    """
    return _vjp_impl(func, primals, None, has_aux, "vjp")


def _vjp_impl(func: Callable, primals: tuple, argnums, has_aux: bool, who: str):
    """vjp of ``func`` at ``primals`` with respect to the primals at ``argnums`` (all when
    None; the others are wrapped as constants of the level, as torch.func's jacrev does).
    ``vjp_fn`` returns a tuple with one entry per differentiated primal."""
    nums = range(len(primals)) if argnums is None else argnums
    diff = tuple(primals[n] for n in nums)
    flat, spec = tree_flatten(diff)
    _check_diff_inputs(flat, who)
    start = _Shadow.start(flat)
    interp = GradInterpreter()
    aliases = None
    if start is not None:
        aliases = flat = start[0]
        interp.shadow = shadow = _Shadow(aliases)
    with push_interpreter(interp):
        wrapped = [GradTensor(lift_into_live_levels(x, interp.level), interp, requires_grad=True) for x in flat]
        new_primals = list(primals)
        for n, w in zip(nums, tree_unflatten(wrapped, spec)):
            new_primals[n] = w
        if argnums is not None:
            for n in range(len(primals)):
                if n not in nums:
                    new_primals[n] = _wrap_constants(primals[n], interp)
        with torch.enable_grad():
            out = func(*new_primals)
        out, aux = _split_aux(out, has_aux, who)
        out_flat, out_spec = tree_flatten(out)
        for o in out_flat:
            if not isinstance(o, torch.Tensor):
                raise ArgumentTypeError(
                    f"{who}: the function's outputs must be tensors (or pytrees of tensors); got {type(o).__name__}."
                )
        if not out_flat:
            raise ArgumentError(
                f"{who}: the function returned no tensors ({out!r}), so there is nothing to differentiate; "
                "return at least one tensor (as torch.func requires)."
            )
        if aliases is not None:
            shadow.seal(interp, out_flat)
            primal_out = tree_unflatten([shadow.peeled(o, interp) for o in out_flat], out_spec)
            aux = tree_map(lambda x: shadow.peeled(x, interp), aux)
        else:
            primal_out = tree_unflatten([_peel(o, interp) for o in out_flat], out_spec)
            aux = tree_map(lambda x: _peel(x, interp), aux)
        grad_below = interp.grad_below

    # The level is over when vjp returns. vjp_fn runs the backward pass over the graph
    # recorded on its (now dead) wrappers: dispatch treats dead wrappers as their inner
    # values, so the cotangents may belong to any transform vjp_fn is called under
    # (e.g. vmap(vjp_fn) in jacrev), as in functorch.
    @opaque_to_compiler
    def vjp_fn(cotangents, *, retain_graph: bool = True, create_graph: bool | None = None):
        ct_flat, ct_spec = tree_flatten(cotangents)
        if ct_spec != out_spec:
            raise ArgumentError(
                f"vjp_fn: the cotangents must have the same structure as the function's output "
                f"({out_spec}); got {ct_spec}."
            )
        for c, o in zip(ct_flat, out_flat):
            if not isinstance(c, torch.Tensor):
                raise ArgumentTypeError(
                    f"vjp_fn: each cotangent must be a tensor of its output's shape {tuple(o.shape)}; got "
                    f"{type(c).__name__}."
                )
            if c.shape != o.shape:
                raise ArgumentError(
                    f"vjp_fn: each cotangent must be a tensor of its output's shape {tuple(o.shape)}; got "
                    f"{tuple(c.shape)}."
                )
        # As torch.func: by default the backward pass is recorded when grad mode is on where
        # vjp_fn is called (and is needed: an outer level, or a graph below to extend); under
        # no_grad its result is a constant for every level below (forward AD still flows).
        live = _levels_live(skip_top=False)
        if create_graph is None:
            create = torch.is_grad_enabled() and (live or (
                shadow.foreign if aliases is not None else
                grad_below and _needs_graph(wrapped, out_flat, skip_top=False)))
        else:
            create = bool(create_graph)
        # vjp_fn may be called again (jacrev chunks, user code): keep the graph by default
        with no_inference_mode():
            if aliases is not None and shadow.usable and not live and (not create or shadow.foreign):
                # (a backward recorded for a differentiation level live now differentiates the
                # wrappers: the shadow's saved values require grad through its aliases, and
                # that level's results would carry their graph)
                grads = shadow.grad(interp, out_flat, ct_flat, create, retain_graph)
                return tree_unflatten([shadow.outside(g) for g in grads] if create else grads, spec)
            with wrapper_backward(interp.shadow):
                grads = _autograd_grad(out_flat, wrapped, ct_flat, interp, create, retain_graph=retain_graph)
        if aliases is not None:
            return tree_unflatten([shadow.outside(_resolve_dead(g)) for g in grads], spec)
        return tree_unflatten([_resolve_dead(g) for g in grads], spec)

    if has_aux:
        return primal_out, vjp_fn, aux
    return primal_out, vjp_fn
