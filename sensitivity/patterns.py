"""Layer-name patterns, one meaning everywhere (layer selection, plan rules, pins and bans).

Kept free of torch so that light modules (``allocator.plan``) can use it.
"""

from __future__ import annotations

import fnmatch
import re

__all__ = ["match_pattern", "check_pattern", "PatternError"]


def match_pattern(pattern: str, fqn: str) -> bool:
    """fnmatch-style glob on the whole fqn, or ``re:<regex>`` (``re.search``: use ^/$ to anchor)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], fqn) is not None
    return fnmatch.fnmatchcase(fqn, pattern)


from .. import BitallocError  # noqa: E402


class PatternError(BitallocError, ValueError):
    """A layer pattern that is not a string, or a ``re:`` pattern that does not compile."""


def check_pattern(pattern, what: str = "pattern", error: type[Exception] | None = None) -> str:
    """``pattern`` if it is a usable glob or a compiling ``re:<regex>``; else one line."""
    error = error or PatternError
    if not isinstance(pattern, str) or not pattern:
        raise error(f"{what}: a layer pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except (re.error, RecursionError, OverflowError) as e:
            raise error(f"{what}: {pattern!r} is not a valid regular expression ({e})") from None
    return pattern
