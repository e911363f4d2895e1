"""The executor: apply a plan (packed bytes == predicted bytes), save / load a quantized model
(identical logits, tied weights stored once), and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import bitalloc
from bitalloc.allocator.executor import ExecutorError, apply, packed_weight_bytes
from bitalloc.allocator.quantized_io import load_quantized, save_quantized
from bitalloc.allocator.plan import LayerPlan, Plan, PlanError
from bitalloc.allocator.solve import plan_from_choice
from bitalloc.kernels.formats import parse_scheme
from bitalloc.kernels.qlinear import QuantLinear
from bitalloc.sensitivity.models import fingerprint

ROOT = Path(__file__).resolve().parents[2]
SCHEMES = ["w2g64z+h4r0.05", "w8a8", "fp16", "w4g32z", "w3g64z"]
SPECS = ["random:llama-tiny", "random:gpt2-tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/allocator/conftest.py


def _ids(n: int = 2, t: int = 12, vocab: int = 260) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


class Case:
    def __init__(self, spec: str):
        self.spec = spec
        self.loaded = bitalloc.load(spec, log=None)
        self.fp = fingerprint(self.loaded.model)
        prof = bitalloc.profile(self.loaded, n_samples=2, seq_len=16, kl_samples=1, schemes=SCHEMES,
                                 ref_schemes=["w3g64z"], progress=False, log=None)
        self.plan = plan_from_choice(prof, [i % len(SCHEMES) for i in range(len(prof.layers))], label="mixed")
        self.qmodel = apply(self.loaded.model, self.plan, fingerprint=self.fp)
        self.ref = _logits(self.qmodel, _ids())


_CASES: dict[str, Case] = {}
_SAVED: dict[str, Path] = {}


def _case(spec: str) -> Case:
    if spec not in _CASES:
        _CASES[spec] = Case(spec)
    return _CASES[spec]


def _saved(spec: str, tmp_path_factory) -> Path:
    if spec not in _SAVED:
        d = tmp_path_factory.mktemp("saved") / "q"
        c = _case(spec)
        save_quantized(c.qmodel, c.plan, d)
        _SAVED[spec] = d
    return _SAVED[spec]


@pytest.fixture(scope="module", params=SPECS)
def case(request) -> Case:
    return _case(request.param)


@pytest.fixture(scope="module")
def llama() -> Case:
    return _case("random:llama-tiny")


@pytest.fixture(scope="module")
def saved(case, tmp_path_factory) -> Path:
    return _saved(case.spec, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_saved(tmp_path_factory) -> Path:
    return _saved("random:llama-tiny", tmp_path_factory)


@pytest.fixture
def copy(llama_saved, tmp_path) -> Path:
    d = tmp_path / "q"
    shutil.copytree(llama_saved, d)
    return d


def _file_layer_bytes(path: Path, plan: Plan) -> dict[str, int]:
    """Bytes of each planned layer's weight tensors (packed buffers or fp16 weight; not bias) in the file."""
    from safetensors import safe_open

    out = {fqn: 0 for fqn in plan.layers}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            layer, _, buf = k.rpartition(".")
            if layer in out and buf != "bias":
                t = f.get_tensor(k)
                out[layer] += t.numel() * t.element_size()
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


# ---------------------------------------------------------------------------------------
# apply


def test_apply_packed_bytes_equal_plan(case):
    plan, q = case.plan, case.qmodel
    assert {lp.scheme for lp in plan.layers.values()} == set(SCHEMES)  # mixed: split, w8a8, fp16, ...
    mods = dict(q.named_modules())
    for fqn, lp in plan.layers.items():
        m = mods[fqn]
        if parse_scheme(lp.scheme).is_quantized:
            assert isinstance(m, QuantLinear) and m.scheme.name == lp.scheme
            assert m.weight_nbytes() * 8 == lp.bits
        else:
            assert not isinstance(m, QuantLinear) and m.weight.numel() * 16 == lp.bits
    assert packed_weight_bytes(q, plan) == plan.quantized_bits // 8 == plan.predicted["quantized_bytes"]
    # the original model is untouched, and shares its tensors with the quantized one
    orig = dict(case.loaded.model.named_modules())
    assert not any(isinstance(m, QuantLinear) for m in orig.values())
    emb = case.loaded.model.get_input_embeddings()
    assert q.get_input_embeddings().weight is emb.weight
    assert fingerprint(case.loaded.model)["sha256"] == case.fp["sha256"]
    assert torch.isfinite(case.ref).all()
    assert not torch.equal(case.ref, _logits(case.loaded.model, _ids()))


def test_apply_errors(llama):
    model, plan, fp = llama.loaded.model, llama.plan, llama.fp
    first = next(lp for lp in plan.layers.values() if lp.shape[0] != lp.shape[1])

    def with_layers(layers, **kw):
        return Plan(model=plan.model, layers=layers, **kw)

    bad = with_layers({"model.layers.9.mlp.up_proj": LayerPlan("model.layers.9.mlp.up_proj", "w4g32z", (128, 64),
                                                                parse_scheme("w4g32z").storage_bits(128, 64))})
    with pytest.raises(ExecutorError, match="does not have") as e:
        apply(model, bad)
    _one_line(e)
    other = dict(fp, sha256="0" * 64)
    with pytest.raises(ExecutorError, match="different model") as e:
        apply(model, plan, fingerprint=other)
    _one_line(e)
    swapped = LayerPlan(first.fqn, "w4g32z", first.shape[::-1], parse_scheme("w4g32z").storage_bits(*first.shape[::-1]))
    with pytest.raises(ExecutorError, match="plan says"):
        apply(model, with_layers({first.fqn: swapped}))
    norm = LayerPlan("model.norm", "w4g32z", (64, 64), parse_scheme("w4g32z").storage_bits(64, 64))
    with pytest.raises(ExecutorError, match="nn.Linear or Conv1D"):
        apply(model, with_layers({"model.norm": norm}))
    with pytest.raises(ExecutorError, match="pattern rules"):
        apply(model, with_layers({}, rules=(("*.mlp.*", "w4g32z"),)))
    with pytest.raises(ExecutorError, match="already a QuantLinear"):
        apply(llama.qmodel, plan)
    assert isinstance(ExecutorError("x"), PlanError)  # callers catching PlanError keep working


# ---------------------------------------------------------------------------------------
# save / load


def test_save_file_bytes_equal_plan(case, saved):
    assert {p.name for p in saved.iterdir()} == {"model.safetensors", "plan.json", "quantized.json"}
    per_layer = _file_layer_bytes(saved / "model.safetensors", case.plan)
    for fqn, lp in case.plan.layers.items():
        assert per_layer[fqn] * 8 == lp.bits, fqn
    assert sum(per_layer.values()) == case.plan.quantized_bits // 8
    meta = json.loads((saved / "quantized.json").read_text())
    assert meta["packed_weight_bytes"] == meta["predicted_quantized_bytes"] == case.plan.quantized_bits // 8
    assert Plan.load(saved / "plan.json").layers == case.plan.layers


def test_tied_weights_stored_once(case, saved):
    from safetensors import safe_open

    net = case.loaded.model
    emb, head = net.get_input_embeddings(), net.get_output_embeddings()
    assert head.weight is emb.weight  # both tiny models tie lm_head to the embedding
    names = {id(m): n for n, m in net.named_modules()}
    emb_w, head_w = f"{names[id(emb)]}.weight", f"{names[id(head)]}.weight"
    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(emb_w).dtype == torch.float16
    assert emb_w in keys and head_w not in keys
    assert json.loads((saved / "quantized.json").read_text())["aliases"] == {head_w: emb_w}


def test_load_gives_identical_logits(case, saved):
    model, plan = load_quantized(saved)
    assert plan.layers == case.plan.layers
    assert torch.equal(_logits(model, _ids()), case.ref)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied again
    assert packed_weight_bytes(model, plan) == plan.quantized_bits // 8
    for fqn, m in model.named_modules():
        if fqn in plan.layers and isinstance(m, QuantLinear):
            ref = case.qmodel.get_submodule(fqn)
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert not model.training


def test_quantized_tied_lm_head(llama, tmp_path):
    """lm_head tied to the embedding and planned: quantized as one unit, stored once (packed)."""
    net, plan = llama.loaded.model, llama.plan
    head = net.lm_head
    shape = tuple(head.weight.shape)
    layers = dict(plan.layers)
    layers["lm_head"] = LayerPlan("lm_head", "w4g32z", shape, parse_scheme("w4g32z").storage_bits(*shape))
    p2 = Plan(model=plan.model, layers=layers)
    emb_before = net.model.embed_tokens.weight.detach().clone()
    q = apply(net, p2, fingerprint=llama.fp)
    assert torch.equal(net.model.embed_tokens.weight, emb_before)  # original untouched
    assert isinstance(q.lm_head, QuantLinear)
    assert torch.equal(q.model.embed_tokens.weight, q.lm_head.dequantized_weight())  # one unit
    ref = _logits(q, _ids())
    d = save_quantized(q, p2, tmp_path / "q")
    per_layer = _file_layer_bytes(d / "model.safetensors", p2)
    assert sum(per_layer.values()) == p2.quantized_bits // 8 and per_layer["lm_head"] * 8 == layers["lm_head"].bits
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert "model.embed_tokens.weight" not in set(f.keys())  # derived from the packed lm_head
    m2, _ = load_quantized(d)
    assert torch.equal(_logits(m2, _ids()), ref)
    assert torch.equal(m2.model.embed_tokens.weight, m2.lm_head.dequantized_weight())
    q.model.embed_tokens.weight.data.add_(1.0)  # edited after apply: no longer the packed weight
    with pytest.raises(ExecutorError, match="changed since apply"):
        save_quantized(q, p2, tmp_path / "q2")


def test_plan_high_idx_is_used(llama, tmp_path):
    """A plan that records the high-impact channels gets exactly those, through save and load."""
    plan = llama.plan
    fqn, lp = next((f, lp) for f, lp in plan.layers.items() if "+h" in lp.scheme)
    k = parse_scheme(lp.scheme).n_high(lp.shape[1])
    idx = tuple(range(lp.shape[1] - 1, lp.shape[1] - 1 - 2 * k, -2))  # unsorted, not the column-energy pick
    p2 = Plan(model=plan.model, layers=dict(plan.layers, **{fqn: LayerPlan(fqn, lp.scheme, lp.shape, lp.bits, high_idx=idx)}))
    q = apply(llama.loaded.model, p2)
    assert q.get_submodule(fqn).high_idx.tolist() == sorted(idx)
    m2, _ = load_quantized(save_quantized(q, p2, tmp_path / "q"))
    assert m2.get_submodule(fqn).high_idx.tolist() == sorted(idx)
    bad = Plan(model=plan.model, layers=dict(plan.layers, **{fqn: LayerPlan(fqn, lp.scheme, lp.shape, lp.bits, high_idx=idx[:-1])}))
    with pytest.raises(ExecutorError, match="high channels"):
        apply(llama.loaded.model, bad)


def test_save_errors(llama, tmp_path):
    with pytest.raises(ExecutorError, match="not a QuantLinear"):
        save_quantized(llama.loaded.model, llama.plan, tmp_path / "a")
    from bitalloc.sensitivity.models import load_model

    raw = load_model("random:llama-tiny")  # float32 values, not rounded to 16-bit
    q = apply(raw.model, llama.plan)
    with pytest.raises(ExecutorError, match="float16 cannot represent") as e:
        save_quantized(q, llama.plan, tmp_path / "b")
    _one_line(e)
    nospec = Plan(model={"fingerprint": llama.plan.model["fingerprint"]}, layers=llama.plan.layers)
    with pytest.raises(ExecutorError, match="spec"):
        save_quantized(llama.qmodel, nospec, tmp_path / "c")


def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _rewrite_tensors(d: Path, fn, fix_checksum: bool = True) -> None:
    """Rewrite model.safetensors through fn(tensors) and (optionally) update quantized.json's checksum."""
    from safetensors.torch import load_file, save_file

    from bitalloc.sensitivity.artifact import file_sha256 as _sha256_file

    st = d / "model.safetensors"
    tensors = load_file(str(st))
    fn(tensors)
    save_file(tensors, str(st))
    if fix_checksum:
        _edit_json(d / "quantized.json", lambda m: m["safetensors"].update(sha256=_sha256_file(st), bytes=st.stat().st_size))


def _flip_byte(d: Path) -> None:
    st = d / "model.safetensors"
    b = bytearray(st.read_bytes())
    b[len(b) // 2] ^= 0xFF
    st.write_bytes(bytes(b))


def _corrupt_header(d: Path) -> None:
    st = d / "model.safetensors"
    b = bytearray(st.read_bytes())
    b[8:20] = b"\x00" * 12  # the JSON header starts at byte 8
    st.write_bytes(bytes(b))
    from bitalloc.sensitivity.artifact import file_sha256 as _sha256_file

    _edit_json(d / "quantized.json", lambda m: m["safetensors"].update(sha256=_sha256_file(st)))


def _first_packed(tensors, suffix=".qweight") -> str:
    return next(k for k in tensors if k.endswith(suffix))


def _wrong_shape(t):
    k = _first_packed(t)
    t[k] = torch.cat([t[k], t[k][:1]])


def _wrong_dtype(t):
    k = _first_packed(t)
    t[k] = t[k].to(torch.int64)


def _drop_tensor(t):
    del t[_first_packed(t, ".scales")]


def _extra_tensor(t):
    t["model.extra.weight"] = torch.zeros(2)


def _truncate(p: Path) -> None:
    p.write_text(p.read_text()[: len(p.read_text()) // 2])


def _other_sha(m) -> None:
    m["model"]["fingerprint"]["sha256"] = "f" * 64


BAD_SAVES = {
    "missing safetensors": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "missing plan": (lambda d: (d / "plan.json").unlink(), "plan.json is missing"),
    "missing envelope": (lambda d: (d / "quantized.json").unlink(), "quantized.json is missing"),
    "no directory": (lambda d: shutil.rmtree(d), "no such directory"),
    "bytes flipped": (_flip_byte, "checksum"),
    "truncated file": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
                       "checksum"),
    "corrupt header": (_corrupt_header, "corrupt safetensors"),
    "envelope truncated": (lambda d: _truncate(d / "quantized.json"), "is not valid JSON"),
    "envelope schema": (lambda d: _edit_json(d / "quantized.json", lambda m: m.update(schema="bitalloc.quantized/99")),
                        "unsupported schema"),
    "envelope field": (lambda d: _edit_json(d / "quantized.json", lambda m: m.pop("aliases")), "field 'aliases'"),
    "envelope not a dict": (lambda d: (d / "quantized.json").write_text("[1, 2]"), "not a bitalloc"),
    "plan truncated": (lambda d: _truncate(d / "plan.json"), "not valid JSON"),
    "plan schema": (lambda d: _edit_json(d / "plan.json", lambda m: m.update(schema="bitalloc.plan/9")), "unsupported schema .bitalloc.plan/9."),
    "plan for another model": (lambda d: _edit_json(d / "plan.json", _other_sha), "different models"),
    "both for another model": (lambda d: (_edit_json(d / "plan.json", _other_sha),
                                          _edit_json(d / "quantized.json", _other_sha)), "not the model the plan was made for"),
    "plan scheme edited": (lambda d: _edit_json(d / "plan.json", lambda m: next(
        lp for lp in m["layers"].values() if lp["scheme"] == "w4g32z").update(
        scheme="w4g64z", bits=parse_scheme("w4g64z").storage_bits(*next(
            lp for lp in m["layers"].values() if lp["scheme"] == "w4g32z")["shape"]))), "different layers or schemes"),
    "spec unknown": (lambda d: _edit_json(d / "quantized.json", lambda m: m.update(spec="random:nope")),
                     "cannot load the base model"),
    "tensor wrong shape": (lambda d: _rewrite_tensors(d, _wrong_shape), "has shape"),
    "tensor wrong dtype": (lambda d: _rewrite_tensors(d, _wrong_dtype), "expected int32"),
    "tensor missing": (lambda d: _rewrite_tensors(d, _drop_tensor), "missing"),
    "tensor unexpected": (lambda d: _rewrite_tensors(d, _extra_tensor), "unexpected"),
    "tensor replaced, checksum stale": (lambda d: _rewrite_tensors(d, _wrong_shape, fix_checksum=False), "checksum"),
}


@pytest.mark.parametrize("what", list(BAD_SAVES))
def test_load_bad_input(copy, what):
    edit, match = BAD_SAVES[what]
    edit(copy)
    with pytest.raises(ExecutorError, match=match) as e:
        load_quantized(copy)
    _one_line(e)


def test_load_into_other_model(llama_saved):
    """``loaded=``: a base model that is not the plan's is refused (unless told not to check)."""
    gpt2 = bitalloc.load("random:gpt2-tiny", log=None)
    with pytest.raises(ExecutorError, match="different model"):
        load_quantized(llama_saved, loaded=gpt2)
    with pytest.raises(ExecutorError, match="does not have"):
        load_quantized(llama_saved, loaded=gpt2, check_fingerprint=False)


# ---------------------------------------------------------------------------------------
# the end-to-end benchmark's code paths (CPU, tiny config)


def test_bench_e2e_cpu_smoke(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import bench_e2e
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    out = tmp_path / "bench.json"
    rc = bench_e2e.main(["--cpu-smoke", "--plans", "mixed", "--batches", "1", "--steps", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())
    assert {r["plan"] for r in res["rows"]} == {"fp16", "mixed"} and not res["errors"]
    assert all(r["tokens_per_s"] > 0 and r["check"] < 2e-2 for r in res["rows"])
    schemes = res["plans"]["mixed"]["schemes"]
    assert {"w8a8", bench_e2e.SPLIT_SCHEME} <= set(schemes)
    assert "tok/s" in printed


def test_bench_e2e_without_gpu_exits_cleanly():
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_e2e.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "no CUDA GPU", r.stdout + r.stderr


# ---------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_smollm2_mixed_plan_roundtrip(tmp_path):
    """SmolLM2 with a mixed plan: packed bytes == plan, saved and reloaded to identical logits, tie kept."""
    from bitalloc.sensitivity.layers import find_layers

    loaded = bitalloc.load("smollm2", log=None)
    net = loaded.model
    fp = fingerprint(net)
    layers, skipped = find_layers(net)
    assert any(s.fqn == "lm_head" for s in skipped)  # tied to embed_tokens: not planned
    cycle = ["w4g32z", "w2g64z+h4r0.05", "w8a8", "fp16", "w3g64z", "w4g128"]
    plan = Plan(
        model={"spec": "smollm2", "fingerprint": fp},
        layers={l.fqn: LayerPlan(l.fqn, cycle[i % len(cycle)], l.shape, parse_scheme(cycle[i % len(cycle)]).storage_bits(*l.shape))
                for i, l in enumerate(layers)},
    )
    q = apply(net, plan, fingerprint=fp)
    assert packed_weight_bytes(q, plan) == plan.quantized_bits // 8
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    ref = _logits(q, ids)
    d = save_quantized(q, plan, tmp_path / "smol")
    per_layer = _file_layer_bytes(d / "model.safetensors", plan)
    assert all(per_layer[f] * 8 == lp.bits for f, lp in plan.layers.items())
    assert sum(per_layer.values()) == plan.quantized_bits // 8
    del q, net, loaded
    m2, p2 = load_quantized(d)
    assert torch.equal(_logits(m2, ids), ref)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert p2.layers == plan.layers


def test_split_with_its_own_high_format():
    """A split whose high part names its own format (per-channel symmetric, another group
    size) runs through profile, plan and executor: bytes equal the plan's prediction, and
    each layer computes with its dequantized weight."""
    loaded = bitalloc.load("random:llama-tiny", log=None)
    schemes = ["w2g64z+h3csr0.05", "w3g64z+h4g128r0.1", "w2g64z"]
    prof = bitalloc.profile(loaded, n_samples=2, seq_len=16, kl_samples=1, schemes=schemes,
                             ref_schemes=["w2g64z"], progress=False, log=None)
    assert prof.schemes == schemes
    plan = plan_from_choice(prof, [i % 2 for i in range(len(prof.layers))], label="own-high")
    q = apply(loaded.model, plan)
    assert packed_weight_bytes(q, plan) == plan.predicted["quantized_bytes"]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    seen = set()
    for fqn, lp in plan.layers.items():
        m = q.get_submodule(fqn)
        assert isinstance(m, QuantLinear) and m.scheme.name == lp.scheme
        seen.add(lp.scheme)
        xi = x[:, : m.in_features] if m.in_features <= 64 else torch.randn(3, m.in_features)
        ref = torch.nn.functional.linear(xi, m.dequantized_weight(), None if m.bias is None else m.bias.float())
        torch.testing.assert_close(m(xi).float(), ref, rtol=2e-2, atol=2e-2)
    assert seen == set(schemes[:2])


def test_api_apply_and_load_quantized_take_a_bare_transformers_model(tmp_path_factory):
    """``bitalloc.apply`` and ``load_quantized(loaded=)`` accept the transformers model itself,
    not only bitalloc's LoadedModel: a causal LM's own ``.model`` attribute (its base model)
    is not mistaken for the network (it was: the fingerprint check failed on the base model's
    weights)."""
    c = _case("random:llama-tiny")
    ids = _ids()
    for bare in (False, True):
        fresh = bitalloc.load("random:llama-tiny", log=None)  # load_quantized modifies the model it is given
        model = fresh.model if bare else fresh
        torch.testing.assert_close(_logits(bitalloc.apply(model, c.plan), ids), c.ref, rtol=0, atol=0)
        m2, _ = load_quantized(_saved("random:llama-tiny", tmp_path_factory), loaded=model)
        torch.testing.assert_close(_logits(m2, ids), c.ref, rtol=0, atol=0)
