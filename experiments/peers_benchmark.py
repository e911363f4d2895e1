"""bitalloc against every allocator people use instead, on the same work (issue 14).

SmolLM2-135M (real weights), bitalloc's default candidate schemes and quantizer, one
calibration set (WikiText-2 validation, the profile's own tokens) and exact-bit budgets for
every method. Each peer of :mod:`bitalloc.allocator.peers` scores bitalloc's candidates its
own way and searches its own way. ``bitalloc-default`` is what ``bitalloc run`` does by default
(the selection among the profile's candidate calibrations, on a profile of the default kind:
``--ref-method hybrid --fisher-table --fisher-labels both``); ``bitalloc`` is the ILP on the profile's own table
(optionally refined end to end: ``bitalloc-refine``); ``bitalloc-select`` the selection with
more rows, both Fisher label kinds, tied candidates and a refinement. Every plan is evaluated by WikiText-2 test
perplexity and KL to the 16-bit model, and on text of another kind (Tiny Shakespeare) so a
win is not a WikiText artefact.

    python experiments/peers_benchmark.py --profile PROFILE.json            # the full run
    python experiments/peers_benchmark.py --profile PROFILE.json --quick    # 8 windows: for trying changes

A profile made with ``--quantizer gptq`` runs every method with GPTQ (the Hessians it recorded):
each peer's scores, EvoPress's and bitalloc's end-to-end measurements and the evaluated models.

Rows ``{"method", "budget", "bpw", "ppl", "kl", "profile_s", "search_s", ...}`` go to
``experiments/results/peers/results.json`` (each plan's schemes in ``allocations.json``; the plans in ``plans/``, not committed); every step is cached under
``--work`` (scores, plans, evaluated rows), so a run cut short resumes where it stopped.
Seeds are fixed (``--seed``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _data import DATA, wikitext_files  # noqa: E402

RESULTS = HERE / "results" / "peers"
BUDGETS = ("2.5bpw", "3bpw", "3.5bpw", "4bpw", "4.5bpw")
SCORED = ("hawq-v3", "higgs", "modelopt-gradient", "modelopt-kl", "autoround", "exllamav2", "exllamav3")
METHODS = ("bitalloc-default", "bitalloc", "bitalloc-refine", "bitalloc-select", *SCORED, "evopress", "llamacpp-rules",
           "uniform")
# What each peer's score spends on this 2-core CPU (their defaults where affordable; see the
# score functions' docstrings for the peers' own defaults). Rows = calibration rows of 512 tokens.
# (rows, tokens per row) of the calibration set each peer's score uses; bitalloc's own profile used
# 32 x 512 for its Hessians and 2 x 512 (every 4th position) for its 630 reference KL items.
SCORE_TOKENS = {"hawq-v3": (2, 512), "higgs": (1, 512), "modelopt-gradient": (8, 512), "modelopt-kl": (1, 128),
                "autoround": (4, 512), "exllamav2": (4, 512), "exllamav3": (1, 128)}
SCORE_OPTIONS: dict[str, dict] = {"higgs": {"noise_wbits": (2, 3, 4)}, "hawq-v3": {"n_probes": 16}}


def _write(path: Path, obj) -> None:
    from bitalloc.sensitivity.artifact import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj, indent=1)


def _scores_to_json(s) -> dict:
    return {"method": s.method, "table": s.table.tolist(), "groups": [list(g) for g in s.groups] if s.groups else None,
            "info": {k: v for k, v in s.info.items() if isinstance(v, (str, int, float, bool, list, dict))}}


def _scores_from_json(d: dict):
    from bitalloc.sensitivity.peer_context import PeerScores

    return PeerScores(d["method"], d["table"], tuple(tuple(g) for g in d["groups"]) if d["groups"] else None, d["info"])


class Bench:
    """The model, profile, calibration and evaluation windows, loaded once."""

    def __init__(self, a):
        from bitalloc.allocator import api
        from bitalloc.allocator.context import profile_calibration, profile_quantizer
        from bitalloc.sensitivity.calibration import as_batches

        self.a, self.work = a, Path(a.work)
        self.cache: dict = {}  # (layer, scheme, channels, quantizer) -> packed layer, shared by every plan
        valid, test = wikitext_files(a.data)
        self.loaded = api.load("smollm2")
        self.profile = api.load_profile(a.profile)
        # the profile's own rows of the validation text under --data (checked against its hash); a gptq
        # profile's Hessians (the file it recorded), for every peer's quantizer and the executor
        self.calib = profile_calibration(self.loaded, self.profile, source=str(valid))
        _, _, _, self.hessians = profile_quantizer(self.loaded, self.profile, "the peers benchmark",
                                                   profile_path=a.profile)
        self.as_batches = as_batches
        from bitalloc.sensitivity.peer_context import WeightCache

        # one cache of quantized weights for every peer's context (a full GPTQ table is ~10 min here)
        self.weights = WeightCache(int(a.weight_cache_gib * 2**30))
        table = 4 * sum(l.n_params for l in self.profile.layers) * len(self.profile.schemes)  # float32 weights
        if table > self.weights.max_bytes:
            # each exllamav3 base (and each other scored method) then re-quantizes what was dropped:
            # with GPTQ on the 24 default candidates that is ~10 min more per base (session 41)
            print(f"note: --weight-cache-gib {a.weight_cache_gib:g} holds less than the full table of fake-quantized "
                  f"weights ({table / 2**30:.1f} GiB); scored methods re-quantize what it drops", flush=True)
        self.default_fitness = None  # bitalloc-default's selection fitness, made once
        self.windows, _ = api.eval_windows(self.loaded, str(test), a.windows, a.seq_len)
        other = Path(a.data) / "tinyshakespeare.txt"
        self.other, _ = api.eval_windows(self.loaded, str(other), a.other_windows, a.seq_len) if other.is_file() else (None, None)

    def ctx(self, rows: int, length: int = 512):
        from bitalloc.allocator.context import peer_context

        return peer_context(self.loaded, self.profile, data=self.calib, rows=rows, seq_len=length,
                            hessians=self.hessians, seed=self.a.seed, weights=self.weights)[0]

    def fisher_profile(self):
        """The profile with its output-Fisher table (bitalloc.add_fisher_table over the first
        ``--fisher-rows`` calibration rows), cached under --work."""
        import bitalloc
        from bitalloc.allocator import api

        labels = self.a.fisher_labels
        path = self.work / f"profile-fisher{self.a.fisher_rows}{'' if labels == 'sampled' else '-' + labels}.json"
        if path.is_file():
            return api.load_profile(path)
        print(f"[bitalloc-select] Fisher table over {self.a.fisher_rows} calibration rows ({labels} labels) ...", flush=True)
        prof = bitalloc.add_fisher_table(self.profile, self.loaded, rows=self.a.fisher_rows, labels=labels,
                                         hessians=self.hessians)
        prof.save(path)
        return prof

    def fitness(self, ctx):
        """EvoPress-style stages: few tokens for offspring, more for survivors (rows of 512 from the end of
        the calibration set, so they are not the rows the peers' scores used)."""
        n = len(self.calib)
        stage_rows = [self.calib[n - r:] for r in self.a.fitness_rows]
        return ctx.fitness([self.as_batches(x[:, :self.a.fitness_len], 1) for x in stage_rows])


def scores_of(b: Bench, method: str, **options):
    from bitalloc.allocator.peers import peer_scores

    tag = "".join(f"-{v}" for v in options.values() if v is not None)  # e.g. exllamav3's base
    path = b.work / "scores" / f"{method}{tag}.json"
    if path.is_file():
        return _scores_from_json(json.loads(path.read_text()))
    ctx = b.ctx(*SCORE_TOKENS[method])
    print(f"[{method}{tag}] scoring on {ctx.n_tokens} tokens ...", flush=True)
    s = peer_scores(method, ctx, **{**SCORE_OPTIONS.get(method, {}), **options})
    _write(path, _scores_to_json(s))
    return s


def plans_of(b: Bench, method: str) -> dict:
    """{budget name: (plan, profile_s)} for one method, cached."""
    from bitalloc.allocator import api
    from bitalloc.allocator.peers import peer_plan
    from bitalloc.allocator.plan import Plan

    out = {}
    profile_s = None
    scores = None
    for budget in b.a.budgets:
        name = api.parse_budget(budget).name
        path = b.work / "plans" / f"{method}-{name}.json"
        meta = b.work / "plans" / f"{method}-{name}.meta.json"
        if path.is_file() and meta.is_file():
            out[name] = (Plan.load(path), json.loads(meta.read_text()))
            continue
        t0 = time.perf_counter()
        if method.startswith("bitalloc-default"):
            plan, profile_s = default_plan(b, budget)
        elif method == "bitalloc-select":
            import bitalloc

            prof = b.fisher_profile()
            fit = bitalloc.selection_fitness(b.loaded, prof, rows=b.a.select_rows, hessians=b.hessians)
            plan = bitalloc.select_plan(prof, budget, fit, refine=b.a.select_refine, seed=b.a.seed)
            sel = plan.solver["select"]
            profile_s = (b.profile.metadata.get("wall_s", {}).get("total") or 0.0) + prof.metadata["options"]["fisher"]["seconds"]
            print(f"[bitalloc-select] {name}: {sel['chosen']} ({', '.join(f'{k} {v:.4f}' for k, v in sel['fitness'].items())})"
                  + (f"; refined {sel['refine']['fitness_start']:.4f} -> {sel['refine']['fitness']:.4f} in "
                     f"{sel['refine']['evaluations']} measurements" if "fitness" in sel.get("refine", {}) else ""), flush=True)
        elif method in ("bitalloc", "bitalloc-refine"):
            plan = api.solve(b.profile, budget)
            profile_s = b.profile.metadata.get("wall_s", {}).get("total")
            if method == "bitalloc-refine":
                plan = refine_plan(b, plan, budget)
        elif method == "evopress":
            plan = peer_plan("evopress", b.profile, budget, fitness=b.fitness(b.ctx(1)), seed=b.a.seed,
                             **b.a.evo_options)
            profile_s = 0.0
        elif method in ("llamacpp-rules", "uniform"):
            plan, profile_s = peer_plan(method, b.profile, budget), 0.0
        else:
            options = {}
            if method == "exllamav3" and b.a.exl3_base == "per-budget":
                from bitalloc.allocator.peers import exllamav3_base

                options = {"base": exllamav3_base(b.profile, budget)}
                if scores is not None and scores.info.get("base") != options["base"]:
                    scores = None  # another budget's base: its own measurement
            if scores is None:
                t1 = time.perf_counter()
                scores = scores_of(b, method, **options)
                profile_s = scores.info.get("seconds", time.perf_counter() - t1)
            t0 = time.perf_counter()
            plan = peer_plan(method, b.profile, budget, scores)
        search_s = time.perf_counter() - t0
        m = {"profile_s": profile_s, "search_s": search_s if method.startswith(("bitalloc-refine", "bitalloc-select",
                                                                                "bitalloc-default")) else
             (plan.solver.get("search_s") or plan.solver.get("solve_time_s") or search_s),
             "evaluations": plan.solver.get("evaluations") or plan.solver.get("refine", {}).get("evaluations")
             or plan.solver.get("select", {}).get("distinct_plans")}
        plan.save(path)
        _write(meta, m)
        out[name] = (plan, m)
    return out


def default_plan(b: Bench, budget):
    """What ``bitalloc run`` does by default with this profile: the selection among the profile's
    candidate calibrations on the last ``select_rows`` calibration rows, ties and refinement as
    the run config's defaults (allocator.config.SolveCfg). The profile must be the default kind
    (``bitalloc profile --ref-method hybrid --fisher-table --fisher-labels both``: what
    ``ref_method = "auto"`` and ``fisher_labels = "auto"`` make for a causal LM calibrated on a
    text file), else there is nothing to select among."""
    import dataclasses

    import bitalloc
    from bitalloc.allocator.config import SolveCfg

    if b.profile.fisher is None:
        raise SystemExit("bitalloc-default: the profile has no Fisher table; make it as `bitalloc run` does: "
                         "bitalloc profile ... --ref-method hybrid --fisher-table --fisher-labels both")
    d = dataclasses.replace(SolveCfg(), **b.a.default_solve)  # --default-solve: an ablation of the defaults
    if b.default_fitness is None:
        b.default_fitness = bitalloc.selection_fitness(b.loaded, b.profile, rows=d.select_rows, hessians=b.hessians,
                                                       screen_rows=d.select_screen, metric=d.select_metric)
    plan = bitalloc.select_plan(b.profile, budget, b.default_fitness, refine=d.refine, ties=d.select_ties,
                                screen=b.default_fitness.screen, keep=d.select_keep, method=d.method, backend=d.backend)
    sel = plan.solver["select"]
    print(f"[bitalloc-default] {plan.label}: {sel['chosen']} ({', '.join(f'{k} {v:.4f}' for k, v in sel['fitness'].items())})",
          flush=True)
    return plan, b.profile.metadata.get("wall_s", {}).get("total")


def refine_plan(b: Bench, plan, budget):
    from bitalloc.allocator.peers import refine_plan as refine

    return refine(b.profile, plan, budget, b.fitness(b.ctx(1)), evaluations=b.a.refine, seed=b.a.seed,
                  stage=len(b.a.fitness_rows) - 1)


def evaluate(b: Bench, plans: dict) -> dict:
    """{key: row} for every plan; plans not yet evaluated are applied once (quantized layers
    shared across plans through one cache) and scored on both texts (rows cached)."""
    from bitalloc.allocator.evaluate import evaluate_models
    from bitalloc.allocator.executor import apply
    from bitalloc.sensitivity.models import fingerprint

    todo = {k: p for k, p in plans.items() if not (b.work / "rows" / f"{k}.json").is_file()}
    fp = fingerprint(b.loaded.model) if todo else None
    for i in range(0, len(todo), b.a.chunk):
        part = dict(list(todo.items())[i:i + b.a.chunk])
        t0 = time.perf_counter()
        models = {k: apply(b.loaded.model, p, fingerprint=fp, cache=b.cache, hessians=b.hessians)
                  for k, p in part.items()}
        wt = evaluate_models(b.loaded.model, models, b.windows, progress=False)
        ot = evaluate_models(b.loaded.model, models, b.other, progress=False) if b.other is not None else {}
        del models
        for k in part:
            row = {"wikitext": wt[k].to_dict(), "other": ot[k].to_dict() if k in ot else None,
                   "fp16_ppl": wt["fp16"].ppl, "fp16_other_ppl": ot["fp16"].ppl if ot else None}
            _write(b.work / "rows" / f"{k}.json", row)
        print(f"evaluated {len(part)} plans in {time.perf_counter() - t0:.0f} s", flush=True)
    return {k: json.loads((b.work / "rows" / f"{k}.json").read_text()) for k in plans}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="bitalloc's default profile of SmolLM2 on wikitext2-valid")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--other-windows", type=int, default=8, help="Tiny Shakespeare windows (text of another kind)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--refine", type=int, default=100, help="end-to-end refinement evaluations of bitalloc-refine")
    ap.add_argument("--evo-generations", type=int, default=20, help="EvoPress generations (theirs: 150)")
    ap.add_argument("--evo-offspring", type=int, default=8, help="EvoPress offspring per generation (theirs: 128)")
    ap.add_argument("--fitness-rows", default="1,2", help="calibration rows per fitness stage")
    ap.add_argument("--fitness-len", type=int, default=256, help="tokens per fitness row")
    ap.add_argument("--fisher-rows", type=int, default=8, help="calibration rows of bitalloc-select's Fisher table")
    ap.add_argument("--select-rows", type=int, default=8,
                    help="calibration rows bitalloc-select measures plans on (4 do not resolve its choice at 3.0, "
                         "3.5 and 4.5 bpw: experiments/selection_noise.py)")
    ap.add_argument("--select-refine", type=int, default=30,
                    help="bitalloc-select: measured local-search steps from the chosen plan (0: none)")
    ap.add_argument("--fisher-labels", default="both", choices=("both", "text", "sampled"),
                    help="bitalloc-select's Fisher table: the calibration text's next tokens, the model's samples, "
                         "or both (two tables, the candidates of each)")
    ap.add_argument("--default-solve", default="",
                    help="bitalloc-default with [solve] settings changed, e.g. select_ties=true,refine=10 (an "
                         "ablation; its rows are named bitalloc-default+<settings>)")
    ap.add_argument("--exl3-base", default="per-budget", choices=("per-budget", "lowest"),
                    help="exllamav3's base model: the dearest scheme whose uniform plan fits each budget, or the "
                         "cheapest scheme for every budget (the runs before 2026-12-06)")
    ap.add_argument("--chunk", type=int, default=6, help="quantized models held at once during evaluation")
    ap.add_argument("--weight-cache-gib", type=float, default=9.0,
                    help="fake-quantized weights kept for every peer's scores (SmolLM2's 18-scheme table is 7.6 GB, "
                         "the 24 default candidates' 10.2 GB: below that, each exllamav3 base re-runs GPTQ)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/peers_bench")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help="8 WikiText windows, 4 Shakespeare windows")
    a = ap.parse_args(argv)
    if wikitext_files(a.data) is None:
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.quick:
        a.windows, a.other_windows = 8, 4
    a.methods = [m for m in a.methods.split(",") if m]
    a.default_solve = {k: json.loads(v) for k, v in (x.split("=", 1) for x in a.default_solve.split(",") if x)}
    if a.default_solve:  # its own rows and cached plans
        tag = "+" + "+".join(f"{k}={json.dumps(v)}" for k, v in a.default_solve.items())
        a.methods = [m + tag if m == "bitalloc-default" else m for m in a.methods]
    a.budgets = [x for x in a.budgets.split(",") if x]
    a.fitness_rows = [int(x) for x in a.fitness_rows.split(",")]
    # survivors per stage: theirs 16/4/1 on 2k/16k/131k tokens; here len(fitness_rows) stages
    a.evo_options = {"generations": a.evo_generations, "offspring": a.evo_offspring,
                     "stages": (2, 1) if len(a.fitness_rows) == 2 else tuple([1] * len(a.fitness_rows)),
                     "tokens": [r * a.fitness_len for r in a.fitness_rows]}
    a.work = str(Path(a.work) / f"w{a.windows}x{a.seq_len}")
    b = Bench(a)
    rows = []
    for method in a.methods:
        plans = plans_of(b, method)
        res = evaluate(b, {f"{method}-{k}": p for k, (p, _) in plans.items()})
        for k, (plan, m) in plans.items():
            r = res[f"{method}-{k}"]
            rows.append({"method": method, "budget": k, "bpw": plan.predicted["bpw"], "ppl": r["wikitext"]["ppl"],
                         "kl": r["wikitext"]["kl"], "profile_s": m["profile_s"], "search_s": m["search_s"],
                         "other_ppl": r["other"]["ppl"] if r["other"] else None,
                         "other_kl": r["other"]["kl"] if r["other"] else None,
                         "total_bytes": plan.predicted["total_bytes"], "evaluations": m.get("evaluations"),
                         "schemes": plan.scheme_counts()})
            print(f"{method:<18} {k:>7} bpw {rows[-1]['bpw']:.3f} ppl {rows[-1]['ppl']:9.3f} kl {rows[-1]['kl']:.4f}",
                  flush=True)
        out = Path(a.out)
        for k, (plan, _) in plans.items():
            plan.save(out / "plans" / f"{method}-{k}.json")
    first = next(iter(res.values())) if rows else {}  # res: the last method's evaluated rows
    _write(Path(a.out) / "results.json", {
        "schema": "bitalloc.peers-benchmark/1", "model": "smollm2 (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized)",
        "profile": {"path": a.profile, "calibration": b.profile.calibration},
        "eval": {"text": "wikitext2-test.txt", "windows": a.windows, "seq_len": a.seq_len,
                 "other_text": "tinyshakespeare.txt", "other_windows": a.other_windows},
        "settings": {"score_tokens": SCORE_TOKENS, "score_options": SCORE_OPTIONS, "refine": a.refine,
                     "fisher_rows": a.fisher_rows, "select_rows": a.select_rows, "select_refine": a.select_refine,
                     "fisher_labels": a.fisher_labels, "exl3_base": a.exl3_base, "default_solve": a.default_solve,
                     "evo_options": a.evo_options, "fitness_rows": a.fitness_rows,
                     "fitness_len": a.fitness_len, "seed": a.seed},
        # every cached row carries the same 16-bit references; rows cached before session 38 lack the other text's
        "fp16_ppl": first.get("fp16_ppl"), "fp16_other_ppl": first.get("fp16_other_ppl"), "rows": rows})
    from _driver import write_allocations

    write_allocations(Path(a.out) / "plans", Path(a.out) / "allocations.json")  # plans/ itself is not committed
    print_table(rows, a.budgets)
    return 0


def print_table(rows, budgets) -> None:
    from bitalloc.allocator import api

    by = {(r["method"], r["budget"]): r for r in rows}
    names = [api.parse_budget(x).name for x in budgets]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print("| method | " + " | ".join(names) + " | profile s |")
    print("|---|" + "---|" * len(names) + "---|")
    for m in methods:
        cells = []
        for n in names:
            r = by.get((m, n))
            cells.append("" if r is None else f"{r['ppl']:.2f} ({r['kl']:.3f})")
        ps = next((by[(m, n)]["profile_s"] for n in names if (m, n) in by), None)
        print(f"| {m} | " + " | ".join(cells) + f" | {'' if ps is None else format(ps, '.0f')} |")


if __name__ == "__main__":
    sys.exit(main())
