"""Python entry points of torch swapped for thin wrappers while any transform is live (the mechanism; pyfunctorch/patches.py is the table)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
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


def patch_while_active(owner: Any, attr: str, handler: Callable) -> None:
    """While a transform is live, ``owner.attr(*args, **kwargs)`` calls
    ``handler(original, args, kwargs)`` (only on threads with a live transform)."""
    original = getattr(owner, attr)

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


def _install_patches() -> None:
    global _patch_users, _patch_saved
    with _patch_lock:
        _patch_users += 1
        if _patch_users > 1:
            return
        saved = []
        for owner, attr, _original, wrapper in _PATCHES:
            saved.append(owner.__dict__.get(attr, _MISSING_ATTR) if isinstance(owner, type) else getattr(owner, attr))
            setattr(owner, attr, wrapper)
        _patch_saved = saved


def _uninstall_patches() -> None:
    global _patch_users, _patch_saved
    with _patch_lock:
        _patch_users -= 1
        if _patch_users > 0:
            return
        for (owner, attr, _original, _wrapper), old in zip(_PATCHES, _patch_saved):
            if old is _MISSING_ATTR:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
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
