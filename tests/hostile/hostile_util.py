"""Helpers of the hostile-input suite: workspace snapshots and the one-line error check."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size > (16 << 20):  # a sparse giant: size and mtime stand for it
            st = p.stat()
            out[str(p.relative_to(root))] = f"{st.st_size}:{st.st_mtime_ns}"
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


def assert_one_error(rc: int, err: str, match: str | None = None) -> str:
    assert rc == 2, f"exit {rc}: {err!r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("bitalloc: error: "), lines[0]
    assert "Traceback" not in err
    if match is not None:
        assert match in lines[0], lines[0]
    return lines[0]


def run_main(args: list[str]) -> int:
    """``bitalloc.allocator.cli.main`` in-process; argparse's SystemExit gives its code."""
    from bitalloc.allocator.cli import main

    try:
        return main(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
