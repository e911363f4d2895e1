"""Shared by the benchmark scripts: the WikiText-2 files beside the repository."""

from __future__ import annotations

import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def wikitext_files(data: str | Path = DATA) -> tuple[Path, Path] | None:
    """(validation, test) paths, or None after printing which one is missing."""
    valid, test = Path(data) / "wikitext2-valid.txt", Path(data) / "wikitext2-test.txt"
    for f in (valid, test):
        if not f.is_file():
            print(f"missing {f}: the benchmark needs the WikiText-2 files", file=sys.stderr)
            return None
    return valid, test
