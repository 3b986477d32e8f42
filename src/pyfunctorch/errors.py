"""Every exception and warning pyfunctorch raises, and the internal signals between its layers (a leaf: it imports nothing).

User-facing errors say what went wrong and what to do. Internal signals
(``PerExampleSignal``) travel between a batching rule and the vmap level running it:
a rule raises one without knowing its level, and the level whose dispatch the rule
runs under claims it (``VmapInterpreter.dispatch`` sets ``signal.interp``).
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "BatchedWriteError",
    "DataDependentError",
    "EscapedTensorError",
    "MixedTransformsError",
    "PerExampleSignal",
    "PerformanceWarning",
    "RandomnessError",
    "batched_write_error",
    "data_dependent",
    "randomness_error",
]


class ArgumentError(RuntimeError, ValueError):
    """A transform was called with arguments it cannot use (bad ``argnums``, mismatched
    structures or shapes, a malformed ``has_aux`` output, ...). torch.func raises
    ``RuntimeError`` for these: this class is both, so ``except RuntimeError`` (code written
    for torch.func) and ``except ValueError`` catch it."""


class ArgumentTypeError(ArgumentError, TypeError):
    """Like :class:`ArgumentError`, for a value of the wrong type (a non-tensor where a
    tensor is needed, a list where a tuple is needed, an integer tensor to differentiate)."""


class PerformanceWarning(UserWarning):
    """A slow path was taken (e.g. the per-example loop fallback)."""


class EscapedTensorError(RuntimeError):
    """A tensor created inside a transform was used after that transform returned."""


class MixedTransformsError(RuntimeError):
    """A pyfunctorch transform was called inside a torch.func transform."""


class RandomnessError(RuntimeError):
    """A random operation ran under vmap with randomness='error'."""


class DataDependentError(RuntimeError):
    """Python control flow or .item() depended on the values of a batched tensor."""


class BatchedWriteError(RuntimeError):
    """An in-place op would write batched values into a tensor that is not batched."""


class PerExampleSignal(DataDependentError):
    """A result depends on per-example values (a Python branch on a batched tensor,
    ``.item()``, per-example shapes). The vmap call of the level that claimed it
    (``interp``) catches it and re-runs the function once per example; vmaps of other
    levels let it pass (trap 8). Raised level-free (``interp=None``) by rules; the vmap
    level whose dispatch is nearest the raise claims it. Unclaimed, it is an ordinary
    ``DataDependentError``."""

    def __init__(self, message: str, interp=None) -> None:
        super().__init__(message)
        self.interp = interp


def data_dependent(what: str, interp=None) -> PerExampleSignal:
    """The signal for a Python read of a batched value (``.item()``, ``bool()``, ``.tolist()``)."""
    return PerExampleSignal(
        f"vmap: {what} needs the value of a batched tensor (data-dependent Python control flow "
        "such as `if x > 0:`, `.item()` or `.tolist()`), but inside vmap a tensor stands for a "
        "whole batch. Use torch.where(cond, a, b) (or pyfunctorch.cond / while_loop) to keep "
        "it batched, or compute it outside vmap.",
        interp,
    )


def batched_write_error(func) -> BatchedWriteError:
    return BatchedWriteError(
        f"vmap: {func} writes batched values into a tensor that is not batched (it came from "
        "outside the vmapped function, or was created unbatched). Each example would overwrite "
        "the same memory, so the result cannot be per-example. Use the out-of-place form "
        "(e.g. `x = x + y` instead of `x.add_(y)`), or pass the tensor as a batched input "
        "(in_dims) so each example owns its slice."
    )


def randomness_error(func) -> RandomnessError:
    return RandomnessError(
        f"vmap: called the random operation {getattr(func, '__name__', func)} under "
        "vmap(..., randomness='error') (the default). Choose how randomness should behave across "
        "the batch: randomness='different' (each example draws its own values) or "
        "randomness='same' (every example sees the same draw)."
    )


def is_torch_internal_assert(exc: BaseException | None) -> bool:
    """``exc``, or an exception it was raised from, is torch failing one of its own consistency
    checks (``INTERNAL ASSERT FAILED``): never the user's error."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, RuntimeError) and "INTERNAL ASSERT FAILED" in str(exc):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False

