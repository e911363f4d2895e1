"""Result tables (text, CSV, JSON), the perplexity-against-bits plot, and the paired comparison
of two models scored on the same windows."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

__all__ = ["format_table", "write_results", "plot_ppl_vs_bpw", "plan_table", "paired_ratio"]


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table. columns: (key, header, format spec such as '.3f')."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, spec) if spec and isinstance(v, (int, float)) else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if j and i else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


RESULT_COLUMNS = (
    ("budget", "budget", ""),
    ("method", "method", ""),
    ("bpw", "bpw", ".3f"),
    ("quantized_MB", "layers MB", ".3f"),
    ("total_MB", "total MB", ".3f"),
    ("ppl", "ppl", ".3f"),
    ("kl", "KL", ".4f"),
    ("top1_agree", "top-1", ".3f"),
    ("predicted_loss", "pred. loss", ".4f"),
)


def plan_table(plan) -> str:
    """Scheme counts and the size of one plan, for `bitalloc solve`."""
    p = plan.predicted
    rows = [{"scheme": s, "layers": n} for s, n in plan.scheme_counts().items()]
    head = (f"{plan.label}: {p['bpw']:.4f} bpw, quantized layers {p['quantized_bytes'] / 1e6:.3f} MB, "
            f"total {p['total_bytes'] / 1e6:.3f} MB, predicted loss {p['loss_total']:.5f} {p.get('loss_unit', '')}; "
            f"solver {plan.solver.get('solver', plan.solver.get('method'))} {plan.solver.get('status', '')}"
            + (f" in {plan.solver['solve_time_s']:.2f}s" if plan.solver.get("solve_time_s") is not None else ""))
    return head + "\n" + format_table(rows, (("scheme", "scheme", ""), ("layers", "layers", "d")))


def write_results(rows: Sequence[dict], out_dir: str | Path, stem: str = "results") -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from bitalloc.sensitivity.artifact import atomic_write

    js, cs = out / f"{stem}.json", out / f"{stem}.csv"
    with atomic_write(js) as f:
        f.write(json.dumps(list(rows), indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_write(cs, newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return js, cs


def plot_ppl_vs_bpw(rows: Sequence[dict], path: str | Path, title: str = "", reference_ppl: float | None = None) -> Path:
    """PNG: perplexity against bits per weight, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("bpw") is not None))
    markers = "os^Dvx*"
    for j, m in enumerate(methods):
        pts = sorted((r["bpw"], r["ppl"]) for r in rows if r["method"] == m and r.get("ppl") is not None)
        if pts:
            ax.plot(*zip(*pts), marker=markers[j % len(markers)], label=m)
    if reference_ppl is not None:
        ax.axhline(reference_ppl, color="gray", ls="--", lw=1, label=f"16-bit ({reference_ppl:.2f})")
    ax.set_xlabel("bits per weight (quantized layers, metadata included)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    from bitalloc.sensitivity.artifact import atomic_write

    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def paired_ratio(nll_a: Sequence[float], nll_b: Sequence[float], tokens_per_window: int, *, draws: int = 10_000,
                 seed: int = 0) -> dict:
    """Two models scored on the same windows, compared window by window: the perplexity ratio
    A/B ``exp(Σ_w (NLL_A(w) - NLL_B(w)) / N)`` (``nll_*``: each window's summed NLL in nats,
    ``N`` the tokens scored), its 95 % interval from ``draws`` bootstrap resamples of the
    windows (fixed ``seed``), and how many windows A scores lower. An interval that holds 1
    means these windows do not tell the two models apart."""
    import numpy as np

    d = np.asarray(nll_a, dtype=np.float64) - np.asarray(nll_b, dtype=np.float64)  # (n,) nats per window
    n = len(d)
    if n == 0 or len(nll_b) != n or tokens_per_window < 1:
        raise ValueError(f"paired_ratio needs the same windows for both models, got {len(nll_a)} and {len(nll_b)} "
                         f"window(s) of {tokens_per_window} scored token(s)")
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))  # (draws, n) windows resampled
    boot = np.exp(d[idx].sum(1) / (n * tokens_per_window))  # (draws,)
    return {"ratio": float(np.exp(d.sum() / (n * tokens_per_window))), "lo": float(np.quantile(boot, 0.025)),
            "hi": float(np.quantile(boot, 0.975)), "a_wins": int((d < 0).sum()), "windows": n}
