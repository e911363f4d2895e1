"""``bitalloc peer``: a peer allocator's plans (or bitalloc's refined end to end) from a profile.

    bitalloc peer hawq-v3 --profile profile.json --budget 3bpw --budget 4bpw --out plans/
    bitalloc peer bitalloc --refine 100 --profile profile.json --budget 3bpw --out plans/

The model and the calibration tokens are the profile's own (its recorded model spec and
calibration), so the peer scores exactly the candidates the profile measured, with the
profile's quantizer and exact bits. Scored peers score once and search every budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_peer"]


def add_parser(sub) -> Any:
    from .peers import PEERS

    names = ["bitalloc", *PEERS]
    sp = sub.add_parser("peer", help="another allocator's plans on bitalloc's candidates (" + ", ".join(names) + ")")
    sp.add_argument("method", choices=names, metavar="METHOD", help="one of: " + ", ".join(names))
    sp.add_argument("--profile", required=True, help="a profile JSON (its model, calibration, schemes and quantizer)")
    sp.add_argument("--budget", action="append", required=True, help="budget (repeatable): 3bpw, 90MB, ...")
    sp.add_argument("--out", required=True, help="folder for the plans (<method>-<budget>.json)")
    sp.add_argument("--rows", type=int, default=4, help="calibration rows the peer's score uses (default 4)")
    sp.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the profile's)")
    sp.add_argument("--refine", type=int, default=0,
                    help="bitalloc: end-to-end refinement evaluations after the ILP (default 0: off)")
    sp.add_argument("--generations", type=int, default=20, help="evopress: generations (theirs 150)")
    sp.add_argument("--offspring", type=int, default=8, help="evopress: offspring per generation (theirs 128)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--model", default=None, help="model spec (default: the profile's)")
    return sp


def _context(profile, a, loaded):
    import torch

    from bitalloc.sensitivity.calibration import CalibrationSpec, as_batches, load_calibration
    from bitalloc.sensitivity.peer_context import PeerContext

    c = profile.calibration
    spec = CalibrationSpec(source=c.get("source", "generated"), path=c.get("path"), n_samples=int(c["n_samples"]),
                           seq_len=int(c["seq_len"]), seed=int(c.get("seed", 0)))
    data = load_calibration(spec, loaded.model, loaded.tokenizer)
    assert isinstance(data, torch.Tensor), "peer methods need a causal LM's token windows"
    rows = max(1, min(a.rows, data.shape[0]))
    length = a.seq_len or data.shape[1]
    quantizer = (profile.metadata or {}).get("quantizer", "rtn")
    return PeerContext(loaded.model, profile.layers, list(profile.schemes), as_batches(data[:rows, :length], 1),
                       quantizer=quantizer, seed=a.seed), data


def cmd_peer(a) -> int:
    from . import api
    from .peers import PeerError, peer_plan, peer_scores, refine_plan

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise PeerError(f"--out: {out} exists and is not a folder")
    profile = api.load_profile(a.profile)
    budgets = [api.parse_budget(b) for b in a.budget]  # bad budgets fail before the model loads
    if a.method in ("uniform", "llamacpp-rules") or (a.method == "bitalloc" and not a.refine):
        plans = [peer_plan(a.method, profile, b) if a.method != "bitalloc" else api.solve(profile, b) for b in budgets]
    else:
        loaded = api.load(a.model or profile.model.get("spec", "smollm2"), log=None)
        ctx, data = _context(profile, a, loaded)
        if a.method in ("bitalloc", "evopress"):
            from bitalloc.sensitivity.calibration import as_batches

            n = data.shape[0]
            fit = ctx.fitness([as_batches(data[n - 1:, :256], 1), as_batches(data[n - 2:, :256], 1)])
            if a.method == "bitalloc":
                plans = [refine_plan(profile, api.solve(profile, b), b, fit, evaluations=a.refine, seed=a.seed,
                                     stage=1) for b in budgets]
            else:
                plans = [peer_plan("evopress", profile, b, fitness=fit, seed=a.seed, generations=a.generations,
                                   offspring=a.offspring, stages=(2, 1)) for b in budgets]
        else:
            scores = peer_scores(a.method, ctx)
            print(f"{a.method}: scored in {scores.info.get('seconds', 0):.1f} s")
            plans = [peer_plan(a.method, profile, scores=scores, budget=b) for b in budgets]
    out.mkdir(parents=True, exist_ok=True)
    for b, plan in zip(budgets, plans):
        path = out / f"{a.method}-{b.name}.json"
        plan.save(path)
        print(f"{a.method} {b.name}: {plan.predicted['bpw']:.3f} bpw, predicted loss "
              f"{plan.predicted['loss_total']:.4f} -> {path}")
    return 0
