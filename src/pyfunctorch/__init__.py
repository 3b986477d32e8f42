"""pyfunctorch: composable function transforms for PyTorch, in Python.

``vmap``, ``grad``, ``grad_and_value``, ``vjp``, ``jvp``, ``linearize``,
``jacrev``, ``jacfwd``, ``hessian``, ``functional_call`` and
``stack_module_state`` with torch.func's signatures, composable in any order and
depth. Switching your torch.func imports to pyfunctorch gives the same results.
"""

from ._core import EscapedTensorError
from .functional import functional_call, stack_module_state
from .reverse import grad, grad_and_value, vjp
from .jacobians import hessian, jacfwd, jacrev
from .forward import jvp, linearize
from .batched import DataDependentError, PerformanceWarning, RandomnessError, vmap
from .control_flow import cond, scan, while_loop
from .compile import compile
from . import random
from . import _autograd_compat  # noqa: F401  (torch.autograd.grad / backward inside vmap)
from . import custom_function  # noqa: F401  (torch.autograd.Function under transforms)

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
    "EscapedTensorError",
    "DataDependentError",
    "PerformanceWarning",
    "RandomnessError",
]
__version__ = "0.1.0"
