"""``torch.autograd.Function`` under pyfunctorch transforms.

``Function.apply`` is not an op: it never reaches ``__torch_dispatch__``, and torch
runs ``forward`` under ``no_grad``, so without help a grad level above a custom
Function records nothing of it, and ``grad(grad(F.apply))`` is silently wrong.
While a transform is live, ``Function.apply`` is therefore replaced by
:func:`custom_function_call`, which handles one level at a time, from the highest
level among the arguments down (as functorch does):

- **grad level L**: unwrap the L-wrappers, call the Function on the inner values
  (which handles the lower levels), wrap the outputs at L and connect them to L's
  graph with a *bridge* ``autograd.Function`` applied to the L-wrappers. The bridge's
  ``setup_context`` is the user's, run on the L-level inputs and outputs (so the saved
  tensors are L-level wrappers and higher derivatives are right); its ``backward`` is
  the user's ``backward`` (so a custom backward is used, not the derivative of forward).
- **jvp level L**: the same, the bridge providing forward mode through the user's
  ``jvp`` staticmethod (a clear error if there is none).
- **vmap level L**: ``generate_vmap_rule = True`` runs ``forward``, ``setup_context``,
  ``backward`` and ``jvp`` under a fresh vmap of the unwrapped values (a generated
  Function, applied to the lower levels); a user ``vmap`` staticmethod is called with
  ``(info, in_dims, *args)``; with neither, the Function runs once per example (slow
  but correct; torch.func raises here) with a ``PerformanceWarning``.
- **no live level among the arguments**: the real ``Function.apply``.

While a level is processed, the interpreters of that level and above are taken off
the stack (functorch's ``interpreter.lower()``), so tensors the Function creates
(``torch.zeros`` ...) and random calls belong to the levels below only.

A backward formula that writes the batched grad_output in place into scratch it made
from unbatched values (``BatchedWriteError``) is re-run once per example
(:func:`call_backward`): for the user's Functions, and for the autograd kernels of
``torch.library`` custom ops (their ``register_autograd`` formulas).

Old-style Functions (``forward(ctx, ...)`` without ``setup_context``) raise a clear
error when they meet a transformed tensor, as in torch.func. Old-style Functions
defined inside torch itself (torch.library's autograd kernels, which run *inside* an
op's dispatch) keep the real ``apply``.

Known limits: the level is chosen from the tensor *arguments*, so a forward that
closes over transformed tensors (instead of taking them as arguments) is not seen;
under a generated vmap rule, tensors put on ``ctx`` as attributes are re-batched
only when they are the attribute's value itself (not inside a list/dict); the
per-example loop (no vmap rule) does not apply vmap's ``randomness`` flag.

Modules: ``entry`` (the apply entry point and the level table), ``bridge`` (grad and
jvp levels), ``vmap_level`` (vmap levels), ``per_example_backward``; users' vmap rules
are called by ``pyfunctorch.batched.user_rules``.
"""

from __future__ import annotations

from ..batched.user_rules import VmapInfo
from . import bridge as _bridge  # noqa: F401  (registers the grad and jvp rules)
from . import vmap_level as _vmap_level  # noqa: F401  (registers the vmap rule)
from .entry import _ENTRY_CODE, _apply_entry, _entry_installed, custom_function_call  # noqa: F401
from .per_example_backward import call_backward

__all__ = ["custom_function_call", "VmapInfo", "call_backward"]
