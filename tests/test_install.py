"""The installed package: one import name (`bitalloc`) that no other distribution owns, and a
non-editable install that works beside its dependencies from outside the clone."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _top_level(path: str) -> str | None:
    """The import name a RECORD path installs (None for metadata, scripts and data)."""
    first = path.replace("\\", "/").split("/")[0]
    if first.endswith((".dist-info", ".egg-info", ".data")) or first in ("..", "__pycache__", ""):
        return None
    if "/" not in path.replace("\\", "/"):  # a top-level file: a module or a .pth
        return first[:-3] if first.endswith(".py") else None
    return first


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("bitalloc-*.whl")
    return whl


def test_wheel_installs_only_bitalloc(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {t for t in map(_top_level, names) if t}
    assert tops == {"bitalloc"}, f"the wheel installs top-level names {sorted(tops)}"
    assert "bitalloc/__init__.py" in names
    for pkg in ("kernels/formats.py", "sensitivity/profile.py", "solvers/problem.py", "allocator/cli.py"):
        assert f"bitalloc/{pkg}" in names, pkg
    assert not any(n.startswith(("bitalloc/tests/", "bitalloc/experiments/")) for n in names)


def test_no_other_distribution_owns_our_names(wheel):
    """A future clash (like the PyPI `kernels` distribution transformers depends on) fails here,
    not in a user's site-packages."""
    ours = {t for t in map(_top_level, zipfile.ZipFile(wheel).namelist()) if t}
    clashes = {}
    for dist in md.distributions():
        if (dist.metadata["Name"] or "").lower() == "bitalloc":
            continue
        theirs = {t for t in map(_top_level, (str(f) for f in (dist.files or []))) if t}
        if ours & theirs:
            clashes[dist.metadata["Name"]] = sorted(ours & theirs)
    assert not clashes, f"top-level names owned by other distributions: {clashes}"


def test_transformers_gets_its_own_kernels_from_the_repository_root():
    """Run from the clone's root (cwd first on sys.path), `import kernels` must still be the
    PyPI distribution that transformers uses, not our kernels/ folder."""
    code = ("import kernels, bitalloc.kernels.formats as f; "
            "from transformers.integrations import hub_kernels; "
            "print(kernels.__file__); print(f.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs, ours = r.stdout.split()
    assert Path(theirs).resolve().parent != ROOT / "kernels" and "site-packages" in theirs, theirs
    assert Path(ours).resolve() == ROOT / "kernels" / "formats.py"


@pytest.mark.slow
def test_wheel_in_a_fresh_venv(wheel, tmp_path):
    """Non-editable install beside the locked dependencies: pip check is clean, the `kernels`
    distribution's own API still imports, and the CLI runs a tiny profile -> solve from a
    directory outside the clone."""
    # A second torch + triton + transformers install is about 3.4 GB: say so plainly when the
    # disk cannot hold it (pip's own message is a 3,000-line tail ending in ENOSPC).
    free = shutil.disk_usage(tmp_path).free
    if free < FRESH_VENV_BYTES:
        pytest.skip(f"a fresh venv needs about {FRESH_VENV_BYTES / 2**30:.0f} GiB under {tmp_path}; "
                    f"{free / 2**30:.1f} GiB free")
    venv = tmp_path / "venv"
    try:
        _fresh_venv_checks(wheel, venv, tmp_path)
    finally:  # never leave 3.4 GB behind in pytest's kept temp folders
        shutil.rmtree(venv, ignore_errors=True)


FRESH_VENV_BYTES = 6 * 2**30


def _fresh_venv_checks(wheel: Path, venv: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    lock = str(ROOT / "constraints.txt")
    for args in (["torch==2.13.0"], [f"{wheel}[models]"]):
        r = subprocess.run([py, "-m", "pip", "install", "--quiet", "-c", lock, *args],
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    code = ("import kernels, bitalloc; from kernels import get_kernel; "
            "from transformers.integrations import hub_kernels; print(bitalloc.__file__)")
    r = subprocess.run([py, "-c", code], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(venv) in r.stdout and str(ROOT) not in r.stdout, r.stdout
    cli = str(venv / "bin" / "bitalloc")
    assert subprocess.run([cli, "--help"], cwd=work, capture_output=True, timeout=300, env=env).returncode == 0
    r = subprocess.run([cli, "--quiet", "profile", "--model", "random:llama-tiny", "--n-samples", "2", "--seq-len", "16",
                        "--kl-samples", "1", "--schemes", "w2g64z,w4g128z", "--out", "p.json"],
                       cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([cli, "solve", "p.json", "--budget", "3bpw", "--out", "plan.json"],
                       cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "plan.json").is_file()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_dependency_direct_and_transitive():
    """Every distribution bitalloc[models,test] needs, recursively, has an exact pin in
    constraints.txt, and the installed version is the pinned one (a new dependency added
    without refreshing the lock fails here)."""
    from packaging.requirements import Requirement

    pins = _pins()
    seen, todo, missing, wrong = set(), [("bitalloc", {"models", "test"})], [], []
    while todo:
        name, extras = todo.pop()
        dist = md.distribution(name)
        for req in map(Requirement, dist.requires or []):
            env_ok = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))
            if not env_ok:
                continue
            key = _norm(req.name)
            if key in seen:
                continue
            seen.add(key)
            try:
                installed = md.version(req.name)
            except md.PackageNotFoundError:
                continue  # an optional platform-specific requirement not installed here
            if key not in pins:
                missing.append(key)
            elif pins[key].split("+")[0] != installed.split("+")[0]:
                wrong.append(f"{key}: pinned {pins[key]}, installed {installed}")
            todo.append((req.name, set(req.extras)))
    assert not missing, f"not pinned in constraints.txt: {sorted(missing)}"
    assert not wrong, wrong
