"""The one base class of every error a user can cause.

Every user-facing error in bitalloc derives from :class:`BitallocError` (most also from
``ValueError``, so ``except ValueError`` keeps working); the CLI turns each into one line
``bitalloc: error: ...`` and exit code 2. This module imports nothing, so every package
(kernels, sensitivity, solvers, allocator) may derive from it without breaking the layering.
"""

from __future__ import annotations

__all__ = ["BitallocError", "MissingDependencyError"]


class BitallocError(Exception):
    """A problem the user can fix (bad input, an unreachable budget, a missing file or
    package); the message says what and where, on one line."""


class MissingDependencyError(BitallocError, ImportError):
    """An optional or broken dependency; the message names the package to install."""

    def __init__(self, package: str, needed_for: str, cause: BaseException | None = None):
        detail = f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})" if cause and str(cause).strip() else ""
        super().__init__(f"{needed_for} needs the Python package {package!r}, which could not be imported{detail}; "
                         f"install it with: pip install {package}")
        self.package = package


def require(module: str, package: str | None = None, needed_for: str = "this step"):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package or module, needed_for, e) from e
