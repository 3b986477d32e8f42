"""The torch releases pyfunctorch is tested with, and what importing it on another release says."""

from __future__ import annotations

import warnings

import torch

#: the (major, minor) releases the whole test suite passes on
TESTED = ((2, 13),)


def check_torch(version: str | None = None) -> None:
    """Raise ImportError on a torch whose autograd.Function entry point pyfunctorch cannot install
    (2.14 and newer); warn on an older release that the suite does not pass on."""
    version = version or torch.__version__
    try:
        major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:  # a local build with an unusual version string: say nothing
        return
    if major_minor in TESTED:
        return
    if major_minor >= (2, 14):
        raise ImportError(
            f"pyfunctorch supports torch 2.13; this is torch {version}. From torch 2.14 on, "
            "torch.autograd.Function.apply is implemented in C++ (a classmethod_descriptor), and "
            "pyfunctorch's entry point for autograd.Function under its transforms (a swap of "
            "Function.apply's Python code) cannot be installed: custom Functions would give wrong "
            "derivatives under nested transforms. Install torch 2.13 (pip install 'torch==2.13.*')."
        )
    warnings.warn(
        f"pyfunctorch is tested with torch 2.13; this is torch {version}. On torch 2.11 the test suite "
        "has failures: wrong results for transforms called under torch.inference_mode, errors for "
        "non-reentrant checkpoint under forward AD and some torch.library custom ops. Use torch 2.13 "
        "for trustworthy results.",
        RuntimeWarning,
        stacklevel=3,
    )
