"""The output-Fisher pass over a streamed model (issue 17): forward then backward a block at a
time gives the whole-model pass's tables bit for bit, in process and on Ray workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.sensitivity.build import build_profile
from bitalloc.sensitivity.fisher_refs import fisher_ref_tables
from bitalloc.sensitivity.hessian import collect_input_statistics
from bitalloc.sensitivity.layers import find_layers
from bitalloc.sensitivity.models import load_model
from bitalloc.sensitivity.profile import ProfileError
from bitalloc.sensitivity.saliency import layer_saliencies
from bitalloc.sensitivity.stream_fisher import streamed_fisher_tables
from bitalloc.sensitivity.streaming import StreamedModel

from sens_helpers import save_tiny_llama as _save_llama, stream_settings as _settings, tiny_ids as _ids

SCHEMES = ["w2g32z", "w4g32", "w4g32+h8r0.1", "fp16"]
HYBRID = dict(ref_method="hybrid", measure_every=2, fisher_table=True, fisher_labels="both")


def _whole_and_streamed(path, *, keep, labels="both", bound=None, tmp_path=None):
    from bitalloc.sensitivity import logits as L

    net = load_model(str(path)).model
    layers, _ = find_layers(net)
    ids = _ids()
    H = collect_input_statistics(net, layers, ids, False, batch_size=2)
    sal = layer_saliencies(net, layers, "hessian", hessians=H)
    kw = dict(saliency=sal, stride=2, labels=labels, seed=5, batch_tokens=48)
    try:
        L.set_logits_memory(bound)
        want, info = fisher_ref_tables(net, layers, ids, SCHEMES, H, **kw)
        sm = StreamedModel(path)
        try:
            got, ginfo = streamed_fisher_tables(sm, find_layers(sm.model)[0], ids, SCHEMES, keep_bytes=keep, **kw)
            assert not sm.resident, "no unit is left read in"
        finally:
            sm.close()
    finally:
        L.set_logits_memory(None)
    return layers, want, info, got, ginfo


@pytest.mark.parametrize("keep", [1 << 30, 0], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_streamed_fisher_tables_equal_the_whole_model_pass(which, keep, request):
    """Both label kinds, the untied head a profiled layer, block outputs kept or spilled:
    every (layer, scheme) estimate equals the whole-model pass's bit for bit."""
    layers, want, info, got, ginfo = _whole_and_streamed(request.getfixturevalue(which), keep=keep)
    assert len(want) == len(got) == 2
    for w, g in zip(want, got):
        assert w.shape == (len(layers), len(SCHEMES)) and np.all(w[:, 0] > 0)
        assert np.array_equal(w, g)
    assert (which == "untied") == ("lm_head" in [x.fqn for x in layers])
    assert ginfo["tokens"] == info["tokens"] and ginfo["rows"] == info["rows"] and ginfo["batches"] == info["batches"]
    assert ginfo["streamed"]["blocks_run"] == 3
    assert (ginfo["streamed"]["activations_spilled_bytes"] > 0) == (keep == 0)


def test_streamed_fisher_with_the_head_chunked_by_the_logits_bound(tmp_path):
    """Where the logits-memory bound chunks the head (a large vocabulary), the streamed pass
    chunks it the same way: text labels, the untied head's own rows included."""
    from bitalloc.sensitivity import fisher_refs as FR

    calls = []
    real = FR.head_grads
    FR.head_grads = lambda *a, **k: calls.append(a[6]) or real(*a, **k)
    try:
        wide = _save_llama(tmp_path / "wide", tie=False, vocab=5000)  # 1MiB of logits: chunks of 6 positions
        _, want, _, got, _ = _whole_and_streamed(wide, keep=1 << 30, labels="text", bound="1MiB")
    finally:
        FR.head_grads = real
    assert calls and len(calls) == 2 * 3, "chunked in both passes, every batch"
    assert np.array_equal(want[0], got[0])


@pytest.mark.parametrize("kw", [HYBRID, dict(ref_method="fisher", fisher_labels="text")], ids=["hybrid-both", "fisher"])
def test_streamed_profile_with_fisher_passes_equals_the_in_memory_profile(untied, kw):
    """``max_memory`` with hybrid or Fisher references and the Fisher tables: the profile the
    model loaded whole gives, bit for bit; hybrid measures only its subset's references."""
    ids = _ids()
    whole = build_profile(str(untied), calibration=ids, **_settings(**kw))
    streamed = build_profile(str(untied), calibration=ids, **_settings(max_memory="16GiB", **kw))
    for f in ("proxy", "ref_values", "fisher", "fisher_text"):
        a, b = getattr(whole, f), getattr(streamed, f)
        assert (a is None) == (b is None), f
        assert a is None or np.array_equal(a, b, equal_nan=True), f
    assert np.array_equal(whole.tables["all"], streamed.tables["all"])
    fw, fs = whole.metadata["options"]["fisher"], streamed.metadata["options"]["fisher"]
    assert fs["tokens"] == fw["tokens"] and fs["labels"] == fw["labels"] and fs.get("hybrid") == fw.get("hybrid")
    items = streamed.metadata["streaming"]["items"]
    assert items["fisher"]["computed"] == 1
    peaks = streamed.metadata["streaming"]["peak_after_step_bytes"]  # VmHWM after each step, where Linux has it
    assert not peaks or (set(peaks) >= {"units", "fisher"} and 0 < peaks["units"] <= peaks["fisher"])
    if kw["ref_method"] == "hybrid":
        assert items["references"]["computed"] == 2 * fw["hybrid"]["measured_layers"] < 2 * whole.n_layers
    else:
        assert "references" not in items, "Fisher references measure nothing"


def test_streamed_fisher_item_resumes_from_its_checkpoint(untied, tmp_path):
    """The Fisher pass is a runner item checkpointed beside the profile's: a rerun reads it."""
    ids = _ids()
    ck = tmp_path / "p.measure-checkpoint.jsonl"
    first = build_profile(str(untied), calibration=ids, checkpoint=ck, **_settings(max_memory="16GiB", **HYBRID))
    assert ck.with_suffix(".fisher.jsonl").is_file()
    again = build_profile(str(untied), calibration=ids, checkpoint=ck, **_settings(max_memory="16GiB", **HYBRID))
    items = again.metadata["streaming"]["items"]
    assert items["fisher"]["resumed"] == 1 and items["fisher"]["computed"] == 0
    assert np.array_equal(again.fisher, first.fisher) and np.array_equal(again.fisher_text, first.fisher_text)
    assert np.array_equal(again.tables["all"], first.tables["all"])


def test_the_memory_plan_counts_the_fisher_pass(untied):
    """A limit the references fit but the Fisher pass does not is refused before any work,
    naming the Fisher pass."""
    from bitalloc.sensitivity.streamed_items import plan_memory
    from bitalloc.sensitivity.worker import WorkerSetup

    sm = StreamedModel(untied)
    try:
        layers, _ = find_layers(sm.model)
        setup = WorkerSetup(model=str(untied), tokens=_ids().tolist(), batch_size=2, weights="as-loaded",
                            kl_samples=2, kl_stride=2, schemes=tuple(SCHEMES), max_memory=16 << 30)
        plain = plan_memory(sm, layers, setup, 6 * 24, 24)
        with_fisher = plan_memory(sm, layers, WorkerSetup(**{**setup.to_dict(), "fisher_schemes": SCHEMES,
                                                             "fisher_labels": "both"}), 6 * 24, 24)
        assert with_fisher["estimated_peak_bytes"] > plain["estimated_peak_bytes"]
        assert with_fisher["largest_phase"] == "Fisher pass"
        limit = (plain["estimated_peak_bytes"] + with_fisher["estimated_peak_bytes"]) // 2
        with pytest.raises(ProfileError, match="less than the Fisher pass of unit"):
            plan_memory(sm, layers, WorkerSetup(**{**setup.to_dict(), "fisher_schemes": SCHEMES, "max_memory": limit,
                                                   "fisher_labels": "both"}), 6 * 24, 24)
    finally:
        sm.close()


@pytest.mark.slow
def test_streamed_fisher_profile_on_local_ray_equals_in_process(untied):
    """``max_memory`` with Ray workers and the default kind of profile (hybrid references, both
    Fisher tables): the Fisher pass runs as an item on a worker under the limit, and the profile
    equals the in-process streamed one bit for bit at the workers' thread count."""
    ids = _ids()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = build_profile(str(untied), calibration=ids, **_settings(max_memory="16GiB", **HYBRID))
    finally:
        torch.set_num_threads(threads)
    ray = build_profile(str(untied), calibration=ids, **_settings(max_memory="16GiB", workers=2, **HYBRID))
    for f in ("proxy", "ref_values", "fisher", "fisher_text"):
        assert np.array_equal(getattr(ray, f), getattr(local, f)), f
    assert np.array_equal(ray.tables["all"], local.tables["all"])
    r = ray.metadata["ray"]
    assert r["fisher"]["mode"] == "ray-local" and r["fisher"]["computed"] == 1
    workers = r["fisher"]["worker_info"]
    assert workers and all(w["streaming"]["max_memory"] == 16 << 30 and w["peak_rss_mb"] > 0 for w in workers)
    assert r["references"]["computed"] == 2 * ray.metadata["options"]["fisher"]["hybrid"]["measured_layers"]


def test_streamed_measured_table_equals_the_in_memory_one(untied):
    """``max_memory`` with ``measured=True``: every (layer, scheme) measured end to end with the
    units read as the forward runs; the table equals the whole model's bit for bit."""
    ids = _ids()
    whole = build_profile(str(untied), calibration=ids, **_settings(measured=True))
    streamed = build_profile(str(untied), calibration=ids, **_settings(max_memory="16GiB", measured=True))
    assert whole.metadata["table"] == streamed.metadata["table"] == "measured"
    assert np.array_equal(streamed.tables["all"], whole.tables["all"])
    assert np.array_equal(streamed.ref_values, whole.ref_values) and np.array_equal(streamed.proxy, whole.proxy)
    items = streamed.metadata["streaming"]["items"]
    assert items["references"]["computed"] == whole.n_layers * len(whole.schemes)


@pytest.mark.slow
def test_hybrid_profile_on_local_ray_runs_the_fisher_pass_on_a_worker(tmp_path):
    """The default kind of profile on Ray with the model whole: the Fisher pass is one runner
    item on a worker (not the driver), checkpointed; its tables match the in-process ones
    (float32 Hessians reduced from shards: allclose), and a rerun resumes it."""
    import bitalloc

    kw = dict(n_samples=4, seq_len=16, kl_samples=2, kl_stride=1, schemes=["w2g64z", "w4g64", "fp16"],
              ref_schemes=["w2g64z"], batch_size=2, progress=False, log=None, ref_method="hybrid", measure_every=2,
              fisher_table=True, fisher_labels="both")
    base = bitalloc.profile("random:llama-tiny", **kw)
    out = tmp_path / "p.json"
    ray1 = bitalloc.profile("random:llama-tiny", workers=2, out=out, **kw)
    r = ray1.metadata["ray"]
    assert r["fisher"]["mode"] == "ray-local" and r["fisher"]["computed"] == 1
    assert r["fisher"]["worker_info"] and all(w["reused_model"] for w in r["fisher"]["worker_info"])
    np.testing.assert_allclose(ray1.fisher, base.fisher, rtol=1e-4)
    np.testing.assert_allclose(ray1.fisher_text, base.fisher_text, rtol=1e-4)
    assert ray1.metadata["options"]["fisher"]["tokens"] == base.metadata["options"]["fisher"]["tokens"]
    assert (tmp_path / "p.measure-checkpoint.fisher.jsonl").is_file()
    ray2 = bitalloc.profile("random:llama-tiny", workers=2, out=out, **kw)
    assert ray2.metadata["ray"]["fisher"]["resumed"] == 1 and np.array_equal(ray2.fisher, ray1.fisher)


def test_streamed_fisher_refuses_padded_calibration(untied):
    """Padded rows (an attention mask) are refused for the Fisher passes, streamed as loaded whole."""
    ids = _ids()
    padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for extra in ({}, {"max_memory": "16GiB"}):
        with pytest.raises(ProfileError, match="Fisher estimates need a causal LM"):
            build_profile(str(untied), calibration=padded, **_settings(ref_method="fisher", **extra))
