"""pyfunctorch: composable function transforms for PyTorch, in Python.

``vmap``, ``grad``, ``grad_and_value``, ``vjp``, ``jvp``, ``linearize``,
``jacrev``, ``jacfwd``, ``hessian`` and ``functional_call`` with torch.func's
signatures, composable in any order and depth.
"""

from ._core import EscapedTensorError
from .grad import grad, grad_and_value, vjp
from .vmap import DataDependentError, PerformanceWarning, RandomnessError, vmap

__all__ = [
    "vmap", "grad", "grad_and_value", "vjp",
    "EscapedTensorError", "DataDependentError", "PerformanceWarning", "RandomnessError",
]
__version__ = "0.1.0"
