"""Data-parallel Hessian shards and the default profile on Ray (random-weight tiny Llama, plumbing only).

Sharded statistics equal the single-process float64 pass to float64-accumulation rounding
(max |ΔH| / max |H| < 1e-13, measured ~5e-16); the reduction is in shard order, so the same
shards give bit-identical Hessians. The Ray tests start a real local Ray (2 workers) and are
marked slow, as tests/sensitivity/test_runner.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitalloc.sensitivity.hessian import collect_input_statistics
from bitalloc.sensitivity.hessian_shards import compute_shard, reduce_shards, shard_keys, shard_rows
from bitalloc.sensitivity.profile_ray import hessian_header
from bitalloc.sensitivity.runner import WorkerContext, WorkerSetup, run_items

TOL = 1e-13  # float64-accumulation rounding, relative to max |H|
SCHEMES = ["w2g64z", "w3g128z", "w4g128z", "w8a8"]


@pytest.fixture(scope="module")
def setup():
    return WorkerSetup(model="random:llama-tiny", batch_size=2, act_formats=("a8",),
                       calibration=dict(source="generated", n_samples=6, seq_len=16, seed=0))


@pytest.fixture(scope="module")
def ctx(setup):
    return WorkerContext(setup)


@pytest.fixture(scope="module")
def single(ctx):
    return collect_input_statistics(ctx.loaded.model, ctx.layers, ctx.data, False, batch_size=2, dtype=torch.float64,
                                    act_formats=("a8",))


def _rel(a, b) -> float:
    return max(((a[f].H - b[f].H).abs().max() / b[f].H.abs().max()).item() for f in b)


def test_shard_keys_on_batch_boundaries():
    assert shard_keys(6, 2, 2) == [("@hessians", "rows0-2"), ("@hessians", "rows2-6")]
    assert shard_keys(7, 9, 2)[-1] == ("@hessians", "rows6-7")  # never more shards than batches
    assert shard_rows("rows4-8") == (4, 8)
    with pytest.raises(ValueError):
        shard_rows("rows8-4")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sharded_equals_single_process(ctx, single, n):
    shards = [compute_shard(ctx.loaded.model, ctx.layers, ctx.data, shard_rows(k[1]), batch_size=2, act_formats=("a8",))
              for k in shard_keys(6, n, 2)]
    red = reduce_shards(shards, torch.float64)
    assert _rel(red, single) < TOL
    for f in single:
        assert red[f].nsamples == single[f].nsamples
        for t in ("cross", "noise"):
            a, b = getattr(red[f], t)["a8"], getattr(single[f], t)["a8"]
            assert ((a - b).abs().max() / b.abs().max()).item() < TOL
    assert len({id(a) for a in red.values()}) == len({id(a) for a in single.values()})  # shared inputs stay shared
    again = reduce_shards(list(shards), torch.float64)
    assert all(torch.equal(again[f].H, red[f].H) for f in red)  # fixed order: bit-identical


def test_shards_checkpointed_and_resumed(tmp_path, setup, ctx, single):
    keys = shard_keys(6, 3, 2)
    ck = tmp_path / "h.jsonl"
    res = run_items(setup, keys, context=ctx, checkpoint=ck, header=hessian_header(setup), progress=False)
    lines = [json.loads(x) for x in ck.read_text().splitlines()[1:]]
    assert [(r["layer"], r["scheme"]) for r in lines] == keys and all("file" in r and "sha256" in r for r in lines)
    assert all(p.parent == tmp_path / "h.files" for p in res.files.values())
    first = reduce_shards([res.files[k] for k in keys], torch.float64)
    assert _rel(first, single) < TOL
    res.files[keys[1]].unlink()  # a lost shard file: only that shard runs again
    again = run_items(setup, keys, context=ctx, checkpoint=ck, header=hessian_header(setup), progress=False)
    assert again.info["resumed"] == 2 and again.info["computed"] == 1
    second = reduce_shards([again.files[k] for k in keys], torch.float64)
    assert all(torch.equal(first[f].H, second[f].H) for f in first)


@pytest.mark.slow
def test_default_profile_on_local_ray(tmp_path):
    import bitalloc

    kw = dict(n_samples=4, seq_len=16, kl_samples=2, kl_stride=1, schemes=SCHEMES, ref_schemes=["w3g128z"],
              batch_size=2, progress=False, log=None)
    base = bitalloc.profile("random:llama-tiny", **kw)
    out = tmp_path / "p.json"
    ray1 = bitalloc.profile("random:llama-tiny", workers=2, out=out, **kw)
    r = ray1.metadata["ray"]
    assert r["hessians"]["mode"] == "ray-local" and r["hessians"]["shards"] == ["rows0-2", "rows2-4"]
    assert r["proxy"]["computed"] == ray1.n_layers and r["measure"]["computed"] == ray1.n_layers
    # one set of workers for the three steps: the later steps re-configure them on the model they loaded
    assert [r[k]["reused_workers"] for k in ("hessians", "proxy", "measure")] == [0, 2, 2]
    # worker_info comes from the workers live at the end: a worker still re-configuring when the
    # other has measured every tiny item is not among them (CI saw [3] once, on a loaded machine)
    assert r["measure"]["worker_info"] and all(w["step"] == 3 for w in r["measure"]["worker_info"])
    assert all(w["reused_model"] for k in ("proxy", "measure") for w in r[k]["worker_info"])
    import ray

    assert not ray.is_initialized()  # the profile's kept workers and its Ray instance are gone
    assert np.array_equal(ray1.ref_values, base.ref_values)  # the ref measurements need no Hessian: equal
    assert np.allclose(ray1.proxy, base.proxy, rtol=1e-5, atol=0)  # float32 Hessians: in-process running mean
    ray2 = bitalloc.profile("random:llama-tiny", workers=2, out=out, **kw)  # resumed from the checkpoints
    assert ray2.metadata["ray"]["hessians"]["resumed"] == 2 and ray2.metadata["ray"]["proxy"]["computed"] == 0
    assert np.array_equal(ray2.proxy, ray1.proxy) and np.array_equal(ray2.table(), ray1.table())
    assert (tmp_path / "p.measure-checkpoint.hessians.files").is_dir()
