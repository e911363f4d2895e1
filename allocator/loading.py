"""Loading a model (rounded to 16-bit values, as every plan is made on) and a profile, for the
API and the modules that run a stored profile's model again (:mod:`.context`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

__all__ = ["load", "load_profile", "as_loaded", "as_profile", "print_line"]


def print_line(msg: str) -> None:
    """The default log of the API functions: one line to stdout, flushed."""
    print(msg, flush=True)


def load(spec: str = "smollm2", *, log: Callable[[str], None] | None = print_line):
    """Load a model by spec (see ``sensitivity.models``), rounded to 16-bit values."""
    from bitalloc.sensitivity.models import load_model, round_to_16bit

    t0 = time.perf_counter()
    loaded = load_model(spec)
    round_to_16bit(loaded.model)
    if log:
        log(f"loaded {spec} in {time.perf_counter() - t0:.1f}s")
    return loaded


def as_loaded(model):
    return load(model) if isinstance(model, str) else model


def load_profile(path: str | Path):
    from bitalloc.sensitivity.profile import SensitivityProfile

    return SensitivityProfile.load(path)


def as_profile(profile):
    return (load_profile(profile), Path(profile)) if isinstance(profile, (str, Path)) else (profile, None)
