"""Python entry points of torch swapped for thin wrappers while any transform is live (the mechanism; pyfunctorch/patches.py is the table)."""

from __future__ import annotations

import threading
import types
from contextlib import contextmanager
from itertools import repeat
from typing import Any, Callable, Iterator

from ._state import _state

# -- Python entry points patched while any transform is live ------------------------
#
# A few torch calls never reach a tensor subclass: random factories (``torch.randn(3)``
# has no tensor argument, trap 7) and random ops on plain tensors; and the user's
# ``x.detach()`` must be told apart from autograd's internal detach (trap 2). A global
# TorchFunctionMode would see them but costs ~2.5 us on *every* op, so instead these
# entry points are swapped for thin wrappers while the interpreter stack is non-empty.
# Each wrapper checks this thread's stack, so other threads are unaffected.

_PATCHES: list[tuple[Any, str, Callable, Callable]] = []  # (owner, attr, original, wrapper)
_MISSING_ATTR = object()


def patch_while_active(owner: Any, attr: str, handler: Callable, every_thread: bool = False) -> None:
    """While a transform is live, ``owner.attr(*args, **kwargs)`` calls
    ``handler(original, args, kwargs)`` (only on threads with a live transform, unless
    ``every_thread``: then the handler decides, for a rare call whose handler has state
    of its own)."""
    original = getattr(owner, attr)

    if every_thread:
        def wrapper(*args, **kwargs):
            return handler(original, args, kwargs)
    else:
        def wrapper(*args, **kwargs):
            if not _state.stack:
                return original(*args, **kwargs)
            return handler(original, args, kwargs)

    wrapper.__name__ = getattr(original, "__name__", attr)
    wrapper.__qualname__ = getattr(original, "__qualname__", attr)
    wrapper.__doc__ = getattr(original, "__doc__", None)
    wrapper.__wrapped__ = original
    wrapper._pyf_original = original  # (what a __torch_function__ handler calls: see BatchedTensor)
    _PATCHES.append((owner, attr, original, wrapper))


def swap_code_while_active(fn: Callable, code: Any) -> None:
    """While a transform is live, ``fn`` runs ``code`` (for entry points that a wrapper set
    with ``setattr`` cannot replace, e.g. a classmethod bound before the transform began)."""
    _PATCHES.append((fn, "__code__", fn.__code__, code))


# The patches are process-wide while *any* thread has a live transform: a count of the
# outermost transform calls in flight (over all threads) decides when to install and
# remove them, so one thread finishing never unpatches under another.
_patch_lock = threading.Lock()
_patch_users = 0
_patch_saved: list = []
_plan: list = []  # _PATCHES grouped by owner (see _swap_plan)
_plan_len = -1


def _swap_plan() -> list:
    """``_PATCHES`` grouped by owner, for the swaps paid on every outermost transform call
    (speed: 14.8 -> 12.7 us per install + removal): ``(namespace, names, {name: wrapper},
    setter)``. A module's (``torch``, ``torch._VF`` ...) attributes are its ``__dict__``,
    updated in one call; a class's (``torch.Tensor``) need ``setattr`` (type caches); a
    function's ``__code__`` too."""
    global _plan, _plan_len
    if _plan_len != len(_PATCHES):
        groups: dict = {}
        for owner, attr, _original, wrapper in _PATCHES:
            groups.setdefault(id(owner), (owner, {}))[1][attr] = wrapper
        plan = []
        for owner, wrappers in groups.values():
            names = tuple(wrappers)
            if isinstance(owner, types.ModuleType) and type(owner).__setattr__ is types.ModuleType.__setattr__:
                plan.append((owner.__dict__, names, wrappers, None))
            else:
                plan.append((owner, names, wrappers, setattr))
        _plan, _plan_len = plan, len(_PATCHES)
    return _plan


def _install_patches() -> None:
    global _patch_users, _patch_saved
    with _patch_lock:
        _patch_users += 1
        if _patch_users > 1:
            return
        saved = []
        for ns, names, wrappers, setter in _swap_plan():
            if setter is None:  # a module's namespace
                saved.append(list(map(ns.get, names, repeat(_MISSING_ATTR))))
                ns.update(wrappers)
            else:
                own = ns.__dict__ if isinstance(ns, type) else None
                saved.append([own.get(n, _MISSING_ATTR) if own is not None else getattr(ns, n) for n in names])
                for n, w in wrappers.items():
                    setter(ns, n, w)
        _patch_saved = saved


def _uninstall_patches() -> None:
    global _patch_users, _patch_saved
    with _patch_lock:
        _patch_users -= 1
        if _patch_users > 0:
            return
        for (ns, names, _wrappers, setter), old in zip(_plan, _patch_saved):
            if setter is None and _MISSING_ATTR not in old:
                ns.update(zip(names, old))
                continue
            for n, o in zip(names, old):
                if o is _MISSING_ATTR:
                    if setter is None:
                        del ns[n]
                    else:
                        delattr(ns, n)
                elif setter is None:
                    ns[n] = o
                else:
                    setter(ns, n, o)
        _patch_saved = []


@contextmanager
def hold_entry_points() -> Iterator[None]:
    """Keep torch's patched entry points installed for the whole block.

    While any transform is live, pyfunctorch replaces a few torch entry points (random
    factories, ``Tensor.clone``, ``Tensor.detach`` ...; see ``pyfunctorch/patches.py``) with
    thin wrappers, and puts torch's own back when the outermost transform returns. Each
    swap costs little itself, but it invalidates Python's attribute caches and specialized
    bytecode: about 40 us per outermost call, which matters for loops of many small
    transform calls (20 pointwise ops on a [64, 8] batch under vmap: ~2.1x torch.func
    eagerly, ~1.8x inside this block). Inside the block the wrappers stay; wherever no
    transform is live (other threads included) they call torch's function unchanged, so
    plain torch code gives the same results, one Python call slower. After the block torch
    is as before. Blocks nest and may be entered by several threads.

    Code that torch.compile traces inside the block sees the wrappers in place of torch's
    functions and traces through them (tests/test_torch_compile.py checks the results).

        with pyfunctorch.hold_entry_points():
            for x in batches:
                out = pyfunctorch.vmap(f)(x)

    (The library uses it too: jacrev runs vjp, then vmap over vjp_fn, two outermost levels
    in turn, inside one block: ~70 us of its time on a 256x256 MLP went to the swaps.)
    """
    _install_patches()
    try:
        yield
    finally:
        _uninstall_patches()
