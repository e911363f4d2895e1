"""Are two plans' perplexities different, or within what the text resolves? (issue 14)

The peers table ranks plans by perplexity on a few thousand tokens. Where two plans differ by
a few per cent, that ranking may be the evaluation text's noise, not the plans'. This script
scores plans window by window on the same windows and compares each pair *paired*: the
perplexity ratio ``exp(Σ_w (NLL_A(w) - NLL_B(w)) / N)`` and its 95 % interval from a
bootstrap over windows (10,000 resamples, fixed seed), plus how many windows A wins. An
interval that holds 1 means the text does not tell the two plans apart.

Plans come from the benchmark's allocation files (``allocations*.json``: every method's
scheme per layer), rebuilt on a profile of the same model and schemes; the script checks
that each rebuilt plan spends the recorded bytes, and prints each plan's perplexity over the
windows so it can be checked against the results file.

    python experiments/paired_eval.py --profile /tmp/s30/profile-both.json \\
      --allocations experiments/results/peers/allocations-w32-all.json \\
      --allocations experiments/results/peers/allocations-w32-default.json \\
      --pair 3bpw:bitalloc-default:modelopt-gradient --pair 4.5bpw:bitalloc-default:higgs \\
      --text wikitext2-test.txt:32 --text tinyshakespeare.txt:32 --out /tmp/paired.json

``--decompose`` also splits each plan's loss on each text into what a fidelity objective sees
and what it cannot. Per scored token, the quantized model's extra NLL is
``ΔNLL = −log q(x) + log p(x)`` (``p`` the 16-bit model, ``x`` the text's token), and

    E_text[ΔNLL] = KL(p ‖ q) + C,   C = E_text[log p(x)/q(x)] − E_{x~p}[log p(x)/q(x)]

``KL(p ‖ q)`` is the fidelity to the 16-bit model that bitalloc and every peer minimise on
calibration text; ``C`` is how the quantization error lines up with the text's actual tokens
beyond that: zero on average when the text is what the model predicts, of either sign on text
the model predicts badly. The script also reports the change of the prediction's entropy
``H(q) − H(p)`` (a flatter prediction pays off on text the model is overconfident about).
Per plan and text it writes the means per token, and the paired comparisons get the same
split of their NLL difference. To tell whether a flatter prediction is what a text rewards, it
also scores the 16-bit model itself at softmax temperatures ``--temperatures`` (default 1.0,
1.05, 1.1, 1.2, 1.3): if the 16-bit model scores a text better at ``T > 1``, it is
overconfident there, and any perturbation that raises its entropy lowers that text's
perplexity without being closer to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _data import DATA  # noqa: E402


def rebuild(profile, names: list[str], record: dict, label: str):
    """The Plan of one allocation record (``schemes``: one name per layer of ``names``, the
    allocation file's ``layers``; matched to the profile's layers by name)."""
    from bitalloc.allocator.budget import parse_budget
    from bitalloc.allocator.solve import plan_from_choice

    by_name = dict(zip(names, record["schemes"], strict=True))
    assert set(by_name) == {l.fqn for l in profile.layers}, f"{label}: the allocation's layers are not the profile's"
    choice = [profile.scheme_index(by_name[l.fqn]) for l in profile.layers]
    plan = plan_from_choice(profile, choice, budget=parse_budget(record["budget"]["text"]))
    want = record["predicted"]["total_bytes"]
    assert plan.predicted["total_bytes"] == want, f"{label}: rebuilt plan has {plan.predicted['total_bytes']} bytes, recorded {want}"
    return plan


def next_logp(model, ids):
    """``(B, T-1, V)`` float32 log-probabilities of the next token at positions 0..T-2 of ``ids`` ``(B, T)``."""
    import torch

    return torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)


def text_nll(lp, ids):
    """``(B,)`` float64: each window's summed NLL of its own next tokens under ``lp`` (:func:`next_logp`)."""
    return -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).double().sum(1)


def window_nll(model, windows, batch: int = 4):
    """Summed next-token NLL per window ``(n,)`` float64 and the tokens scored per window."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            ids = windows[s:s + batch]  # (B, T)
            out.append(text_nll(next_logp(model, ids), ids))
    return torch.cat(out).numpy(), windows.shape[1] - 1


def reference_logp(model, windows, batch: int = 4):
    """The 16-bit model's next-token log-probabilities, kept as float16 ``[(B, T-1, V)]`` per batch
    (32 windows × 511 positions × 49,152 tokens: 1.6 GB), so each plan's KL needs no second 16-bit
    pass, and from the same forward its per-window NLL in full precision (:func:`window_nll`'s)."""
    import torch

    out, nll = [], []
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            ids = windows[s:s + batch]  # (B, T)
            lp = next_logp(model, ids)  # (B, T-1, V)
            nll.append(text_nll(lp, ids))  # (B,)
            out.append(lp.half())
            del lp
    return out, torch.cat(nll).numpy()


def window_split(model, windows, ref, batch: int = 4) -> dict:
    """Per window (each ``(n,)`` float64, summed over positions): the NLL, ``KL(p ‖ q)`` to the
    16-bit model ``p`` (``ref``: :func:`reference_logp`), and the entropies ``H(q)``, ``H(p)``."""
    import torch

    cols = {"nll": [], "kl": [], "h_q": [], "h_p": []}
    with torch.no_grad():
        for i, s in enumerate(range(0, len(windows), batch)):
            ids = windows[s:s + batch]  # (B, T)
            lq = next_logp(model, ids)  # (B, T-1, V)
            lp = ref[i].float()  # (B, T-1, V)
            assert lp.shape == lq.shape, f"reference batch {i} is {tuple(lp.shape)}, the model's {tuple(lq.shape)}"
            p, q = lp.exp(), lq.exp()
            cols["nll"].append(text_nll(lq, ids))  # (B,)
            cols["kl"].append((p * (lp - lq)).sum(-1).double().sum(1))
            cols["h_q"].append(-(q * lq).sum(-1).double().sum(1))
            cols["h_p"].append(-(p * lp).sum(-1).double().sum(1))
            del lq, lp, p, q
    return {k: torch.cat(v).numpy() for k, v in cols.items()}


def temperature_nll(ref, windows, temperatures) -> dict:
    """The 16-bit model's mean NLL per scored token at each softmax temperature, from ``ref``
    (:func:`reference_logp`: ``log_softmax(z / T)`` = ``log_softmax(log p / T)``)."""
    import torch

    out = {}
    for T in temperatures:
        total, n = 0.0, 0
        for i, s in enumerate(range(0, len(windows), len(ref[0]))):
            ids = windows[s:s + len(ref[i])]  # (B, T)
            lt = torch.log_softmax(ref[i].float() / T, -1)  # (B, T-1, V)
            total += float(text_nll(lt, ids).sum())
            n += ids[:, 1:].numel()
            del lt
        out[str(T)] = total / n
    return out


def split_means(s: dict, fp16_nll, tokens: int) -> dict:
    """Means per scored token: ΔNLL = KL + C (:func:`window_split` sums, ``fp16_nll`` per window)."""
    n = len(fp16_nll) * tokens
    d_nll = float((s["nll"] - fp16_nll).sum() / n)
    kl = float(s["kl"].sum() / n)
    return {"d_nll": d_nll, "kl": kl, "c": d_nll - kl, "d_entropy": float((s["h_q"] - s["h_p"]).sum() / n)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True, help="a profile of the model with the allocations' layers and schemes")
    ap.add_argument("--allocations", action="append", required=True, help="allocations*.json; later files win")
    ap.add_argument("--pair", action="append", required=True, help="BUDGET:METHOD_A:METHOD_B")
    ap.add_argument("--text", action="append", required=True, help="FILE:WINDOWS under --data")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--decompose", action="store_true",
                    help="also split each plan's extra NLL into KL to the 16-bit model and the rest (module docstring)")
    ap.add_argument("--temperatures", default="1.0,1.05,1.1,1.2,1.3",
                    help="with --decompose: softmax temperatures the 16-bit model is also scored at")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bitalloc
    from bitalloc.allocator import api
    from bitalloc.allocator.report import paired_ratio
    from bitalloc.sensitivity.artifact import write_json

    records, names = {}, {}
    for f in a.allocations:
        d = json.loads(Path(f).read_text())
        records.update(d["plans"])
        names.update({k: d["layers"] for k in d["plans"]})
    pairs = [p.split(":") for p in a.pair]
    for p in pairs:
        assert len(p) == 3, f"--pair {':'.join(p)}: BUDGET:METHOD_A:METHOD_B"
        for m in p[1:]:
            assert f"{m}-{p[0]}" in records, f"no allocation {m}-{p[0]} in {a.allocations}"
    prof = bitalloc.load_profile(a.profile)
    loaded = bitalloc.load(a.model, log=None)
    texts = {}
    for t in a.text:
        name, n = t.rsplit(":", 1)
        texts[name], _ = api.eval_windows(loaded, str(Path(a.data) / name), int(n), a.seq_len)

    keys = sorted({f"{m}-{p[0]}" for p in pairs for m in p[1:]})
    nll = {t: {} for t in texts}
    ppl, split, ref = {}, {t: {} for t in texts}, {}
    for t, w in texts.items():
        if a.decompose:  # one 16-bit pass gives both
            ref[t], nll[t]["fp16"] = reference_logp(loaded.model, w)
        else:
            nll[t]["fp16"], _ = window_nll(loaded.model, w)
    for k in keys:
        t0 = time.perf_counter()
        model = bitalloc.apply(loaded, rebuild(prof, names[k], records[k], k))
        for t, w in texts.items():
            if a.decompose:
                split[t][k] = window_split(model, w, ref[t])
                nll[t][k], tokens = split[t][k]["nll"], w.shape[1] - 1
            else:
                nll[t][k], tokens = window_nll(model, w)
            ppl[(t, k)] = float(math.exp(nll[t][k].sum() / (len(w) * tokens)))
        del model
        print(f"{k:32s} " + "  ".join(f"{t} ppl {ppl[(t, k)]:.3f}" for t in texts) + f"  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    means = {t: {k: split_means(v, nll[t]["fp16"], texts[t].shape[1] - 1) for k, v in split[t].items()} for t in texts}
    temps = {}
    if a.decompose:
        print(f"\n16-bit model, mean NLL per token at softmax temperature T ({a.temperatures}):")
        for t, w in texts.items():
            temps[t] = temperature_nll(ref[t], w, [float(x) for x in a.temperatures.split(",")])
            print(f"  {t:22s} " + "  ".join(f"T={T}: {v:.4f}" for T, v in temps[t].items()))
        print(f"\n{'plan':32s} {'text':22s} {'ΔNLL':>8s} {'KL':>8s} {'C':>8s} {'ΔH':>8s}   (nats per token)")
        for t in texts:
            for k, m in means[t].items():
                print(f"{k:32s} {t:22s} {m['d_nll']:8.4f} {m['kl']:8.4f} {m['c']:8.4f} {m['d_entropy']:8.4f}")

    rows = []
    print(f"\n{'budget':7s} {'A':22s} {'B':20s} {'text':22s} {'ppl A':>9s} {'ppl B':>9s} {'A/B':>7s} {'95% interval':>17s} {'A wins':>7s}")
    for budget, ma, mb in pairs:
        for t, w in texts.items():
            ka, kb = f"{ma}-{budget}", f"{mb}-{budget}"
            r = paired_ratio(nll[t][ka], nll[t][kb], w.shape[1] - 1)  # ratio A/B, bootstrap interval, A's wins
            rows.append({"budget": budget, "a": ma, "b": mb, "text": t, "windows": len(w), "ppl_a": ppl[(t, ka)],
                         "ppl_b": ppl[(t, kb)], **r})
            if a.decompose:  # the NLL difference A − B per token, split the same way
                ma_, mb_ = means[t][ka], means[t][kb]
                rows[-1]["split"] = {x: ma_[x] - mb_[x] for x in ("d_nll", "kl", "c", "d_entropy")}
            print(f"{budget:7s} {ma:22s} {mb:20s} {t:22s} {ppl[(t, ka)]:9.2f} {ppl[(t, kb)]:9.2f} {r['ratio']:7.4f} "
                  f"[{r['lo']:.4f}, {r['hi']:.4f}] {r['a_wins']:3d}/{r['windows']}")
    fp16 = {t: float(math.exp(nll[t]["fp16"].sum() / (len(w) * (w.shape[1] - 1)))) for t, w in texts.items()}
    write_json(a.out, {"schema": "bitalloc.paired-eval/1", "profile": a.profile, "allocations": a.allocations,
                       "seq_len": a.seq_len, "texts": {t: len(w) for t, w in texts.items()}, "fp16_ppl": fp16,
                       "bootstrap": {"draws": 10_000, "seed": 0}, "rows": rows,
                       **({"split": means, "split_units": "nats per scored token", "fp16_nll_at_temperature": temps}
                          if a.decompose else {})})
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
