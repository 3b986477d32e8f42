"""User-facing exception classes of pyfunctorch (a leaf module: imports only the stdlib).

torch.func raises ``RuntimeError`` for most mistakes in how a transform is called
(``argnums`` out of range, a cotangent with the wrong structure, ``jvp`` primals that
are not a tuple, ``has_aux`` outputs that are not tensors). pyfunctorch keeps its more
specific messages, but its classes subclass ``RuntimeError`` too, so code written for
torch.func (``except RuntimeError``) and code written for the natural Python class
(``except ValueError`` / ``except TypeError``) both catch them.
"""

from __future__ import annotations

__all__ = ["ArgumentError", "ArgumentTypeError"]


class ArgumentError(RuntimeError, ValueError):
    """A transform was called with arguments it cannot use (bad ``argnums``, mismatched
    structures or shapes, a malformed ``has_aux`` output, ...)."""


class ArgumentTypeError(ArgumentError, TypeError):
    """Like :class:`ArgumentError`, for a value of the wrong type (a non-tensor where a
    tensor is needed, a list where a tuple is needed, an integer tensor to differentiate)."""
