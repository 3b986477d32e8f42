"""pyfunctorch: composable function transforms for PyTorch, in Python.

``vmap``, ``grad``, ``grad_and_value``, ``vjp``, ``jvp``, ``linearize``,
``jacrev``, ``jacfwd``, ``hessian``, ``functional_call`` and
``stack_module_state`` with torch.func's signatures, composable in any order and
depth. Switching your torch.func imports to pyfunctorch gives the same results.
"""

from ._compat import check_torch as _check_torch

_check_torch()  # before anything that needs the tested torch (a clear ImportError, not an AttributeError)

from .functional import functional_call, stack_module_state  # noqa: E402
from .reverse import grad, grad_and_value, vjp
from .jacobians import hessian, jacfwd, jacrev
from .forward import jvp, linearize
from .batched import vmap
from .errors import (ArgumentError, ArgumentTypeError, BatchedWriteError, DataDependentError, EscapedTensorError,
                     MixedTransformsError, PerformanceWarning, RandomnessError)
from .control_flow import cond, scan, while_loop
from .compile import compile
from . import random
from ._patching import hold_entry_points
from . import custom_function  # noqa: F401  (torch.autograd.Function under transforms)
from . import patches  # noqa: F401  (the torch entry points replaced while a transform is live)

__all__ = [
    "vmap",
    "grad",
    "grad_and_value",
    "vjp",
    "jvp",
    "linearize",
    "jacrev",
    "jacfwd",
    "hessian",
    "functional_call",
    "stack_module_state",
    "cond",
    "while_loop",
    "scan",
    "compile",
    "random",
    "hold_entry_points",
    "ArgumentError",
    "ArgumentTypeError",
    "BatchedWriteError",
    "EscapedTensorError",
    "MixedTransformsError",
    "DataDependentError",
    "PerformanceWarning",
    "RandomnessError",
]
__version__ = "0.1.0"
