"""How transform entry points look to torch.compile: one opaque eager call (a graph break), never traced into."""

from __future__ import annotations

import functools
from typing import Callable

import torch


def opaque_to_compiler(fn: Callable) -> Callable:
    """Make a transform entry point one opaque eager call for ``torch.compile``.

    Dynamo tracing into a transform would see per-call state (fresh levels, wrapper
    subclasses, the patched torch entry points) and recompile on every call; and a graph
    it compiled while a level is live would run torch internals under the transform.
    While dynamo traces (``torch.compiler.is_compiling()``), the call is routed through
    ``torch.compiler.disable``: a graph break, and the transform with everything it calls
    runs eagerly. Outside compilation this costs one extra Python call."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return entry
