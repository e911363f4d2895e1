"""A stored profile back on its model: the calibration rows, quantizer and GPTQ Hessians it
was made with, rebuilt and checked, for the steps that run the model again after profiling:
an output-Fisher table added later (:func:`add_fisher_table`), the end-to-end selection of
the run's candidate plans (:func:`selection_fitness`) and the peer methods' scores
(:func:`peer_context`, used by ``bitalloc peer`` and the experiments).

Every function takes a loaded model or its spec, and a profile or its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .config import SELECT_METRICS
from .loading import as_loaded, as_profile

__all__ = ["calibration_spec", "profile_calibration", "profile_quantizer", "peer_context", "add_fisher_table",
           "selection_fitness"]


def calibration_spec(source: str, n_samples: int, seq_len: int, seed: int):
    """"generated" or a text file path -> the CalibrationSpec recorded in the profile."""
    from bitalloc.sensitivity.calibration import CalibrationSpec

    if source == "generated":
        return CalibrationSpec("generated", None, n_samples, seq_len, seed)
    return CalibrationSpec("file", str(source), n_samples, seq_len, seed)


def profile_calibration(loaded, prof, *, source: str | None = None, n_samples: int | None = None,
                        seq_len: int | None = None, seed: int | None = None):
    """The profile's calibration ids (n_samples, seq_len), rebuilt from its description and
    checked against its hash. ``source``: the same text at another path (a file moved since);
    ``n_samples`` / ``seq_len`` / ``seed``: other rows of the same text, which no hash covers."""
    from bitalloc.sensitivity.calibration import load_calibration, tokens_sha256

    c = prof.calibration
    if c.get("source") not in ("generated", "file"):
        raise ValueError(f"the profile's calibration ({c.get('source')!r}) cannot be rebuilt here")
    n, t, s = (int(c[k] if v is None else v) for k, v in (("n_samples", n_samples), ("seq_len", seq_len),
                                                           ("seed", seed)))
    src = source or ("generated" if c["source"] == "generated" else c["path"])
    data = load_calibration(calibration_spec(src, n, t, s), loaded.model, loaded.tokenizer, loaded.kind)
    same = (n, t, s) == (int(c["n_samples"]), int(c["seq_len"]), int(c["seed"]))
    if same and c.get("tokens_sha256") and tokens_sha256(data) != c["tokens_sha256"]:
        raise ValueError("the profile's calibration tokens cannot be reproduced here (another tokenizer, file or "
                         "torch version)")
    return data


def profile_quantizer(model, profile, what: str, hessians=None, profile_path: str | Path | None = None):
    """(loaded model, profile, quantizer, Hessians) for the steps that quantize the model as
    the profile did: a causal LM and a profile of the rtn or gptq quantizer, else a ValueError
    naming ``what`` was asked. A gptq profile's Hessians are ``hessians`` (``fqn -> H`` or a
    file) or the file recorded in its ``metadata["hessians"]`` (looked for as recorded, then
    beside the profile: ``profile_path`` where a loaded profile was read from), checked against
    its sha256 and calibration tokens; None for rtn."""
    loaded = as_loaded(model)
    prof, path = as_profile(profile)
    path = path or profile_path
    if loaded.kind != "causal-lm":
        raise ValueError(f"{what} needs a causal LM, {loaded.spec} is a {loaded.kind}")
    quantizer = prof.metadata.get("quantizer", "rtn")
    if quantizer not in ("rtn", "gptq"):
        raise ValueError(f"{what} supports the rtn and gptq quantizers' profiles, this one used {quantizer!r}")
    if quantizer == "gptq" and not isinstance(hessians, Mapping):
        from bitalloc.sensitivity.hessian_store import HessianStoreError, load_hessians, recorded_hessians

        tokens = prof.calibration.get("tokens_sha256")
        try:
            hessians = (load_hessians(hessians, tokens_sha256=tokens) if hessians is not None else
                        recorded_hessians(prof.metadata.get("hessians"), beside=path, tokens_sha256=tokens))
        except HessianStoreError as e:
            raise ValueError(f"{what} with a gptq profile: {e} (pass hessians=, a dict or the file)") from None
    return loaded, prof, quantizer, (hessians if quantizer == "gptq" else None)


def peer_context(model, profile, *, data=None, rows: int | None = None, seq_len: int | None = None,
                 batch_size: int = 1, hessians=None, profile_path: str | Path | None = None,
                 what: str = "a peer method", **ctx_kw):
    """(PeerContext, calibration ids): the model, the profile's layers and schemes, its
    quantizer (and Hessians), and the first ``rows`` rows (default all), ``seq_len`` tokens
    (default all) of ``data`` (default: the profile's calibration, rebuilt and checked) as
    batches of ``batch_size``. ``hessians`` / ``profile_path``: see :func:`profile_quantizer`;
    ``ctx_kw`` go to PeerContext (``seed``, ``cache_bytes``, ``weights``)."""
    import torch

    from bitalloc.sensitivity.calibration import as_batches
    from bitalloc.sensitivity.peer_context import PeerContext

    loaded, prof, quantizer, H = profile_quantizer(model, profile, what, hessians, profile_path)
    if data is None:
        data = profile_calibration(loaded, prof)
    assert isinstance(data, torch.Tensor) and data.dim() == 2, "a causal LM's calibration is (rows, tokens) ids"
    rows = len(data) if rows is None else max(1, min(int(rows), len(data)))
    sel = data[:rows, : seq_len or data.shape[1]]  # (rows, T)
    ctx = PeerContext(loaded.model, prof.layers, list(prof.schemes), as_batches(sel, batch_size), quantizer=quantizer,
                      hessians=H, saliency=prof.saliency, **ctx_kw)
    return ctx, data


def add_fisher_table(profile, model, *, rows: int | None = None, stride: int | None = None, labels: str = "sampled",
                     seed: int | None = None, progress: bool = False, hessians=None):
    """The profile with its output-Fisher table (:mod:`bitalloc.sensitivity.fisher_refs`) added:
    every (layer, scheme)'s estimated KL per token from one backward pass per batch over the
    first ``rows`` rows of the profile's own calibration (default: all), scored at every
    ``stride``-th position (default: the profile's ``kl_stride``). What a profile built with
    ``fisher_table=True`` has, for a stored profile whose measurements were expensive; the
    settings go to ``metadata["options"]["fisher"]``. The rtn and gptq quantizers' profiles
    (gptq: ``hessians``, or the file the profile records). ``labels="both"``: the
    sampled-label table and, as ``fisher_text``, the text-label one."""
    import dataclasses

    import torch

    from bitalloc.sensitivity.fisher_refs import fisher_ref_tables
    from bitalloc.sensitivity.models import fingerprint

    loaded, prof, quantizer, H = profile_quantizer(model, profile, "a Fisher table", hessians)
    fp = prof.fingerprint
    if fp and fp.get("sha256") and fingerprint(loaded.model).get("sha256") != fp["sha256"]:
        raise ValueError("the model is not the one the profile was made of (fingerprints differ)")
    data = profile_calibration(loaded, prof)
    if rows is not None:
        data = data[: int(rows)]
    opts = prof.metadata.get("options", {})
    stride = int(stride or opts.get("kl_stride") or 1)
    seed = int(prof.calibration.get("seed", 0) if seed is None else seed)
    sal = {f: torch.as_tensor(v) for f, v in (prof.saliency or {}).items()}
    tables, info = fisher_ref_tables(loaded.model, prof.layers, data, prof.schemes, H, saliency=sal or None,
                                     stride=stride, labels=labels, seed=seed, quantizer=quantizer, progress=progress)
    info.update(schemes=len(prof.schemes), rows=int(len(data)), added=True)
    meta = {**prof.metadata, "options": {**opts, "fisher": info}}
    return dataclasses.replace(prof, fisher=tables[0], fisher_text=tables[1] if len(tables) > 1 else None,
                               metadata=meta)


def selection_fitness(model, profile, rows: int = 4, skip: int = 0, hessians=None, screen_rows: int = 0,
                      metric: str = "kl"):
    """``fitness(choices) -> [KL]`` for :func:`bitalloc.allocator.candidates.select_plan`: each
    choice (one scheme index per profile layer) fake-quantized into the model at once (by the
    profile's quantizer; gptq: with ``hessians`` or the file the profile records), KL per token
    to the 16-bit model on the last ``rows`` rows of the profile's own calibration (rebuilt and
    checked against its hash); ``skip``: the ``rows`` before the last ``skip`` instead. The
    callable's ``screen`` (None when ``screen_rows`` is 0) is the same on the last
    ``screen_rows`` of those rows. ``metric="nll"``: the increase of the calibration text's own
    next-token loss instead (where the calibration is real text; KL plus noise if sampled)."""
    from bitalloc.sensitivity.calibration import as_batches
    from bitalloc.sensitivity.metrics import get_metric

    from .candidates import StagedFitness

    what = "selecting plans end to end"
    if metric not in SELECT_METRICS:
        raise ValueError(f"selection metric must be one of {', '.join(SELECT_METRICS)}, got {metric!r}")
    loaded, prof, _quantizer, H = profile_quantizer(model, profile, what, hessians)
    data = profile_calibration(loaded, prof)
    end = len(data) - int(skip)
    assert 0 < end <= len(data), f"skip={skip} leaves no calibration rows (the profile has {len(data)})"
    sel = data[max(0, end - int(rows)):end]  # (rows, T)
    screen_rows = min(int(screen_rows), len(sel))
    # quantized weights shared by the candidates' plans (most layers agree): 1 GiB of them at most
    ctx, _ = peer_context(loaded, prof, data=sel, hessians=H, what=what, cache_bytes=1 << 30)
    stages = [as_batches(sel, 4)] + ([as_batches(sel[len(sel) - screen_rows:], 4)] if screen_rows else [])
    return StagedFitness(ctx.fitness(stages, metric=None if metric == "kl" else get_metric(metric)), len(stages))
