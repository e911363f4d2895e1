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
    sp.add_argument("--base", default="per-budget",
                    help="exllamav3: its base model: per-budget (default: the dearest scheme whose uniform plan fits "
                         "each budget), lowest (the cheapest scheme for every budget) or a scheme name")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--model", default=None, help="model spec (default: the profile's)")
    return sp


def _exllamav3_plans(profile, budgets, ctx, base: str) -> list:
    """exllamav3's plans: one measurement per distinct base (see ``peers.exllamav3_base``)."""
    from .peers import exllamav3_base, peer_plan, peer_scores

    if base == "per-budget":
        bases = [exllamav3_base(profile, b) for b in budgets]
    elif base == "lowest":
        bases = [None] * len(budgets)
    else:
        bases = [base] * len(budgets)
    scores = {}
    for s in dict.fromkeys(bases):
        scores[s] = peer_scores("exllamav3", ctx, base=s)
        print(f"exllamav3 (base {scores[s].info['base']}): scored in {scores[s].info.get('seconds', 0):.1f} s")
    return [peer_plan("exllamav3", profile, scores=scores[s], budget=b) for s, b in zip(bases, budgets)]


def cmd_peer(a) -> int:
    from . import api
    from .context import peer_context
    from .peers import PeerError, peer_plan, peer_scores, refine_plan

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise PeerError(f"--out: {out} exists and is not a folder")
    profile = api.load_profile(a.profile)
    budgets = [api.parse_budget(b) for b in a.budget]  # bad budgets fail before the model loads
    if a.base != "per-budget" and a.method != "exllamav3":
        raise PeerError(f"--base is exllamav3's base model; {a.method} has none")
    if a.base not in ("per-budget", "lowest", *profile.schemes):
        raise PeerError(f"--base {a.base!r}: not per-budget, lowest or one of the profile's schemes "
                        f"({', '.join(profile.schemes)})")
    if a.method in ("uniform", "llamacpp-rules") or (a.method == "bitalloc" and not a.refine):
        plans = [peer_plan(a.method, profile, b) if a.method != "bitalloc" else api.solve(profile, b) for b in budgets]
    else:
        loaded = api.load(a.model or profile.model.get("spec", "smollm2"), log=None)
        ctx, data = peer_context(loaded, profile, rows=a.rows, seq_len=a.seq_len, profile_path=a.profile,
                                 what=a.method, seed=a.seed)
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
        elif a.method == "exllamav3":
            plans = _exllamav3_plans(profile, budgets, ctx, a.base)
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
