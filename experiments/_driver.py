"""The SmolLM2 benchmark scripts' shared driver (issue 11), on bitalloc's public API.

One :class:`Bench` per run holds what every benchmark needs once: the model (``--model``,
default ``smollm2``; ``random:llama-tiny`` runs the plumbing in seconds), the WikiText-2
validation file for calibration and the evaluation windows (WikiText-2 test, and Tiny
Shakespeare with ``--other-windows N``, text of another kind), profiles built with
:func:`bitalloc.profile` and reused when the saved one was made with the same settings,
plans applied with one quantized-layer cache (each (layer, scheme, channels, quantizer) is
quantized once across every plan of the run, identical allocations are scored once), and
the results JSON and table.

    ap = argparse.ArgumentParser()
    add_args(ap, out="quality", budgets="3bpw,4bpw")
    a = ap.parse_args()
    bench = Bench(a)                                  # loads the model and the windows
    prof = bench.profile("profile.json", schemes=[...])
    plans = {b: bitalloc.solve(prof, b) for b in bench.budgets}
    rows = bench.evaluate(plans)                      # {key: row}, and "fp16"
    bench.write({"rows": [...]})                      # <out>/results.json, with the run's settings
    print(table(rows_list, COLUMNS))

The scripts import it as ``from _driver import ...`` (their own folder is on ``sys.path``
when run as ``python experiments/<script>.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from _data import DATA, wikitext_files

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHAKESPEARE = "tinyshakespeare.txt"

# (key, header, format) for allocator.report.format_table
ROW_COLUMNS = (("budget", "budget", ""), ("method", "method", ""), ("bpw", "bpw", ".3f"), ("ppl", "ppl", ".3f"),
               ("kl", "KL", ".4f"), ("top1", "top-1", ".3f"), ("other_ppl", "Shakespeare ppl", ".3f"),
               ("other_kl", "Shakespeare KL", ".4f"))


def add_args(ap: argparse.ArgumentParser, *, out: str, budgets: str, calibration: str = "wikitext",
             calib_samples: int = 32, calib_len: int = 512, kl_samples: int | None = 2, kl_stride: int = 4,
             windows: int = 32, seq_len: int = 512, other_windows: int = 0, text: str = "wikitext") -> None:
    """The options every benchmark shares (defaults per script)."""
    g = ap.add_argument_group("driver (shared by the benchmark scripts)")
    g.add_argument("--model", default="smollm2", help="model spec (random:llama-tiny: plumbing only, seconds)")
    g.add_argument("--data", default=str(DATA), help="folder with wikitext2-valid.txt, wikitext2-test.txt "
                                                     f"(and {SHAKESPEARE})")
    g.add_argument("--budgets", default=budgets, help="comma-separated budgets (3.5 means 3.5bpw)")
    g.add_argument("--calibration", default=calibration,
                   help="profile calibration: 'wikitext' (the validation file), 'generated' or a text file")
    g.add_argument("--calib-samples", type=int, default=calib_samples, help="calibration rows")
    g.add_argument("--calib-len", type=int, default=calib_len, help="tokens per calibration row")
    g.add_argument("--kl-samples", type=int, default=kl_samples, help="calibration rows for each measured item")
    g.add_argument("--kl-stride", type=int, default=kl_stride, help="score KL at every N-th position")
    g.add_argument("--text", default=text, help="evaluation text: 'wikitext' (the test file), 'generated' or a file")
    g.add_argument("--windows", type=int, default=windows, help="evaluation windows")
    g.add_argument("--seq-len", type=int, default=seq_len, help="tokens per evaluation window")
    g.add_argument("--other-windows", type=int, default=other_windows,
                   help=f"also evaluate on N windows of {SHAKESPEARE} (0: not)")
    g.add_argument("--chunk", type=int, default=6, help="quantized models held at once during evaluation")
    g.add_argument("--fresh-profile", action="store_true", help="rebuild profiles even when a matching one is saved")
    g.add_argument("--quiet", action="store_true", help="no progress bars or build notes")
    g.add_argument("--out", default=str(RESULTS / out), help="results folder")


def budget_names(text: str) -> list[str]:
    """'2.5,3bpw,120MB' -> ['2.5bpw', '3bpw', '120MB'] (a bare number is bits per weight)."""
    out = []
    for b in (x.strip() for x in text.split(",")):
        if b:
            try:
                out.append(f"{float(b):g}bpw")
            except ValueError:
                out.append(b)
    return out


def allocation_key(plan) -> tuple:
    """What decides the quantized model: each layer's scheme and high channels, and the quantizer."""
    layers = tuple(sorted((f, lp.scheme, tuple(lp.high_idx or ())) for f, lp in plan.layers.items()))
    return layers, json.dumps(plan.quantization or {}, sort_keys=True, default=str)


def dense(qmodel):
    """The applied model with each 16-bit-activation QuantLinear as an nn.Linear holding its
    dequantized weight: what the CPU reference path computes (the same F.linear on the same
    weight), without unpacking the codes in every forward."""
    import torch

    from bitalloc.kernels.qlinear import QuantLinear

    for name, m in list(qmodel.named_modules()):
        if isinstance(m, QuantLinear) and m.scheme.act == "a16":
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight = torch.nn.Parameter(m.dequantized_weight(), requires_grad=False)
                if m.bias is not None:
                    lin.bias = torch.nn.Parameter(m.bias.detach().float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(qmodel.get_submodule(parent) if parent else qmodel, child, lin)
    return qmodel


def write_allocations(plans_dir: Path, out: Path) -> None:
    """The committed summary of a folder of plans: each plan's scheme per layer (layer names once),
    budget and predicted bytes. The plan files themselves (model fingerprint, per-layer losses:
    about 45 kB each) are regenerated by the benchmark's command and not committed."""
    from bitalloc.sensitivity.artifact import write_json

    plans = {p.stem: json.loads(p.read_text()) for p in sorted(Path(plans_dir).glob("*.json"))}
    layers = sorted({f for d in plans.values() for f in d["layers"]})
    write_json(out, {"schema": "bitalloc.allocations/1", "layers": layers, "plans": {
        name: {"budget": d.get("budget"), "predicted": d.get("predicted"), "solver": (d.get("solver") or {}).get("method"),
               "schemes": [d["layers"][f]["scheme"] if f in d["layers"] else None for f in layers]}
        for name, d in plans.items()}}, indent=None)


def table(rows, columns=ROW_COLUMNS) -> str:
    """A plain-text table of result rows (columns no row has are left out)."""
    from bitalloc.allocator.report import format_table

    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    return format_table(rows, cols)


def _plain(v: Any) -> Any:
    """JSON form of a value (tuples as lists, paths and numpy scalars as strings or numbers,
    NaN and infinities as None: strict JSON)."""
    def finite(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(y) for k, y in x.items()}
        if isinstance(x, list):
            return [finite(y) for y in x]
        return x

    def default(x):
        return x.item() if hasattr(x, "item") else str(x)

    return finite(json.loads(json.dumps(v, default=default)))


class Bench:
    """The model, calibration file and evaluation windows of one benchmark run, loaded once."""

    def __init__(self, a: argparse.Namespace):
        from bitalloc.allocator import api
        from bitalloc.sensitivity.models import fingerprint

        self.t0 = time.perf_counter()
        self.a = a
        self.valid = self.test = None  # the WikiText-2 files, when the calibration or evaluation reads them
        if "wikitext" in (a.calibration, a.text):
            files = wikitext_files(a.data)
            if files is None:
                raise SystemExit(2)
            self.valid, self.test = files
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.budgets = budget_names(a.budgets)
        self.log = (lambda m: None) if a.quiet else (lambda m: print(m, flush=True))
        self.loaded = api.load(a.model, log=self.log)
        self.fp = fingerprint(self.loaded.model)
        self.cache: dict = {}  # (layer, scheme, channels, quantizer) -> packed layer, shared by every plan
        self._rows: dict = {}  # allocation key -> evaluated row
        self.walls: dict[str, float] = {}
        text = str(self.test) if a.text == "wikitext" else a.text
        self.windows, self.eval_desc = api.eval_windows(self.loaded, text, a.windows, a.seq_len)
        self.other, self.other_desc = None, None
        other = Path(a.data) / SHAKESPEARE
        if a.other_windows:
            if other.is_file():
                self.other, self.other_desc = api.eval_windows(self.loaded, str(other), a.other_windows, a.seq_len)
            else:
                print(f"missing {other}: evaluating on {text} only", file=sys.stderr)

    # -- profiles ------------------------------------------------------------------------
    def calibration_settings(self) -> dict:
        """The profile settings the command line sets (calibration and the measured items)."""
        a = self.a
        cal = str(self.valid) if a.calibration == "wikitext" else a.calibration
        return {"calibration": cal, "n_samples": a.calib_samples, "seq_len": a.calib_len, "seed": 0,
                "kl_samples": a.kl_samples, "kl_stride": a.kl_stride}

    def profile(self, name: str = "profile.json", **settings):
        """The profile ``<out>/<name>``: :func:`bitalloc.profile` with the command line's
        calibration and ``settings`` (its keyword settings, which override those), reused when
        the saved one was made for this model with the same settings (``--fresh-profile``:
        rebuilt). A measured profile keeps its checkpoint beside it (resumable); a GPTQ one its
        Hessians (:meth:`hessians`)."""
        from bitalloc.allocator import api

        path = self.out / name
        want = _plain({"model": self.a.model, **self.calibration_settings(), **settings})
        if path.is_file() and not self.a.fresh_profile:
            try:
                prof = api.load_profile(path)
            except Exception as e:  # noqa: BLE001 - an unreadable profile is rebuilt
                self.log(f"not reusing {path}: {e}")
            else:
                if prof.metadata.get("experiment", {}).get("settings") == want and (
                        not settings.get("quantizer") == "gptq" or self.hessians(name).is_file()):
                    self.log(f"reusing {path}")
                    self.walls[f"profile {name}"] = 0.0
                    return prof
        t = time.perf_counter()
        prof = api.profile(self.loaded, out=path, progress=not self.a.quiet, log=self.log,
                           **{**self.calibration_settings(), **settings})
        wall = round(time.perf_counter() - t, 1)
        prof.metadata["experiment"] = {"settings": want, "wall_s": wall}
        prof.save(path)
        self.walls[f"profile {name}"] = wall
        return prof

    def hessians(self, name: str = "profile.json") -> Path:
        """Where :meth:`profile` keeps a GPTQ profile's Hessians (what ``apply`` needs)."""
        return (self.out / name).with_suffix(".hessians.safetensors")

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self, plans: Mapping[str, Any], *, hessians=None, packed: bool = True) -> dict[str, dict]:
        """``{key: row}`` for every plan and ``"fp16"``: ``ppl``, ``kl``, ``top1`` on the
        evaluation windows (and ``other_ppl``, ``other_kl`` on Tiny Shakespeare). Plans with
        the same allocation are applied and scored once, also across calls; the quantized
        layers come from one cache; at most ``--chunk`` quantized models exist at a time.
        ``packed=False`` scores the dequantized weights as plain nn.Linear (same numbers on
        CPU, faster)."""
        from bitalloc.allocator.evaluate import evaluate_models
        from bitalloc.allocator.executor import apply

        net = self.loaded.model
        keys = {k: allocation_key(p) for k, p in plans.items()}
        todo: dict = {}
        for k, key in keys.items():
            if key not in self._rows and key not in todo:
                todo[key] = k
        items = list(todo.items())
        step = max(1, self.a.chunk)
        t = time.perf_counter()
        for i in range(0, max(len(items), 1), step):
            part = items[i:i + step]
            models = {}
            for _, k in part:
                q = apply(net, plans[k], fingerprint=self.fp, cache=self.cache, hessians=hessians)
                models[k] = q if packed else dense(q)
            ref = "fp16" not in self._rows
            if not models and not ref:
                break
            show = not self.a.quiet
            wt = evaluate_models(net, models, self.windows, progress=show, include_reference=ref)
            ot = (evaluate_models(net, models, self.other, progress=show, include_reference=ref)
                  if self.other is not None else {})
            if ref:
                self._rows["fp16"] = {"ppl": wt["fp16"].ppl, "kl": 0.0, "top1": 1.0,
                                      "other_ppl": ot["fp16"].ppl if ot else None, "other_kl": 0.0 if ot else None}
            for key, k in part:
                self._rows[key] = {"ppl": wt[k].ppl, "kl": wt[k].kl, "top1": wt[k].top1_agree,
                                   "other_ppl": ot[k].ppl if ot else None, "other_kl": ot[k].kl if ot else None}
            del models
        self.walls["eval"] = round(self.walls.get("eval", 0.0) + time.perf_counter() - t, 1)
        out = {"fp16": dict(self._rows["fp16"])}
        first: dict = {}
        for k, key in keys.items():
            f = first.setdefault(key, k)
            out[k] = dict(self._rows[key], same_allocation_as=None if f == k else f)
        return out

    # -- results -------------------------------------------------------------------------
    def settings(self) -> dict:
        """What every results file says about the run."""
        import torch

        a = self.a
        return {
            "model": a.model, "model_description": getattr(self.loaded, "description", None),
            "calibration": self.calibration_settings(),
            "eval": {**self.eval_desc, "other": self.other_desc},
            "budgets": self.budgets,
            "wall_s": {**self.walls, "total": round(time.perf_counter() - self.t0, 1)},
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "torch_threads": torch.get_num_threads(),
        }

    def write(self, result: dict, name: str = "results.json") -> Path:
        """``<out>/<name>``: the run's settings with ``result`` (atomic write)."""
        from bitalloc.sensitivity.artifact import write_json

        path = self.out / name
        write_json(path, _plain({**self.settings(), **result}), indent=1)
        return path
