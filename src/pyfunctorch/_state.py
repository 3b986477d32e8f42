"""The per-thread state of the transforms: the interpreter stack and its counters."""

from __future__ import annotations

import threading


class _State(threading.local):
    def __init__(self) -> None:
        self.stack: list = []  # live Interpreters (pyfunctorch._core), innermost last
        self.jvp_depth = 0
        self.dispatch_depth = 0  # > 0 while a wrapper's __torch_dispatch__ runs (our own op calls)
        self.shadow_backward = 0  # > 0 while the wrappers of a level with a shadow graph are differentiated
        self.in_saved_hook = 0  # > 0 while a user's saved-tensor pack/unpack hook runs (autograd's side: _saved_hooks)


_state = _State()
