"""The Python API; the CLI is a thin layer over these functions.

    import bitalloc
    prof = bitalloc.profile("smollm2")                      # expensive: once
    plan = bitalloc.solve(prof, "3.5bpw")                   # cheap: per budget
    plans = bitalloc.sweep(prof, ["3bpw", "4bpw"])
    qmodel = bitalloc.apply("smollm2", plan)
    results = bitalloc.evaluate("smollm2", plans, text="wiki.txt")
    bitalloc.run("config.toml")                             # the whole batch pipeline
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .budget import parse_budget
from .config import DEFAULT_KL_SAMPLES, DEFAULT_KL_STRIDE, DEFAULT_SCHEMES, RunConfig, load_config
from .context import add_fisher_table, calibration_spec, selection_fitness
from .loading import as_loaded, as_profile, load, load_profile, print_line
from .plan import Plan
from . import solve as _solve

__all__ = ["load", "profile", "load_profile", "solve", "sweep", "apply", "evaluate", "run", "RunResult",
           "add_fisher_table", "selection_fitness"]


def profile(
    model="smollm2",
    config=None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print_line,
    checkpoint_dir: str | Path | None = None,
    target: str | None = None,
    imatrix: bool = True,
    **settings,
):
    """Profile a model: Hessian proxy for every (layer, scheme), calibrated by measured KL.

    ``config``: a :class:`~bitalloc.sensitivity.profile_config.ProfileConfig`; ``settings``
    (its field names: ``calibration`` "generated" or a text file, ``n_samples``, ``seq_len``,
    ``seed``, ``kl_samples``, ``kl_stride``, ``schemes``, ``ref_schemes``, ``include``,
    ``exclude``, ``measured``, ``workers``, ``ray_address``, ``groups``, ``saliency``,
    ``quantizer``, ``pairs``, ``pair_schemes``, ``pair_ref``, ``max_memory``) override it.
    ``max_memory`` (e.g. ``"1GiB"``): block streaming (:mod:`sensitivity.streaming`) for a
    model directory with safetensors files, a GGUF file or ``smollm2``, which is then never
    loaded whole; per worker with ``workers`` / ``ray_address``; its items are checkpointed
    as the measured ones are (below) and the same call resumes them. Without a config
    the API's defaults apply: ``kl_samples=2``, ``kl_stride=2`` and the 2/3/4-bit reference
    schemes among ``schemes``.

    ``target="llamacpp"``: the llama.cpp target (:mod:`sensitivity.llamacpp`): ggml types
    as candidates (default when ``schemes`` is the default), ggml's own quantizer with the
    profile's Hessian diagonal as importance matrix (``imatrix=False``: none), the whole
    GGUF file as the budget; the imatrix goes beside ``out`` (``<out>.imatrix.gguf``).

    ``groups``: metric groups (:mod:`sensitivity.groups`): each layer's references are
    measured with its group's metric and the profile holds one table per group.

    ``measured=True`` measures every (layer, scheme) end to end instead (the expensive,
    exact table; it becomes the solver's table): in-process by default, on a local Ray
    instance with ``workers=N``, or on an existing cluster with ``ray_address`` (or the
    ``RAY_ADDRESS`` environment variable). Finished items are appended to
    ``<checkpoint_dir>/<out stem>.measure-checkpoint.jsonl`` (default folder: beside
    ``out``; no checkpoint without either), and the same call again resumes from it.
    The Hessians use all calibration rows; the end-to-end KL measurements use the first
    ``kl_samples`` rows (None: all), scored at every ``kl_stride``-th position. Saves to
    ``out`` (JSON, plus its bulk-array sidecar) when given.
    """
    from bitalloc.sensitivity.build import build_profile
    from bitalloc.sensitivity.profile_config import ProfileConfig

    from .config import default_ref_schemes

    if target not in (None, "bitalloc", "llamacpp"):
        raise ValueError(f"target must be 'bitalloc' or 'llamacpp', got {target!r}")
    if target == "llamacpp":
        if config is not None:
            raise ValueError("target='llamacpp' takes keyword settings, not a ProfileConfig")
        g = settings.get
        return _profile_llamacpp(model, g("calibration", "generated"), g("n_samples", 8), g("seq_len", 256),
                                 g("seed", 0), g("kl_samples", DEFAULT_KL_SAMPLES), g("kl_stride", DEFAULT_KL_STRIDE),
                                 g("schemes", DEFAULT_SCHEMES), g("include", ()), g("exclude", ()), g("ref_schemes"),
                                 out, progress, log, imatrix, measured=g("measured", False), workers=g("workers"),
                                 ray_address=g("ray_address"), checkpoint_dir=checkpoint_dir)
    if config is None:
        base = {"kl_samples": DEFAULT_KL_SAMPLES, "kl_stride": DEFAULT_KL_STRIDE, **settings}
        if not base.get("ref_schemes"):  # the 2/3/4-bit defaults among the schemes
            base["ref_schemes"] = default_ref_schemes(base.get("schemes", DEFAULT_SCHEMES))
        cfg = ProfileConfig.from_settings(None, **base)
    else:
        cfg = ProfileConfig.from_settings(config, **settings)
    ray = bool(cfg.workers or cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    items = cfg.measured or ray or cfg.max_memory is not None  # runner items, checkpointed beside out
    if not items and checkpoint_dir is not None:
        raise ValueError("checkpoint_dir is for the measured profile, a profile on Ray or a streamed one "
                         "(measured=True, workers, ray_address or max_memory)")
    if out is not None:  # writable, and not the calibration text, before the expensive part
        from bitalloc.sensitivity.artifact import check_output

        check_output(out, inputs=[cfg.calibration], overwrite=True, what="profile output")
    ckpt = measure_checkpoint_path(out, checkpoint_dir) if items else None
    if cfg.ray_address:
        from bitalloc.sensitivity.runner import check_ray_address

        check_ray_address(cfg.ray_address)  # before the (long) model load and Hessians
    # max_memory: block streaming reads the model a unit at a time (it is never loaded whole)
    loaded = as_loaded(model) if cfg.max_memory is None else None
    spec = cfg.calibration_spec()
    prof = build_profile(
        loaded if loaded is not None else str(model), cfg, spec, progress=progress, log_fn=log, checkpoint=ckpt,
        round16=True,  # a spec is streamed with bitalloc.load's rounding
        hessians_out=(Path(out).with_suffix(".hessians.safetensors") if out is not None and cfg.quantizer == "gptq" else None),
    )
    prof.metadata["request"] = _request(prof.model["spec"], cfg.schemes, spec, (cfg.kl_samples, cfg.kl_stride), cfg.include,
                                        cfg.exclude, cfg.ref_schemes, measured=cfg.measured, groups=list(cfg.groups) or None,
                                        ref_method=_ref_request(cfg.ref_method, cfg.measure_every),
                                        fisher_table=cfg.fisher_table, fisher_labels=cfg.fisher_labels)
    if out is not None:
        prof.save(out)
    return prof


def _profile_llamacpp(model, calibration, n_samples, seq_len, seed, kl_samples, kl_stride, schemes, include, exclude,
                      ref_schemes, out, progress, log, imatrix, *, measured, workers, ray_address, checkpoint_dir):
    from bitalloc.sensitivity.llamacpp import build_llamacpp_profile, check_request

    cands = None if schemes is None or list(schemes) == list(DEFAULT_SCHEMES) else list(schemes)
    check_request(cands, imatrix, ref_schemes, include, exclude)  # one-line errors before the model loads
    if isinstance(model, str):
        from bitalloc.sensitivity.ggml import gguf_layout, model_gguf_path
        from bitalloc.sensitivity.llamacpp import LlamaCppProfileError

        arch = gguf_layout(model_gguf_path(model))["architecture"]
        if arch != "llama":
            raise LlamaCppProfileError(f"GGUF architecture {arch!r} is not supported by the llama.cpp target "
                                       "(supported: llama)")
    if imatrix and out is None:
        raise ValueError("a llama.cpp profile with an importance matrix needs out= (the imatrix is written beside it)")
    ckpt = measure_checkpoint_path(out, checkpoint_dir) if measured else None
    loaded = as_loaded(model)
    spec = calibration_spec(calibration, n_samples, seq_len, seed)
    prof = build_llamacpp_profile(
        loaded, cands, imatrix=imatrix, imatrix_out=Path(out).with_suffix(".imatrix.gguf") if imatrix else None,
        ref_schemes=list(ref_schemes) if ref_schemes else None, include=include, exclude=exclude, calibration=spec,
        progress=progress, kl_samples=kl_samples, kl_stride=kl_stride, log_fn=log, measured=measured, workers=workers,
        ray_address=ray_address, checkpoint=ckpt)
    prof.metadata["request"] = _request(loaded.spec, prof.schemes, spec, (kl_samples, kl_stride), include, exclude,
                                        prof.ref_schemes, measured=measured) | {"target": "llamacpp",
                                                                               "imatrix": bool(imatrix)}
    if out is not None:
        prof.save(out)
    return prof


def measure_checkpoint_path(out: str | Path | None, checkpoint_dir: str | Path | None = None) -> Path | None:
    """Where a measured profile keeps its checkpoint: ``<dir>/<out stem>.measure-checkpoint.jsonl``
    (dir: ``checkpoint_dir``, else the folder of ``out``; None when neither is given)."""
    if checkpoint_dir is None and out is None:
        return None
    stem = Path(out).stem if out is not None else "profile"
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else Path(out).parent
    return folder / f"{stem}.measure-checkpoint.jsonl"


def _ref_request(method: str, every: int) -> str:
    return f"hybrid:{every}" if method == "hybrid" else method


def _request(spec, schemes, calib, kl_samples, include, exclude, ref_schemes, measured: bool = False, groups=None,
             ref_method: str = "measured", fisher_table: bool = False, fisher_labels: str = "sampled") -> dict:
    """What a profile was asked for; a saved profile is reused only for the same request."""
    req = {"spec": spec, "schemes": list(schemes), "calibration": calib.describe(), "kl_samples": kl_samples,
           "include": list(include), "exclude": list(exclude), "ref_schemes": list(ref_schemes)}
    if measured:
        req["table"] = "measured"
    if ref_method != "measured":
        req["ref_method"] = ref_method
    if fisher_table:
        req["fisher_table"] = True
    if fisher_labels != "sampled" and (fisher_table or ref_method != "measured"):
        req["fisher_labels"] = fisher_labels
    if groups:
        from bitalloc.sensitivity.groups import parse_groups

        req["groups"] = {g.name: g.describe() for g in parse_groups(list(groups) if isinstance(groups, tuple) else groups)}
    return req


def solve(profile, budget, *, table: str | None = None, **kw) -> Plan:
    """A plan for one budget (``3.5bpw``, ``120MB``, ``layers:90MB``). See bitalloc.solve.solve.
    ``table``: solve on that candidate calibration of the profile (default: its own table)."""
    from .candidates import tagged, with_table

    prof, path = as_profile(profile)
    return tagged(_solve.solve(with_table(prof, table), budget, profile_path=kw.pop("profile_path", path), **kw), table)


def sweep(profile, budgets: Sequence, *, table: str | None = None, **kw) -> list[Plan]:
    from .candidates import tagged, with_table

    prof, path = as_profile(profile)
    plans = _solve.sweep(with_table(prof, table), budgets, profile_path=kw.pop("profile_path", path), **kw)
    return [tagged(p, table) for p in plans]


def apply(model, plan: Plan | str | Path, *, inplace: bool = False, check_fingerprint: bool = True, hessians=None):
    """The model with the plan's layers quantized and packed (QuantLinear).

    ``hessians`` (a GPTQ plan needs them): ``fqn -> H`` or a file from
    :func:`sensitivity.hessian_store.save_hessians`."""
    from bitalloc.sensitivity.models import fingerprint

    from .executor import apply as _apply

    from bitalloc.sensitivity.models import LoadedModel

    loaded = as_loaded(model)
    # the type, not a .model attribute: a bare transformers causal LM has one too (its base model)
    net = loaded.model if isinstance(loaded, LoadedModel) else loaded
    plan = Plan.load(plan) if isinstance(plan, (str, Path)) else plan
    fp = fingerprint(net) if check_fingerprint else None
    return _apply(net, plan, inplace=inplace, fingerprint=fp, hessians=hessians)


EVAL_SEED = 1234  # the generated evaluation text's seed (the calibration's default is 0)


def eval_windows(loaded, text: str = "generated", n_windows: int = 8, seq_len: int = 256, seed: int = EVAL_SEED):
    """Evaluation windows: a text file, or held-out text generated with another seed."""
    from .evaluate import windows_from_file

    if text == "generated":
        from bitalloc.sensitivity.calibration import load_calibration

        return load_calibration(calibration_spec(text, n_windows, seq_len, seed), loaded.model, loaded.tokenizer), {
            "source": "generated", "seed": seed, "n_windows": n_windows, "seq_len": seq_len}
    return windows_from_file(loaded.tokenizer, text, seq_len, n_windows), {
        "source": str(text), "n_windows": n_windows, "seq_len": seq_len}


def _sample_texts_together(loaded, cfg: RunConfig) -> None:
    """A run that profiles samples its generated calibration and evaluation text in one decode
    pass (:func:`~sensitivity.calibration.prefetch_generated`): about 20 s less on 2 cores."""
    from bitalloc.sensitivity.calibration import prefetch_generated

    c, e = cfg.calibration, cfg.eval
    if c.source == "generated" and e.text == "generated" and loaded.kind == "causal-lm":
        prefetch_generated(loaded.model, loaded.tokenizer,
                           [calibration_spec(c.source, c.n_samples, c.seq_len, c.seed),
                            calibration_spec(e.text, e.n_windows, e.seq_len, EVAL_SEED)])


def evaluate(model, plans: Sequence[Plan] | Mapping[str, Plan] = (), *, quantized: Sequence[str | Path] = (),
             text: str = "generated", n_windows: int = 8, seq_len: int = 256, batch_size: int | None = None,
             progress: bool = True):
    """Perplexity and KL against the 16-bit model for each plan (and the 16-bit model itself).

    ``quantized``: folders written by :func:`bitalloc.save_quantized`, loaded from disk and
    scored against ``model`` under their folder name (a plan for another model is a
    :class:`~allocator.plan.PlanError`)."""
    loaded = as_loaded(model)
    windows, _ = eval_windows(loaded, text, n_windows, seq_len)
    if not isinstance(plans, Mapping):
        plans = {(p.label or f"plan{i}"): p for i, p in enumerate(plans)}
    from .evaluate import evaluate_plans, load_saved_models

    saved = load_saved_models(loaded, quantized)
    return evaluate_plans(loaded, plans, windows, models=saved, batch_size=batch_size, progress=progress)


def saved_model_spec(path: str | Path) -> str | None:
    """The model spec a saved quantized folder was made from (None when unreadable)."""
    try:
        spec = json.loads((Path(path) / "quantized.json").read_text()).get("spec")
    except (OSError, ValueError, AttributeError):
        return None
    return spec if isinstance(spec, str) else None


@dataclass
class RunResult:
    rows: list[dict]
    out_dir: Path
    plans: dict[str, Path] = field(default_factory=dict)
    table: str = ""
    plot: Path | None = None
    timings: dict = field(default_factory=dict)


def _row(budget: str, method: str, plan: Plan, res) -> dict:
    p = plan.predicted
    return {
        "budget": budget, "method": method, "label": plan.label, "bpw": p["bpw"],
        "quantized_MB": p["quantized_bytes"] / 1e6, "total_MB": p["total_bytes"] / 1e6,
        "ppl": res.ppl, "kl": res.kl, "top1_agree": res.top1_agree, "predicted_loss": p["loss_total"],
        "solver_status": plan.solver.get("status"), "solve_time_s": plan.solver.get("solve_time_s"),
    }


def run(config: RunConfig | str | Path | None = None, *, progress: bool = True,
        log: Callable[[str], None] | None = print_line) -> RunResult:
    """The whole batch pipeline: profile (or reuse a matching saved one), sweep budgets,
    baselines, evaluation in one pass, table, plot and plans in the output folder."""
    from .report import RESULT_COLUMNS, format_table, plot_ppl_vs_bpw, write_results
    from . import baselines

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    log = log or (lambda m: None)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    from bitalloc.sensitivity.artifact import write_json

    write_json(out / "config.json", cfg.to_dict(), indent=1)
    if cfg.eval.logits_memory:  # the profile's and the evaluation's logit-sized buffers (and Ray workers')
        from bitalloc.sensitivity.logits import set_logits_memory

        set_logits_memory(cfg.eval.logits_memory)
    timings = {}
    t_all = time.perf_counter()

    loaded = load(cfg.model.spec, log=log)
    prof_path = out / "profile.json"
    prof = _reuse_profile(prof_path, cfg, log, loaded.kind)
    llamacpp = cfg.profile.target == "llamacpp"
    if prof is None:
        t0 = time.perf_counter()
        _sample_texts_together(loaded, cfg)
        if llamacpp:
            p, c = cfg.profile, cfg.calibration
            prof = profile(loaded, target="llamacpp", imatrix=p.imatrix, out=prof_path, progress=progress, log=log,
                           calibration=c.source, n_samples=c.n_samples, seq_len=c.seq_len, seed=c.seed,
                           kl_samples=c.kl_samples, kl_stride=c.kl_stride, schemes=p.schemes, include=p.include,
                           exclude=p.exclude, ref_schemes=p.ref_schemes or None,
                           measured=p.measured, workers=p.workers or None, ray_address=p.ray_address or None)
        else:
            prof = profile(loaded, cfg.profile_config(loaded.kind), out=prof_path, progress=progress, log=log)
        timings["profile_s"] = time.perf_counter() - t0
        log(f"profile: {len(prof.layers)} layers x {len(prof.schemes)} schemes in {timings['profile_s']:.1f}s -> {prof_path}")

    t0 = time.perf_counter()
    entries: list[tuple[str, str, Plan]] = []  # (budget, method, plan)
    plan_paths = {}
    fitness = None
    if cfg.fisher_settings(loaded.kind)[2] and prof.fisher is not None:
        fitness = selection_fitness(loaded, prof, cfg.solve.select_rows, screen_rows=cfg.solve.select_screen,
                                    metric=cfg.solve.select_metric)
    for b in cfg.solve.budgets:
        bname = parse_budget(b).name
        extra = {"target": cfg.solve.target} if cfg.solve.target else {}
        kw = dict(method=cfg.solve.method, backend=cfg.solve.backend, profile_path=prof_path,
                  policy=cfg.group_policy(), **extra)
        if fitness is not None:
            from .candidates import select_plan

            plan = select_plan(prof, b, fitness, refine=cfg.solve.refine, ties=cfg.solve.select_ties,
                               screen=fitness.screen, keep=cfg.solve.select_keep, **kw)
            sel = plan.solver["select"]
            log(f"{bname}: {sel['chosen']} chosen among {sel['distinct_plans']} plans "
                f"({', '.join(f'{k} {v:.4f}' for k, v in sel['fitness'].items())}) in {sel['seconds']:.1f}s")
            r = sel.get("refine")
            if r and "skipped" not in r:
                log(f"{bname}: refined {r['fitness_start']:.4f} -> {r['fitness']:.4f} in {r['evaluations']} "
                    f"measurements ({r['moves']} moves, {r['seconds']:.1f}s)")
        else:
            plan = _solve.solve(prof, b, **kw)
        entries.append((bname, "bitalloc", plan))
        if cfg.eval.baselines and llamacpp:
            log(f"baselines skipped at {bname}: the llama.cpp target's references are llama.cpp's presets "
                "(experiments/llamacpp_benchmark.py)")
        elif cfg.eval.baselines:
            entries.append((bname, "uniform", baselines.nearest_uniform(prof, b)))
            try:
                entries.append((bname, "rule-mix", baselines.rule_mix(prof, b)))
            except ValueError as e:
                log(f"rule mix skipped at {bname}: {e}")
    fitness = None  # the selection's quantized weights and reference go before the evaluation
    for bname, method, plan in entries:
        p = out / "plans" / f"{method}-{bname.replace(':', '_')}.json"
        plan.save(p)
        plan_paths[f"{method}@{bname}"] = p
    timings["solve_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    windows, wdesc = eval_windows(loaded, cfg.eval.text, cfg.eval.n_windows, cfg.eval.seq_len)
    # identical plans (e.g. one uniform baseline at several budgets) are evaluated once there
    keyed = {f"{method}@{bname}": plan for bname, method, plan in entries}
    from .evaluate import evaluate_plans

    results = evaluate_plans(loaded, keyed, windows, progress=progress)
    timings["eval_s"] = time.perf_counter() - t0

    ref = results["fp16"]
    rows = [{"budget": "-", "method": "fp16", "label": "16-bit", "bpw": 16.0, "ppl": ref.ppl, "kl": 0.0,
             "top1_agree": 1.0}]
    rows += [_row(b, m, plan, results[f"{m}@{b}"]) for b, m, plan in entries]
    for r in rows:
        r["eval"] = wdesc
    table = format_table(rows, RESULT_COLUMNS)
    write_results(rows, out)
    plot = plot_ppl_vs_bpw([r for r in rows if r["method"] != "fp16"], out / "ppl_vs_bpw.png",
                           title=f"{cfg.model.spec}: perplexity vs bits per weight", reference_ppl=ref.ppl)
    timings["total_s"] = time.perf_counter() - t_all
    write_json(out / "timings.json", timings, indent=1)
    log("\n" + table)
    log(f"\nplans: {out / 'plans'}   results: {out / 'results.csv'}   plot: {plot}   "
        f"({timings['total_s']:.0f}s in all)")
    return RunResult(rows=rows, out_dir=out, plans=plan_paths, table=table, plot=plot, timings=timings)


def _measured_kw(cfg: RunConfig) -> dict:
    """The measured-profile arguments of a run configuration ([profile] measured/workers/ray_address)."""
    p = cfg.profile
    if not p.measured:
        return {}
    return {"measured": True, "workers": p.workers or None, "ray_address": p.ray_address or None}


def _reuse_profile(path: Path, cfg: RunConfig, log, kind: str = "causal-lm"):
    """A saved profile in the output folder is reused when it was made with the same settings."""
    if not path.is_file():
        return None
    from bitalloc.sensitivity.profile import ProfileError, SensitivityProfile

    try:
        prof = SensitivityProfile.load(path)
    except ProfileError as e:
        log(f"not reusing {path}: {e}")
        return None
    c = cfg.calibration
    calib = calibration_spec(c.source, c.n_samples, c.seq_len, c.seed)
    ref_method, fisher_table, _ = cfg.fisher_settings(kind)
    want = _request(cfg.model.spec, cfg.profile.schemes, calib, (c.kl_samples, c.kl_stride), cfg.profile.include,
                    cfg.profile.exclude, cfg.profile.ref_schemes, measured=cfg.profile.measured,
                    groups=list(cfg.profile.groups) or None,
                    ref_method=_ref_request(ref_method, cfg.profile.measure_every), fisher_table=fisher_table,
                    fisher_labels=cfg.fisher_labels(kind))
    want = json.loads(json.dumps(want))
    have = prof.metadata.get("request")
    if have != want:
        log(f"not reusing {path}: made with other settings")
        return None
    log(f"reusing profile {path}")
    return prof
