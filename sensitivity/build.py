"""Building a :class:`~bitalloc.sensitivity.profile.SensitivityProfile`: the pipeline.

Load the model, select layers, calibrate, collect Hessians, saliency and the proxy table,
measure the reference columns (or the whole table, :mod:`.runner`), then cost every
(layer, scheme). Its settings are one :class:`~.profile_config.ProfileConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .metrics import strided_batches as _strided
from .profile import ProfileError, SensitivityProfile
from .profile_config import ProfileConfig

__all__ = ["build_profile", "ProfileConfig", "cost_table", "other_parameter_bits"]

log = logging.getLogger("bitalloc.sensitivity")


from .profile_parts import cost_table, other_parameter_bits, profile_metadata, profile_split_channels  # noqa: E402,F401


# ---------------------------------------------------------------------------------------
# building a profile


def build_profile(
    model: Any = "smollm2",
    config: ProfileConfig | Sequence[Any] | None = None,
    calibration: Any = None,
    *,
    progress: bool = True,
    log_fn: Callable[[str], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    hessians_out: str | os.PathLike | None = None,
    on_hessians: Callable[[dict], None] | None = None,
    round16: bool = False,
    **settings: Any,
) -> SensitivityProfile:
    """Profile a model: layers, calibration data, Hessians, proxy, reference KL, costs.

    ``model`` is a spec string (see :mod:`sensitivity.models`) or a :class:`LoadedModel`.
    ``config``: a :class:`ProfileConfig` (``settings``, its field names, override it; the
    old keyword arguments are exactly those names). ``calibration``: ready data, or a
    :class:`CalibrationSpec`, instead of the config's calibration settings.
    ``calibration`` is a :class:`CalibrationSpec` (default: 8 × 256 self-generated tokens),
    or a ready (n, seq) id tensor / encoder dict. ``ref_schemes`` (each must be one of
    ``schemes``) are measured for every layer (one forward pass set per layer each) and
    calibrate the proxy (:func:`calibrate_proxy`); ``kl_samples`` limits the rows used for
    those measurements (default: all). Skipped layers and progress notes go to ``log_fn``
    (default: the ``bitalloc.sensitivity`` logger).

    Memory (SmolLM2, 8 × 256 tokens): the float32 model (0.54 GB), one Hessian per distinct
    layer input (0.4 GB; each activation-quantized format in ``schemes`` adds two more
    matrices per input for the exact activation-error proxy), the reference log-probs
    (tokens × vocab × 4 bytes, 0.4 GB) and one cached block output per block (0.14 GB).

    ``groups`` (:mod:`sensitivity.groups`: patterns + metric per group, every layer in
    exactly one) measures each layer's ref schemes with its group's metric (all groups'
    metrics from one forward) and gives one table per group (other groups' rows 0).

    ``measured=True``: every (layer, scheme) is measured end to end
    (:mod:`sensitivity.runner`; in-process, or on Ray with ``workers`` / ``ray_address``,
    results appended to the JSONL ``checkpoint`` and resumed from it); the measured table
    is the solver's table and its ref-scheme columns calibrate the proxy (``scales``).
    Otherwise a plain local loop measures the ref schemes only; the per-(layer, scheme)
    work item is :func:`measure_item` either way.

    ``saliency`` (``"hessian"``, ``"obq"`` or ``"fisher"``, :mod:`sensitivity.saliency`)
    chooses the channels split schemes keep high, in the proxy and the measurements alike;
    the vectors are stored in the profile (``saliency``) so a plan records the same channels.
    ``quantizer`` (``"rtn"`` or ``"gptq"``, reusing the collected Hessians) quantizes the
    weights of the proxy and measured tables; recorded in ``metadata["options"]["quantizer"]``.

    ``pairs`` (``"full"`` or ``"reduced"``, needs ``measured=True``): also measure the
    same-block pair interactions (:mod:`sensitivity.pairs`) as joint items of the same run
    and checkpoint, over ``pair_schemes`` (default: all schemes; reduced: at ``pair_ref``,
    default the first pair scheme); stored in the profile's ``pairs`` field.
    ``hessians_out``: save the Hessians there (:mod:`sensitivity.hessian_store`; what a
    GPTQ plan is applied with), recorded with its sha256 in ``metadata["hessians"]``.
    ``on_hessians``: called with ``{fqn: H or accumulator}`` once the tables are done (the
    llama.cpp target keeps their diagonals as its importance matrix).
    ``round16``: a model given by spec is rounded to float16 values when loaded (as
    :func:`bitalloc.load` does; a :class:`LoadedModel` is used as it is).
    """
    if config is not None and not isinstance(config, ProfileConfig):  # the old positional ``schemes``
        settings = {"schemes": config, **settings}
        config = None
    cfg = ProfileConfig.from_settings(config, **settings)
    schemes, include, exclude, ref_schemes = cfg.schemes, cfg.include, cfg.exclude, cfg.ref_schemes
    quantize_tied, batch_size, kl_samples, kl_stride = cfg.quantize_tied, cfg.batch_size, cfg.kl_samples, cfg.kl_stride
    hessian_dtype = getattr(torch, cfg.hessian_dtype)
    groups, measured, workers, ray_address = (list(cfg.groups) or None), cfg.measured, cfg.workers, cfg.ray_address
    saliency, quantizer, pairs, pair_schemes, pair_ref = cfg.saliency, cfg.quantizer, cfg.pairs, cfg.pair_schemes, cfg.pair_ref
    if calibration is None:
        calibration = cfg.calibration_spec()
    from .calibration import CalibrationSpec, as_batches, first_rows, load_calibration, tokens_sha256
    from .hessian import collect_input_statistics
    from .layers import find_layers
    from .models import LoadedModel, fingerprint, load_model
    from .proxy import as_scheme, calibrate_proxy, compute_reference, proxy_table
    from .groups import measure_ref_columns, setup_grouping

    from .profile_ray import on_ray
    from .runner_ray import kept_workers, keeping_workers

    if on_ray(cfg.workers, cfg.ray_address) and not keeping_workers():  # one set of Ray workers for every step
        with kept_workers():
            return build_profile(model, cfg, calibration, progress=progress, log_fn=log_fn, checkpoint=checkpoint,
                                 hessians_out=hessians_out, on_hessians=on_hessians, round16=round16)
    say = log_fn or log.info
    if cfg.max_memory is not None:  # block streaming: the model is never whole in memory
        from .streamed_profile import build_streamed_profile

        extras = [k for k, v in (("hessians_out", hessians_out), ("on_hessians", on_hessians)) if v is not None]
        if extras:
            raise ProfileError(f"{extras[0]} is not supported with max_memory (block streaming) yet")
        return build_streamed_profile(model, cfg, calibration, progress=progress, say=say, round16=round16,
                                      checkpoint=checkpoint)
    t_start = time.perf_counter()
    walls: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        walls[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    scheme_objs = [as_scheme(s) for s in schemes]
    names = [s.name for s in scheme_objs]
    if len(set(names)) != len(names):
        raise ProfileError(f"schemes contain duplicates: {names}")
    refs = [as_scheme(r).name for r in ref_schemes]
    for r in refs:
        if r not in names:
            raise ProfileError(f"ref scheme {r!r} is not one of the schemes ({', '.join(names)})")
    if not refs:
        raise ProfileError("ref_schemes must name at least one scheme to calibrate the proxy")

    t = time.perf_counter()
    loaded = model
    if not isinstance(model, LoadedModel):
        from .models import round_to_16bit

        loaded = load_model(model)
        if round16:
            round_to_16bit(loaded.model)
    net, tok = loaded.model, loaded.tokenizer
    t = lap("load", t)
    fp = fingerprint(net)
    t = lap("fingerprint", t)

    layers, skipped = find_layers(net, include, exclude, quantize_tied=quantize_tied)
    say(f"{len(layers)} layers selected, {len(skipped)} skipped")
    grouping = setup_grouping(groups, layers)  # GroupError (one line) if they do not partition the layers
    if pairs is not None and grouping is not None:
        raise ProfileError("pair terms with metric groups are not supported: pairs are measured in one metric")
    if pairs is not None and not measured:
        raise ProfileError("pair terms need the measured table (measured=True): M's diagonal is measured")
    for s in skipped:
        say(f"skipped {s}")

    if calibration is None:
        calibration = CalibrationSpec()
    if isinstance(calibration, CalibrationSpec):
        calib_desc = calibration.describe()
        what = "sentences" if loaded.kind == "encoder" else calibration.source
        say(f"calibration: {what}, {calibration.n_samples} x {calibration.seq_len} tokens (seed {calibration.seed})")
        data = load_calibration(calibration, net, tok, loaded.kind)
    else:
        data = calibration
        calib_desc = {"source": "provided"}
    ids = data["input_ids"] if isinstance(data, dict) else data
    calib_desc.update(tokens=int(ids.numel()), shape=list(ids.shape), tokens_sha256=tokens_sha256(data))
    t = lap("calibration", t)

    from .proxy import QUANTIZERS
    from .saliency import SALIENCY_METHODS, fisher_diagonals, layer_saliencies

    if saliency not in SALIENCY_METHODS:
        raise ProfileError(f"saliency must be one of {SALIENCY_METHODS}, got {saliency!r}")
    if quantizer not in QUANTIZERS:
        raise ProfileError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    if quantizer != "rtn" and grouping is not None:
        raise ProfileError("metric groups with quantizer 'gptq' are not supported yet")
    setup = None
    from . import profile_ray

    ray = profile_ray.on_ray(workers, ray_address)  # the default profile's items go to Ray too
    acts = sorted({s.act for s in scheme_objs if s.act != "a16"})
    if measured or ray:
        # the workers' setup (saliency values are added once computed); a mismatched
        # checkpoint is refused now, not after minutes of Hessians and proxy
        from .runner import Checkpoint, checkpoint_header

        setup = _worker_setup(loaded, data, calib_desc, fp, kl_samples=kl_samples, kl_stride=kl_stride,
                              batch_size=batch_size, include=include, exclude=exclude, quantize_tied=quantize_tied,
                              quantizer=quantizer, saliency=saliency, grouping=grouping)
        setup = profile_ray.with_schemes(setup, names, acts, None)
        if checkpoint is not None:
            Checkpoint(checkpoint, checkpoint_header(setup, names, quantizer=quantizer)).check()

    ray_info: dict = {}
    if ray:
        stats, ray_info["hessians"] = profile_ray.sharded_statistics(
            setup, int(ids.shape[0]), workers=workers, address=ray_address, checkpoint=checkpoint,
            dtype=hessian_dtype, progress=progress, say=say)
    else:
        stats = collect_input_statistics(net, layers, data, progress, batch_size=batch_size, dtype=hessian_dtype,
                                         act_formats=acts)
    t = lap("hessians", t)
    say(f"hessians: {len({id(a) for a in stats.values()})} distinct layer inputs in {walls['hessians']:.1f} s")

    fisher = fisher_diagonals(net, layers, data, batch_size=batch_size, progress=progress) if saliency == "fisher" else None
    sal = layer_saliencies(net, layers, saliency, hessians=stats, fisher=fisher)
    del fisher
    t = lap("saliency", t)
    # the output-Fisher estimates (sensitivity.fisher_refs): every scheme for the table, else the references
    fisher_info = fisher_vals = None
    fisher_names = profile_ray.fisher_columns(cfg, names, refs)
    want_fisher = bool(fisher_names)
    fisher_cols = [names.index(n) for n in fisher_names]
    if want_fisher and (loaded.kind != "causal-lm" or isinstance(data, dict)):
        raise ProfileError(f"Fisher estimates need a causal LM's next-token logits; {loaded.spec} is a {loaded.kind}")
    if ray:
        proxy, ray_info["proxy"] = profile_ray.proxy_rows(
            profile_ray.with_schemes(setup, names, acts, sal), [layer.fqn for layer in layers], names, stats,
            workers=workers, address=ray_address, checkpoint=checkpoint, hessian_dtype=cfg.hessian_dtype,
            shards=ray_info["hessians"]["shards"], progress=progress, say=say)
    else:
        fisher_stats = None
        if want_fisher:  # the estimates from the proxy's own quantized weights
            from .fisher_refs import FisherStats

            t_f = time.perf_counter()
            fisher_stats = FisherStats.collect(net, layers, data, stride=cfg.kl_stride, labels=cfg.fisher_labels,
                                               seed=cfg.seed, progress=progress)
            t_f = time.perf_counter() - t_f
            fisher_vals = [np.full((len(layers), len(names)), np.nan) for _ in fisher_stats.g2_all]
        proxy = proxy_table(net, layers, stats, scheme_objs, progress, act_stats=stats if acts else None,
                            quantizer=quantizer, saliency=sal, fisher=fisher_stats, fisher_out=fisher_vals,
                            fisher_cols=fisher_cols)
        if fisher_stats is not None:
            # seconds: the forward/backward pass; each estimate's product is inside the proxy's time
            fisher_info = {**fisher_stats.info, "schemes": len(fisher_cols), "seconds": round(t_f, 3),
                           "with_proxy": True}
            fisher_stats.free()
            say(f"fisher estimates: {len(layers)} layers x {len(fisher_cols)} schemes from "
                f"{fisher_info['tokens']} positions, with the proxy")
    if want_fisher and fisher_vals is None:  # the Ray path: the Fisher pass is one item on a worker
        fsetup = dataclasses.replace(setup, fisher_labels=cfg.fisher_labels, fisher_seed=cfg.seed,
                                     fisher_schemes=tuple(fisher_names))
        fisher_vals, fisher_info, ray_info["fisher"] = profile_ray.fisher_step(
            cfg, fsetup, layers, names, sal, checkpoint=checkpoint, progress=progress, say=say,
            shared={"hessians": stats} if quantizer != "rtn" else None)
    t = lap("proxy", t)
    say(f"proxy: {len(layers)} layers x {len(names)} schemes in {walls['proxy']:.1f} s; measuring {', '.join(refs)}")

    measure_info = None
    pair_field = None
    if measured:
        measured_table, measure_info, metric_name, replay = _measure_all(
            loaded, setup, layers, names, data, stats, progress, say,
            workers=workers, ray_address=ray_address, checkpoint=checkpoint, saliency=sal, grouping=grouping,
            pairs=(pairs, [as_scheme(x).name for x in (pair_schemes or names)],
                   None if pair_ref is None else ([as_scheme(pair_ref).name] * 2 if isinstance(pair_ref, str)
                                                  else [as_scheme(x).name for x in pair_ref])) if pairs else None)
        pair_field = measure_info.pop("pairs_field", None)
        ref_values = measured_table[:, [names.index(r) for r in refs]]
    elif ray and cfg.ref_method == "measured":  # the reference columns as measured items (the measured checkpoint's own items)
        ref_values, ray_info["measure"], metric_name, replay = _measure_all(
            loaded, setup, layers, names, data, stats, progress, say, workers=workers, ray_address=ray_address,
            checkpoint=checkpoint, saliency=sal, grouping=grouping, item_schemes=refs)
    elif cfg.ref_method == "fisher":  # one backward per batch instead of 210 x R forwards
        ref_values = fisher_vals[0][:, [names.index(r) for r in refs]]
        metric_name, replay = "kl", None
    else:
        metric_batches = _strided(net, as_batches(first_rows(data, kl_samples), batch_size), kl_stride)
        metric_set = grouping.metric_set if grouping is not None else None
        reference = compute_reference(net, layers, metric_batches, metric_set, progress, batch_size=batch_size)
        metric_name = reference.metric.name
        from .fisher_refs import measured_layers, reference_values

        sub = measured_layers(cfg.ref_method, layers, cfg.measure_every)  # hybrid: a few blocks
        mlayers = [layers[i] for i in sub]
        if quantizer == "rtn" and saliency == "hessian":
            ref_values = measure_ref_columns(net, mlayers, reference, refs, progress, stats, grouping)
        else:  # the same items with this quantizer / these split channels (no metric groups here)
            from .proxy import measure_item

            ref_values = np.array([[measure_item(net, layer, r, reference, stats.get(layer.fqn), quantizer=quantizer,
                                                 saliency=sal[layer.fqn]) for r in refs] for layer in mlayers], dtype=np.float64)
        replay = reference.replay
        reference.free()
        if cfg.ref_method == "hybrid":  # the Fisher, corrected per layer kind, where not measured
            ref_values, fisher_info["hybrid"] = reference_values(
                cfg.ref_method, layers, sub, ref_values, fisher_vals[0][:, [names.index(r) for r in refs]],
                cfg.measure_every, say)
    t = lap("measure", t)

    table, scales = calibrate_proxy(proxy, ref_values, [names.index(r) for r in refs])
    if measured:
        table = measured_table
    costs = cost_table(layers, scheme_objs)
    other_bits, other_params = other_parameter_bits(net, layers)
    hess_rec = None
    if hessians_out is not None:
        from .hessian_store import save_hessians

        hess_rec = save_hessians(hessians_out, stats, tokens_sha256=calib_desc.get("tokens_sha256"))
    if on_hessians is not None:  # the llama.cpp target keeps their diagonals as its importance matrix
        on_hessians(stats)
    walls["total"] = round(time.perf_counter() - t_start, 3)
    del stats

    metadata = profile_metadata(cfg, walls=walls, metric=metric_name, replay=replay,
                                table="measured" if measured else "calibrated-proxy",
                                **({"fisher": fisher_info} if fisher_info else {}))
    if hess_rec:
        metadata["hessians"] = hess_rec
    if measure_info is not None:
        metadata["measure"] = measure_info
    if ray_info:
        metadata["ray"] = ray_info
    if grouping is not None:
        metadata.update(grouping.metadata())
    return SensitivityProfile(
        model={"spec": loaded.spec, "kind": loaded.kind, "description": loaded.description, "fingerprint": fp},
        calibration=calib_desc,
        layers=list(layers),
        skipped=list(skipped),
        schemes=names,
        cost_bits=costs,
        tables=grouping.split(table, [layer.fqn for layer in layers]) if grouping is not None else {"all": table},
        proxy=proxy,
        ref_values=ref_values,
        ref_schemes=refs,
        scales=scales,
        other_bits=other_bits,
        other_params=other_params,
        metadata=metadata,
        saliency={f: v.numpy().astype(np.float64) for f, v in sal.items()},
        pairs=pair_field,
        split_channels=profile_split_channels(layers, names, sal),
        fisher=fisher_vals[0] if cfg.fisher_table else None,
        fisher_text=fisher_vals[1] if cfg.fisher_table and len(fisher_vals) > 1 else None,
    )


def _is_16bit(net: torch.nn.Module) -> bool:
    """Whether every floating parameter already holds a float16 value."""
    with torch.no_grad():
        return all(
            p.dtype == torch.float16 or torch.equal(p, p.to(torch.float16).to(p.dtype))
            for p in net.parameters() if p.is_floating_point()
        )


def _measure_all(loaded, setup, layers, names, data, stats, progress, say, *, workers, ray_address, checkpoint,
                 saliency=None, pairs=None, grouping=None, item_schemes=None):
    """The measured (L, S) table through :mod:`sensitivity.runner` (in-process or on Ray).

    ``setup`` (from :func:`_worker_setup`) gets the per-layer ``saliency`` values here.
    With metric groups every item scores every group's metric from one forward; the table
    holds each layer's value in its own group's metric (``grouping.split`` makes the
    per-group tables). Groups reach Ray workers as JSON (patterns and built-in metric
    names); groups with callables run in-process only."""
    from .runner import WorkerContext, checkpoint_header, run_items

    if saliency is not None:
        setup = dataclasses.replace(setup, saliency_values={f: v.tolist() for f, v in saliency.items()})
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    context = None
    if not address and not workers:
        context = WorkerContext(setup, loaded=loaded, data=data, hessians=stats, saliency=saliency, grouping=grouping)
    elif grouping is not None and setup.groups is None:
        raise ProfileError("metric groups with callables (layer matchers or metric functions) cannot be shipped to "
                           "Ray workers; use name patterns and built-in metric names, or measure in-process")
    fqns = [layer.fqn for layer in layers]
    item_schemes = list(item_schemes or names)  # the default profile on Ray: the ref schemes only
    items = [(f, s) for f in fqns for s in item_schemes]
    pair_list = None
    if pairs is not None:
        from .pairs import block_pairs, pair_items

        model_kind, pair_names, ref = pairs
        bad = [x for x in pair_names + list(ref or []) if x not in names]
        if bad:
            raise ProfileError(f"pair scheme {bad[0]!r} is not one of the schemes")
        pair_list = block_pairs(layers)
        joint = pair_items(pair_list, pair_names, model_kind, ref)
        say(f"pair terms ({model_kind}): {len(pair_list)} same-block pairs -> {len(joint)} joint items")
        items += joint
    say(f"measuring {len(items)} items ({len(fqns)} layers x {len(item_schemes)} schemes)"
        + (f" on Ray ({'cluster ' + address if address else f'{workers} local workers'})" if context is None else " in-process")
        + (f"; checkpoint {checkpoint}" if checkpoint else ""))
    header = checkpoint_header(setup, names, quantizer=setup.quantizer)
    res = run_items(setup, items, checkpoint=checkpoint, header=header, workers=workers, address=address,
                    context=context, progress=progress, log_fn=say,
                    shared={"hessians": stats} if context is None else None)
    replay = bool(context.reference.replay) if context is not None else bool(
        (res.info.get("worker_info") or [{}])[0].get("block_replay", False))
    if context is not None:
        context.reference.free()
    if pair_list is not None:
        from .pairs import SEP, pairs_from_values

        single = {k: v[setup.metric] for k, v in res.values.items() if SEP not in k[0]}
        joint_v = {k: v[setup.metric] for k, v in res.values.items() if SEP in k[0]}
        res.info["pairs_field"] = pairs_from_values(pair_list, pair_names, single, joint_v, model_kind, ref,
                                                    setup.metric)
        res.info["pair_items"] = len(joint_v)
    if grouping is not None:
        own = grouping.group_of()
        table = np.array([[res.values[(f, s)][own[f]] for s in item_schemes] for f in fqns], dtype=np.float64)
        return table, res.info, "groups", replay
    return res.table(fqns, item_schemes, setup.metric), res.info, setup.metric, replay


def _worker_setup(loaded, data, calib_desc, fp, *, kl_samples, kl_stride, batch_size, include, exclude,
                  quantize_tied, quantizer, saliency="hessian", grouping=None):
    """What every measuring worker needs (and what the checkpoint header hashes); the
    saliency values are added by :func:`_measure_all` once they are computed."""
    from .runner import WorkerSetup

    return WorkerSetup.with_data(
        loaded.spec, data, calib_desc,
        fingerprint_sha256=fp["sha256"],
        weights="16bit" if _is_16bit(loaded.model) else "as-loaded",
        kl_samples=kl_samples,
        kl_stride=kl_stride,
        batch_size=batch_size,
        metric="cosine" if loaded.kind == "encoder" else "kl",
        include=tuple(include),
        exclude=tuple(exclude),
        quantize_tied=quantize_tied,
        quantizer=quantizer,
        saliency=saliency,
        groups=_groups_json(grouping),
    )


def _groups_json(grouping) -> list | None:
    """The groups as JSON for workers (None if there are none or one is not expressible)."""
    if grouping is None:
        return None
    out = []
    for g in grouping.groups:
        if callable(g.match) or not isinstance(g.metric, str):
            return None
        out.append({"name": g.name, "match": list(g.match), "metric": g.metric, "options": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in g.options.items()}})
    return out

