"""Errors shared by several sensitivity modules, in a module of their own so that the
profile artifact and the pieces it validates (pairs, groups) need not import each other."""

from __future__ import annotations

from .. import BitallocError
from .artifact import ArtifactError

__all__ = ["ProfileError", "RunnerError", "CheckpointError"]


class ProfileError(ArtifactError):
    """A profile file or object is invalid; the message names the problem."""


class RunnerError(BitallocError, ValueError):
    """The measured run cannot go on as asked (bad setup, unreachable cluster, ...)."""


class CheckpointError(RunnerError):
    """A checkpoint file belongs to another model or configuration, or is unreadable."""
