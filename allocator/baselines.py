"""Baseline plans to compare against, built from the same profile (same exact costs).

* Uniform: one format for every layer. ``nearest_uniform`` picks, from the uniform family,
  the smallest format whose size is not below the budget (so the baseline never has fewer
  bytes than the plan it is compared with).
* Rule-based mix in the style of llama.cpp's Q3_K_M / Q4_K_M: a base format everywhere and
  a higher one for the attention value and MLP down projections of the blocks that
  llama.cpp's ``use_more_bits`` selects (the first and last eighth of the blocks and every
  third block between). ``rule_mix`` picks the (base, high) pair from the family whose
  size is the largest not above the budget ("at the same bytes", never more).
"""

from __future__ import annotations

import numpy as np

from .budget import Budget, parse_budget
from .arrays import capacity_bits
from .solve import plan_from_choice
from .plan import Plan

__all__ = ["UNIFORM_FAMILY", "uniform_plan", "nearest_uniform", "rule_mix", "use_more_bits"]

# Standard grouped formats people deploy (GPTQ-style symmetric g128, AWQ-style asymmetric with an
# integer zero-point at g128/64/32), small to large. Per-channel 3/4-bit (``w3``, ``w4``) are
# candidates for the allocator but not uniform baselines: as a whole-model format they are far
# worse than g128, and picking them would make the "nearest size" baseline a strawman.
UNIFORM_FAMILY = ("w2g64z", "w2g32z", "w3g128", "w3g128z", "w3g64z", "w3g32z", "w4g128", "w4g128z", "w4g64z",
                  "w4g32z", "w5g128", "w5g128z", "w6g128z", "w8")
RULE_TARGETS = ("self_attn.v_proj", "mlp.down_proj", "attn.c_attn", "mlp.c_proj", "attention.self.value", "output.dense")


def _family(profile, family) -> list[str]:
    return [s for s in family if s in profile.schemes]


def uniform_plan(profile, scheme: str, *, budget: Budget | None = None) -> Plan:
    """Every layer in ``scheme`` (which must be one of the profiled schemes)."""
    k = profile.schemes.index(scheme)
    choice = np.full(len(profile.layers), k)
    return plan_from_choice(profile, choice, budget=budget, label=f"uniform {scheme}",
                            solver={"method": "uniform", "status": "rule"})


def nearest_uniform(profile, budget, family=UNIFORM_FAMILY) -> Plan:
    """The uniform format of the smallest size not below the budget (or the largest if none is)."""
    budget = parse_budget(budget)
    cap = capacity_bits(profile, budget)
    cost = np.asarray(profile.cost_bits, dtype=np.int64)
    sizes = sorted((int(cost[:, profile.schemes.index(s)].sum()), s) for s in _family(profile, family))
    if not sizes:
        raise ValueError("the profile holds none of the uniform family's formats")
    pick = next((s for c, s in sizes if c >= cap), sizes[-1][1])
    return uniform_plan(profile, pick, budget=budget)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of blocks that get more bits (llama.cpp/src/llama-quant.cpp)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _rule_choice(profile, base: str, high: str) -> np.ndarray:
    kb, kh = profile.schemes.index(base), profile.schemes.index(high)
    blocks = sorted({l.block_index for l in profile.layers if l.block_index is not None})
    n = len(blocks)
    pos = {b: j for j, b in enumerate(blocks)}
    choice = np.full(len(profile.layers), kb)
    for i, l in enumerate(profile.layers):
        if l.block_index is not None and l.fqn.endswith(RULE_TARGETS) and use_more_bits(pos[l.block_index], n):
            choice[i] = kh
    return choice


def rule_mix(profile, budget, family=UNIFORM_FAMILY) -> Plan:
    """The llama.cpp-style (base, high) mix of the largest size not above the budget."""
    budget = parse_budget(budget)
    cap = capacity_bits(profile, budget)
    cost = np.asarray(profile.cost_bits, dtype=np.int64)
    fam = _family(profile, family)
    best = None
    for a, base in enumerate(fam):
        for high in fam[a + 1:]:
            ch = _rule_choice(profile, base, high)
            c = int(cost[np.arange(len(ch)), ch].sum())
            if c <= cap and (best is None or c > best[0]):
                best = (c, base, high, ch)
    if best is None:
        raise ValueError(f"no rule-based mix fits the budget {budget.name}")
    _, base, high, ch = best
    return plan_from_choice(profile, ch, budget=budget, label=f"rule mix {base}/{high}",
                            solver={"method": "rule-mix (llama.cpp use_more_bits)", "status": "rule",
                                    "base": base, "high": high})
