"""Layer-name patterns, one meaning everywhere (layer selection, plan rules, pins and bans).

Kept free of torch so that light modules (``allocator.plan``) can use it.
"""

from __future__ import annotations

import fnmatch
import re

__all__ = ["match_pattern"]


def match_pattern(pattern: str, fqn: str) -> bool:
    """fnmatch-style glob on the whole fqn, or ``re:<regex>`` (``re.search``: use ^/$ to anchor)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], fqn) is not None
    return fnmatch.fnmatchcase(fqn, pattern)
