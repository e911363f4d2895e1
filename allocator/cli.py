"""The ``bitalloc`` command line: a thin layer over ``allocator.api``.

Bad input exits with code 2 and one line ``bitalloc: error: <reason>``; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import BitallocError
from .cli_args import build_parser

__all__ = ["main", "build_parser"]


def _kv(items: list[str] | None, what: str) -> list[tuple[str, str]]:
    """Every PATTERN=SCHEME of a repeatable flag, in order (repeats accumulate)."""
    from bitalloc.sensitivity.patterns import check_pattern

    out = []
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise _UsageError(f"{what} {it!r} must look like PATTERN=SCHEME")
        out.append((check_pattern(k.strip(), what, error=_UsageError), v.strip()))
    return out


def _pins(items: list[str] | None) -> dict[str, str]:
    pins: dict[str, str] = {}
    for k, v in _kv(items, "--pin"):
        if pins.get(k, v) != v:
            raise _UsageError(f"--pin {k}: pinned to both {pins[k]!r} and {v!r}; give one scheme per pattern")
        pins[k] = v
    return pins


def _patterns(items: list[str] | None, what: str) -> list[str]:
    from bitalloc.sensitivity.patterns import check_pattern

    return [check_pattern(x, what, error=_UsageError) for x in items or []]


def _cmd_profile(a) -> int:
    from bitalloc.sensitivity.artifact import check_output
    from bitalloc.sensitivity.profile_config import ProfileConfig

    from . import api
    from .config import default_ref_schemes

    if a.target == "llamacpp" and a.max_memory is not None:
        raise _UsageError("--max-memory (block streaming) is for the bitalloc target; the llama.cpp target reads a GGUF")
    if a.target == "llamacpp":  # ggml's types and quantizer: settings are checked by the llama.cpp target
        check_output(a.out, inputs=[a.calib, a.model], overwrite=a.overwrite, what="--out")
        prof = api.profile(a.model, target="llamacpp", imatrix=not a.no_imatrix, out=a.out, progress=not a.quiet,
                           checkpoint_dir=a.checkpoint_dir, calibration=a.calib, n_samples=a.n_samples,
                           seq_len=a.seq_len, seed=a.seed, kl_samples=a.metric_samples, kl_stride=a.kl_stride,
                           schemes=a.schemes, ref_schemes=a.ref_schemes, include=a.include, exclude=a.exclude,
                           measured=a.measured, workers=a.workers, ray_address=a.ray_address)
        print(f"profile: {len(prof.layers)} layers x {len(prof.schemes)} schemes (llama.cpp target) -> {a.out}")
        return 0
    # every setting checked, and the output, before the model is loaded
    cfg = ProfileConfig(
        schemes=tuple(a.schemes), ref_schemes=tuple(a.ref_schemes or default_ref_schemes(a.schemes)),
        include=tuple(_patterns(a.include, "--include")), exclude=tuple(_patterns(a.exclude, "--exclude")),
        calibration=a.calib, n_samples=a.n_samples, seq_len=a.seq_len, seed=a.seed, kl_samples=a.metric_samples,
        kl_stride=a.kl_stride, measured=a.measured, workers=a.workers, ray_address=a.ray_address,
        saliency=a.saliency, quantizer=a.quantizer, pairs=a.pairs,
        pair_schemes=tuple(a.pair_schemes) if a.pair_schemes else None, pair_ref=a.pair_ref,
        ref_method=a.ref_method, fisher_table=a.fisher_table, fisher_labels=a.fisher_labels,
        measure_every=a.measure_every, max_memory=a.max_memory)
    if a.calib != "generated" and not Path(a.calib).is_file():
        raise _UsageError(f"--calib {a.calib!r}: no such file (give a text file or 'generated')")
    if a.checkpoint_dir is not None and not (a.measured or a.workers or a.ray_address or os.environ.get("RAY_ADDRESS")
                                             or a.max_memory is not None):
        raise _UsageError("--checkpoint-dir is for the measured profile (--measured), a profile on Ray "
                          "(--workers, --ray-address) or a streamed one (--max-memory)")
    check_output(a.out, inputs=[a.calib, a.model], overwrite=a.overwrite, what="--out")
    prof = api.profile(a.model, config=cfg, out=a.out, progress=not a.quiet, checkpoint_dir=a.checkpoint_dir)
    how = ""
    if a.measured:
        m = prof.metadata.get("measure", {})
        how = f" (measured, {m.get('mode')}: {m.get('computed')} computed, {m.get('resumed')} from the checkpoint)"
    print(f"profile: {len(prof.layers)} layers x {len(prof.schemes)} schemes{how} -> {a.out}")
    return 0


def _solve_kw(a) -> dict:
    forbid: dict[str, list[str]] = {}
    for k, v in _kv(a.forbid, "--forbid"):  # repeated flags accumulate
        if v not in forbid.setdefault(k, []):
            forbid[k].append(v)
    kw = dict(method=a.method, backend=a.backend, time_limit_s=a.time_limit, schemes=a.schemes,
              pins=_pins(a.pin), forbid=forbid, group_norm=a.group_norm,
              group_weights=_group_numbers(a.group_weight, "--group-weight"),
              group_limits=_group_numbers(a.group_limit, "--group-limit"),
              group_shares=_group_numbers(a.group_share, "--group-share"))
    if a.target:
        kw["target"] = a.target
    if getattr(a, "table", "profile") != "profile":
        kw["table"] = a.table
    return kw


def _group_numbers(items: list[str] | None, what: str) -> dict[str, float] | None:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        try:
            if not sep or not k.strip():
                raise ValueError
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"{what} {it!r} must look like GROUP=NUMBER") from None
    return out or None


def _cmd_solve(a) -> int:
    from bitalloc.sensitivity.artifact import check_output

    from . import api
    from .report import plan_table

    kw = _solve_kw(a)
    check_output(a.out, inputs=[a.profile, *_sidecars(a.profile)], overwrite=a.overwrite, what="--out")
    if a.server:
        from .service.cli_remote import solve_remote

        plan = solve_remote(a, kw)
    else:
        plan = api.solve(a.profile, a.budget, **kw)
        plan.save(a.out)
    print(plan_table(plan))
    print(f"plan -> {a.out}")
    return 0


def _cmd_sweep(a) -> int:
    from . import api
    from .report import format_table

    from bitalloc.sensitivity.artifact import OutputError, check_output

    from .budget import parse_budget

    kw = _solve_kw(a)
    check_output(a.out_dir, inputs=[a.profile], overwrite=True, what="--out-dir", directory=True)
    inputs = [a.profile, *_sidecars(a.profile)]
    for b in a.budgets:  # existing plans are the user's: refused before any solve
        name = parse_budget(b).to_dict().get("text") or b
        check_output(Path(a.out_dir) / f"plan-{name.replace(':', '_')}.json", inputs=inputs, overwrite=a.overwrite,
                     what="sweep plan")
    prof = api.load_profile(a.profile)
    rows, failed = [], []
    for b in a.budgets:
        try:
            plan = api.solve(prof, b, profile_path=a.profile, **kw)
        except OutputError:
            raise
        except ValueError as e:  # report, keep going: the other budgets are still worth having
            failed.append(f"{b}: {str(e).splitlines()[0]}")
            rows.append({"budget": b, "status": "infeasible" if "below the smallest" in str(e) else "error"})
            continue
        path = Path(a.out_dir) / f"plan-{plan.budget.get('text', b).replace(':', '_')}.json"
        plan.save(path)
        p = plan.predicted
        rows.append({"budget": plan.budget.get("text"), "bpw": p["bpw"], "MB": p["quantized_bytes"] / 1e6,
                     "total_MB": p["total_bytes"] / 1e6, "loss": p["loss_total"], "status": plan.solver["status"],
                     "time": plan.solver["solve_time_s"], "plan": str(path)})
    print(format_table(rows, (("budget", "budget", ""), ("bpw", "bpw", ".4f"), ("MB", "layers MB", ".3f"),
                              ("total_MB", "total MB", ".3f"), ("loss", "pred. loss", ".5f"),
                              ("status", "status", ""), ("time", "solve s", ".2f"), ("plan", "plan", ""))))
    if failed:
        raise ValueError(f"{len(failed)} budget(s) failed; " + "; ".join(failed))
    return 0


def _cmd_apply(a) -> int:
    from . import api
    from .executor import packed_weight_bytes
    from .quantized_io import save_quantized
    from .plan import Plan

    from bitalloc.sensitivity.artifact import check_output

    plan = Plan.load(a.plan)
    check_output(a.out, inputs=[a.plan, a.model, a.hessians], overwrite=a.overwrite, what="--out", directory=True)
    loaded = api.load(a.model)
    qmodel = api.apply(loaded, plan, hessians=a.hessians)
    out = save_quantized(qmodel, plan, a.out, spec=a.model, overwrite=a.overwrite)
    print(f"quantized {len(plan.layers)} layers: packed weights {packed_weight_bytes(qmodel, plan)} bytes "
          f"(plan predicts {plan.quantized_bits // 8}) -> {out}")
    return 0


def _eval_gguf(a) -> int:
    from bitalloc.sensitivity.ggml import model_gguf_path

    from . import llamacpp
    from .evaluate import windows_from_file
    from .report import format_table

    if a.plan:
        raise ValueError("give either --plan (torch evaluation) or --gguf (llama.cpp), not both")
    if a.text == "generated":
        raise ValueError("--gguf needs --text FILE (llama.cpp scores the same text windows)")
    for g in a.gguf:  # before the tokenizer loads
        if not Path(g).is_file():
            raise ValueError(f"GGUF file {g!r} does not exist")
    from transformers import AutoTokenizer

    src = model_gguf_path(a.model) if a.model else Path(a.gguf[0])  # a GGUF carries its own tokenizer
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    windows = windows_from_file(tok, a.text, a.seq_len, a.windows)
    rows = llamacpp.compare_files(a.gguf, windows)
    for r in rows[1:]:
        c = r.get("vs_first")
        r["vs"] = None if c is None else f"{c['ratio']:.4f} [{c['lo']:.4f}, {c['hi']:.4f}] {c['a_wins']}/{c['windows']}"
    cols = (("model", "GGUF", ""), ("bytes", "file bytes", "d"), ("ppl", "ppl (llama.cpp)", ".4f"), ("tokens", "tokens", "d"))
    paired = any(r.get("vs") for r in rows)
    print(format_table(rows, cols + ((("vs", "ppl / first file's [95 % interval] windows lower", ""),) if paired else ())))
    print(f"({a.windows} windows x {a.seq_len} tokens from {a.text}" + (
        "; the ratio is paired over windows, its interval from 10,000 bootstrap resamples: an interval holding 1 "
        "means these windows do not tell the files apart)" if paired else ")"))
    return 0


def _cmd_eval(a) -> int:
    from . import api
    from .plan import Plan
    from .report import format_table

    if a.gguf:
        return _eval_gguf(a)
    plans = {}
    for path in a.plan:
        pl = Plan.load(path)
        plans[f"{Path(path).stem}"] = pl
    saved_bpw = {Path(d).name: Plan.load(Path(d) / "plan.json").bpw for d in a.quantized
                 if (Path(d) / "plan.json").is_file()}
    model = a.model or next(filter(None, map(api.saved_model_spec, a.quantized)), None) or "smollm2"
    res = api.evaluate(model, plans, quantized=a.quantized, text=a.text, n_windows=a.windows, seq_len=a.seq_len,
                       progress=not a.quiet)
    rows = []
    for k, r in res.items():
        bpw = plans[k].bpw if k in plans else saved_bpw.get(k, 16.0)
        rows.append({"model": k, "bpw": bpw, "ppl": r.ppl, "kl": r.kl, "top1": r.top1_agree, "tokens": r.tokens})
    print(format_table(rows, (("model", "model", ""), ("bpw", "bpw", ".3f"), ("ppl", "ppl", ".3f"),
                              ("kl", "KL", ".4f"), ("top1", "top-1", ".3f"), ("tokens", "tokens", "d"))))
    print(f"({a.windows} windows x {a.seq_len} tokens from {a.text})")
    return 0


def _cmd_run(a) -> int:
    import dataclasses

    from . import api
    from .config import OutputCfg, load_config

    cfg = load_config(a.config)
    if a.out_dir:
        cfg = dataclasses.replace(cfg, output=OutputCfg(dir=a.out_dir))
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise _UsageError(f"output folder {str(out)!r} exists and is not a directory")
    if (out / "results.json").exists() and not a.overwrite:
        raise _UsageError(f"{str(out)!r} already holds a run's results and plans; pass --overwrite to replace them "
                          "(a matching saved profile there is reused either way)")
    api.run(cfg, progress=not a.quiet)
    return 0


def _sidecars(profile_path) -> list[Path]:
    from bitalloc.sensitivity.profile import sidecar_name

    p = Path(profile_path)
    return [p.with_name(sidecar_name(p))]


def _cmd_serve(a) -> int:
    from .service.server import serve

    return serve(a.host, a.port, state_dir=a.state_dir, workers=a.workers, ray_address=a.ray_address,
                 token_file=a.token_file, db_url=a.db_url, max_body_mb=a.max_body_mb, max_upload_mb=a.max_upload_mb,
                 export_targets=a.export_target, log_level=a.log_level)


def _cmd_export(a) -> int:
    from .export import cmd_export

    return cmd_export(a)


COMMANDS = {"profile": _cmd_profile, "solve": _cmd_solve, "sweep": _cmd_sweep, "apply": _cmd_apply,
            "eval": _cmd_eval, "run": _cmd_run, "serve": _cmd_serve,
            "export": _cmd_export, "peer": lambda a: _cmd_peer(a)}


def _cmd_peer(a) -> int:
    from .cli_peers import cmd_peer

    return cmd_peer(a)


class _UsageError(BitallocError, ValueError):
    """A flag's value is malformed or the flags contradict each other."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _report_bug(e: BaseException) -> str:
    """Write the traceback of an unexpected error to a file; returns its path."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="bitalloc-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    return path


# import name -> pip distribution, where they differ
_PIP_NAMES = {"llama_cpp": "llama-cpp-python", "yaml": "pyyaml", "sklearn": "scikit-learn", "PIL": "pillow",
              "highspy": "highspy", "google": "protobuf"}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # argparse: its one line is printed; in-process callers get the code back
        return e.code if isinstance(e.code, int) else 2
    if a.quiet:  # progress bars of transformers / huggingface_hub too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")  # plain tqdm bars (transformers' GGUF de-quantizing)
        if "transformers" in sys.modules:  # imported already (an in-process call): its flag is read at import
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    if not a.debug:  # import-time notes of optional libraries (torchao's CUDA-only extensions on a CPU
        # machine, torch's deprecations), printed when transformers imports torchao: never the user's to act on
        import logging

        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if getattr(a, "logits_memory", None) is not None:
            from bitalloc.sensitivity.logits import set_logits_memory

            set_logits_memory(a.logits_memory)  # a malformed size is a one-line ValueError
        return COMMANDS[a.cmd](a)
    except KeyboardInterrupt:
        print("bitalloc: interrupted", file=sys.stderr)
        return 130
    except (BitallocError, ValueError, OSError) as e:  # the user's to fix: one line, exit 2
        if a.debug:
            raise
        print(f"bitalloc: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ImportError as e:  # a missing or broken dependency
        if a.debug:
            raise
        name = (getattr(e, "name", None) or "?").split(".")[0]
        print(f"bitalloc: error: a dependency could not be imported ({_one_line(e)}); "
              f"install it with: pip install {_PIP_NAMES.get(name, name)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else is our bug, still one line
        if a.debug:
            raise
        path = _report_bug(e)
        print(f"bitalloc: internal error (a bug in bitalloc, please report it): {type(e).__name__}: {_one_line(e)}; "
              f"traceback written to {path}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
