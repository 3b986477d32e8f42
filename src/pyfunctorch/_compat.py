"""The torch releases pyfunctorch is tested with, and what importing it on another release says."""

from __future__ import annotations

import warnings

import torch

#: the (major, minor) releases the whole fast test suite passes on (2.14 and 2.15 in side
#: environments: docs/porting-torch-2.15.md)
TESTED = ((2, 13), (2, 14), (2, 15))


def check_torch(version: str | None = None) -> None:
    """Warn on a torch release the test suite does not pass on (older) or has not run on (newer)."""
    version = version or torch.__version__
    try:
        major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:  # a local build with an unusual version string: say nothing
        return
    if major_minor in TESTED:
        return
    if major_minor > TESTED[-1]:
        warnings.warn(
            f"pyfunctorch is tested with torch 2.13 to 2.15; this is torch {version}, which it has not "
            "been tested with. Check results against torch.func or a loop before trusting them.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    warnings.warn(
        f"pyfunctorch is tested with torch 2.13 to 2.15; this is torch {version}. On torch 2.11 the test "
        "suite has failures (errors for non-reentrant checkpoint under forward AD and for torch.library "
        "custom-op backwards per example; float16 addbmm rounding). Use torch 2.13 or newer.",
        RuntimeWarning,
        stacklevel=3,
    )
