"""``bitalloc export PLAN --to TARGET --out DIR``: turn a plan into a serving engine's files.

A small registry maps each target name to the module that implements it (one module per
target, engines stay at the edge of the package). Adding a target is one line in
:data:`TARGETS` plus its module, which provides::

    DESCRIPTION: str                          # one line for --help
    FALLBACKS: tuple[str, ...]                # values --fallback accepts for this target
    def export(req: ExportRequest, stage: Path) -> dict   # writes into `stage`, returns its report

This module owns what every target shares: loading and checking the plan, the output
directory (written into a temporary directory beside ``--out``, renamed into place only
when complete, so nothing half-written is ever left under the output name; an existing
non-empty directory is refused unless ``--overwrite``), the plan copy kept beside the
files for provenance (``bitalloc-plan.json``), the export report
(``bitalloc-export.json``: schema, bitalloc version, plan sha256, options, the target's
report) and the CLI glue.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import BitallocError
from .plan import Plan, PlanError

__all__ = ["TARGETS", "ExportError", "ExportRequest", "export", "add_parser", "cmd_export", "staged_dir",
           "EXPORT_SCHEMA", "PLAN_COPY", "REPORT_NAME"]

EXPORT_SCHEMA = "bitalloc.export/1"
PLAN_COPY = "bitalloc-plan.json"
REPORT_NAME = "bitalloc-export.json"

# target name -> module (relative to this package) implementing it; one line per target
TARGETS: dict[str, str] = {
    "compressed-tensors": ".export_ct",
    "torchao": ".export_torchao",
}
# llama.cpp targets (allocator/llamacpp.py): --out is the .gguf file itself (gguf) or a folder
# with the tensor-type file, the imatrix and the llama-quantize command line (llama-quantize)
LLAMACPP_TARGETS = ("gguf", "llama-quantize")


class ExportError(BitallocError, ValueError):
    """A plan cannot be exported to a target (unknown target, inexpressible scheme, bad output)."""


@dataclass(frozen=True)
class ExportRequest:
    """What a target handler gets: the plan, the model spec to load (None: the plan's) and the options."""

    plan: Plan
    target: str
    out: Path  # the final output directory (handlers write into the stage directory they are given)
    model: Any = None  # a model spec, None (the plan's), or an already loaded model (bitalloc.load(...))
    fallback: tuple[str, ...] = ()
    plan_path: Path | None = None
    log: Callable[[str], None] = field(default=print, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.plan, Plan):
            raise ExportError(f"plan must be a Plan, got {type(self.plan).__name__}")
        if self.target not in TARGETS:
            raise ExportError(f"unknown export target {self.target!r}; targets: {', '.join(TARGETS)}")
        object.__setattr__(self, "fallback", tuple(self.fallback))

    @property
    def model_spec(self) -> str:
        if self.model is not None and not isinstance(self.model, str):
            return str(getattr(self.model, "spec", "?"))  # an already loaded model (LoadedModel)
        spec = self.model or self.plan.model.get("spec")
        if not isinstance(spec, str) or not spec:
            raise ExportError("the plan names no model (model.spec); pass --model SPEC")
        return spec


def _handler(target: str):
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; targets: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[target], __package__)


def _check_fallback(target: str, fallback, mod) -> tuple[str, ...]:
    allowed = tuple(getattr(mod, "FALLBACKS", ()))
    out = []
    for f in fallback or ():
        for part in str(f).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in allowed:
                raise ExportError(f"--fallback {part!r} is not one of {', '.join(allowed) or '(none)'} for target {target}")
            out.append(part)
    return tuple(dict.fromkeys(out))


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s or type(e).__name__


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, *, overwrite: bool = False):
    """Yield a fresh temporary directory beside ``out``; on success it becomes ``out``.

    ``out`` may not exist or be an empty directory; a non-empty one is refused unless
    ``overwrite`` (then it is replaced, only after the new one is complete). On any error
    the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output directory {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write to {str(parent)!r}: {e.strerror or _one_line(e)}") from None
    old = None
    try:
        yield stage
        if out.is_dir():
            if any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
                os.rmdir(old)
                os.replace(out, old)
            else:
                os.rmdir(out)
        os.replace(stage, out)
    except OSError as e:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous export back
            old = None
        shutil.rmtree(stage, ignore_errors=True)
        raise ExportError(f"cannot write the export to {str(out)!r}: {e.strerror or _one_line(e)}") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    try:
        from bitalloc import __version__

        return str(__version__)
    except Exception:  # noqa: BLE001 - a checkout without metadata
        return "unknown"


def export(plan: Plan | str | os.PathLike, to: str, out: str | os.PathLike, *, model: Any = None,
           fallback=(), overwrite: bool = False, log: Callable[[str], None] | None = print) -> dict:
    """Export ``plan`` for target ``to`` into the directory ``out``; returns the export report.

    ``model``: the model spec to read weights/tokenizer from (default: the plan's), or a model
    already loaded with ``bitalloc.load`` (not modified);
    ``fallback``: what to do with layers the target cannot express (target-specific values,
    see each target's ``FALLBACKS``); ``overwrite``: replace a non-empty ``out``.
    """
    from bitalloc.sensitivity.artifact import file_sha256, write_json

    mod = _handler(to)
    fallback = _check_fallback(to, fallback, mod)
    plan_path = None
    if not isinstance(plan, Plan):
        plan_path = Path(plan)
        try:
            plan = Plan.load(plan_path)
        except PlanError as e:
            raise ExportError(_one_line(e)) from None
    req = ExportRequest(plan=plan, target=to, out=Path(out), model=model, fallback=fallback, plan_path=plan_path,
                        log=log or (lambda _m: None))
    with staged_dir(out, overwrite=overwrite) as stage:
        report = mod.export(req, stage)
        plan.save(stage / PLAN_COPY)
        envelope = {
            "schema": EXPORT_SCHEMA,
            "target": to,
            "bitalloc_version": _version(),
            "plan": {"file": PLAN_COPY, "sha256": file_sha256(stage / PLAN_COPY),
                     "source": str(plan_path) if plan_path else None,
                     "source_sha256": file_sha256(plan_path) if plan_path else None,
                     "label": plan.label, "predicted_quantized_bytes": plan.quantized_bits // 8},
            "options": {"model": req.model_spec if getattr(mod, "NEEDS_MODEL", True) or req.model is not None else None,
                        "fallback": list(fallback), "overwrite": bool(overwrite)},
            "report": report,
        }
        write_json(stage / REPORT_NAME, envelope, indent=1)
    return envelope


# ---------------------------------------------------------------------------------------
# CLI glue (allocator/cli.py calls add_parser and dispatches "export" to cmd_export)


def add_parser(sub) -> Any:
    names = [*TARGETS, *LLAMACPP_TARGETS]
    sp = sub.add_parser("export", help="write a plan as a serving engine's files (" + ", ".join(names) + ")")
    sp.add_argument("plan", help="a plan JSON written by `bitalloc solve` (gguf / llama-quantize: from a "
                                 "--target llamacpp profile)")
    sp.add_argument("--to", required=True, metavar="TARGET", help="export target: " + ", ".join(names))
    sp.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite); "
                                                 "--to gguf: the .gguf file")
    sp.add_argument("--imatrix", default=None,
                    help="gguf / llama-quantize: the plan's imatrix file, if it moved (default: the recorded path)")
    sp.add_argument("--model", default=None, help="model spec to take the weights from (default: the plan's)")
    sp.add_argument("--fallback", action="append", default=[],
                    help="what to do with layers the target cannot express (target-specific, e.g. fp16, "
                         "weight-only; comma-separated or repeated; default: an error naming the layer)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return sp


def _cmd_llamacpp(a) -> int:
    from . import llamacpp

    plan = Plan.load(a.plan)
    if a.to == "gguf":
        r = llamacpp.export_gguf(plan, a.out, model=a.model, imatrix_path=a.imatrix)
        ok = "= the plan's prediction" if r["bytes"] == r["predicted"] else f"(plan predicted {r['predicted']})"
        print(f"GGUF {r['bytes']} bytes {ok} -> {r['path']}")
    else:
        r = llamacpp.export_llama_quantize(plan, a.out, model=a.model, imatrix_path=a.imatrix)
        print(f"{r['tensors']} tensor types -> {r['tensor_type_file']}\nrun:\n{r['command']}")
    return 0


def cmd_export(a) -> int:
    if a.to in LLAMACPP_TARGETS:
        return _cmd_llamacpp(a)
    log = (lambda _m: None) if getattr(a, "quiet", False) else print
    env = export(a.plan, a.to, a.out, model=a.model, fallback=a.fallback, overwrite=a.overwrite, log=log)
    summary = env["report"].get("summary_lines") or []
    for line in summary:
        print(line)
    print(f"{a.to} export -> {a.out}")
    return 0


# ---------------------------------------------------------------------------------------
# the allocation service's export jobs (allocator/service/exports.py BUILTIN): each writes
# into the empty folder it is given; options are the target's (``fallback`` for the registry
# targets, ``imatrix_path`` for the llama.cpp ones)


def _fallbacks(fallback) -> tuple[str, ...]:
    """A request's ``fallback`` option: "fp16" or "fp16,weight-only" (request options are scalars)."""
    return tuple(x.strip() for x in fallback.split(",") if x.strip()) if isinstance(fallback, str) else tuple(fallback)


def service_compressed_tensors(plan: Plan, out_dir, *, model=None, fallback="") -> dict:
    return export(plan, "compressed-tensors", out_dir, model=model, fallback=_fallbacks(fallback), overwrite=True,
                  log=None)


def service_torchao(plan: Plan, out_dir, *, model=None, fallback="") -> dict:
    return export(plan, "torchao", out_dir, model=model, fallback=_fallbacks(fallback), overwrite=True, log=None)


def service_gguf(plan: Plan, out_dir, *, model=None, imatrix_path=None) -> dict:
    from . import llamacpp

    return llamacpp.export_gguf(plan, Path(out_dir) / "model.gguf", model=model, imatrix_path=imatrix_path)
