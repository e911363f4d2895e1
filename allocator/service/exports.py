"""Export targets the service can run as jobs (``POST /v1/exports``), registered by name.

A target is a function ``run(plan, out_dir, *, model, **options)`` that writes an engine's
files into the empty folder ``out_dir`` (one file there becomes the artifact as it is; more
become one tar). It is named by an import path ``"module:function"`` because it runs in a
worker process, not in the server. Targets come from three places:

* :data:`BUILTIN` (an export module of bitalloc adds its line here once it exists, e.g.
  ``"gguf": ("bitalloc.allocator.<module>:<function>", "application/octet-stream", ...)``);
  a built-in whose module cannot be imported is simply not offered;
* :func:`register_target` from Python (a plugin imported before the app is built);
* ``bitalloc serve --export-target NAME=module:function`` (repeatable).

Asking for a target that is not registered is a 400 naming ``target`` and listing the ones
this server has.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from bitalloc import BitallocError

__all__ = ["ExportTarget", "register_target", "available_targets", "parse_target_option", "BUILTIN", "TargetError"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_RUN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TargetError(BitallocError, ValueError):
    """An export target is malformed (name or import path)."""


@dataclass(frozen=True)
class ExportTarget:
    name: str
    run: str  # "package.module:function"
    media_type: str = "application/octet-stream"
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise TargetError(f"export target name {self.name!r} must match {_NAME.pattern}")
        if not _RUN.match(self.run):
            raise TargetError(f"export target {self.name!r}: {self.run!r} must look like package.module:function")

    def importable(self) -> bool:
        mod, _, fn = self.run.partition(":")
        try:
            return callable(getattr(importlib.import_module(mod), fn, None))
        except ImportError:
            return False


# name -> (run, media type, description): bitalloc's own export targets (allocator/export.py)
BUILTIN: dict[str, tuple[str, str, str]] = {
    "compressed-tensors": ("bitalloc.allocator.export:service_compressed_tensors", "application/x-tar",
                           "a Hugging Face folder in compressed-tensors pack-quantized format (vLLM, SGLang)"),
    "torchao": ("bitalloc.allocator.export:service_torchao", "application/x-tar",
                "the plan as a torchao FqnToConfig (JSON and Python)"),
    "gguf": ("bitalloc.allocator.export:service_gguf", "application/octet-stream",
             "a GGUF file written by llama.cpp's llama_model_quantize (plans of a --target llamacpp profile)"),
}

_REGISTERED: dict[str, ExportTarget] = {}


def register_target(target: ExportTarget) -> ExportTarget:
    _REGISTERED[target.name] = target
    return target


def parse_target_option(text: str) -> ExportTarget:
    """``NAME=module:function`` (the ``--export-target`` option)."""
    name, sep, run = text.partition("=")
    if not sep:
        raise TargetError(f"--export-target {text!r} must look like NAME=package.module:function")
    t = ExportTarget(name.strip(), run.strip(), description="from --export-target")
    if not t.importable():
        raise TargetError(f"--export-target {text!r}: {t.run} cannot be imported or is not a function")
    return t


def available_targets(extra: list[ExportTarget] | None = None) -> dict[str, ExportTarget]:
    out = {}
    for name, (run, media, desc) in BUILTIN.items():
        t = ExportTarget(name, run, media, desc)
        if t.importable():
            out[name] = t
    out.update(_REGISTERED)
    for t in extra or ():
        out[t.name] = t
    return out
