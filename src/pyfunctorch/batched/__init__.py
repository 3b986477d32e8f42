"""vmap: the batched tensor, its interpreter, the fallbacks, randomness and the public ``vmap``.

Layers, bottom up (each imports only those before it): ``tensor`` (BatchedTensor),
``fallbacks`` (decomposition, per-example loop, out=, lazy buffers), ``randomness``,
``user_rules`` (Functions' and custom ops' own vmap rules), ``interpreter`` (one aten op
under vmap), ``api`` (the public ``vmap``).
"""

from __future__ import annotations

from .api import vmap
from .fallbacks import FALLBACK_COUNTS, decomposition, loop_fallback
from .interpreter import VmapInterpreter, invalidate_op_cache
from .tensor import BatchedTensor
from .user_rules import custom_op_vmap_fn

__all__ = ["vmap", "BatchedTensor", "VmapInterpreter", "FALLBACK_COUNTS", "loop_fallback", "decomposition",
           "invalidate_op_cache", "custom_op_vmap_fn"]
