"""Bit allocation: pick one option (bit width, group size) per linear to minimise the summed
estimated error under a budget of stored bits. A multiple-choice knapsack, solved exactly by
dynamic programming over the budget cut into ``resolution`` units (each option's bits rounded
up, so the plan can never exceed the budget), then repaired greedily with the leftover bits."""
from __future__ import annotations

import math

import numpy as np

from ..errors import PocketError


def allocate(options: list[list[tuple[int, float]]], budget_bits: int, resolution: int = 100_000) -> list[int]:
    """``options[k]`` lists (stored_bits, cost) of item k's choices. Returns one index per item
    minimising total cost with total stored bits <= ``budget_bits``."""
    if not options:
        return []
    least = sum(min(b for b, _ in opts) for opts in options)
    if least > budget_bits:
        raise PocketError(f"budget of {budget_bits} bits is below the smallest plan ({least} bits)")
    unit = max(1, math.ceil(budget_bits / resolution))
    cap = budget_bits // unit
    INF = np.inf
    dp = np.full(cap + 1, INF)
    dp[0] = 0.0
    choice = np.zeros((len(options), cap + 1), dtype=np.int16)
    for k, opts in enumerate(options):
        new = np.full(cap + 1, INF)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, (bits, cost) in enumerate(opts):
            w = -(-bits // unit)  # ceil: rounded-up sizes keep the plan within budget
            if w > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[w:] = dp[: cap + 1 - w] + cost
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        dp, choice[k] = new, pick
    if not np.isfinite(dp).any():  # rounding up made every plan too big: take the cheapest
        plan = [min(range(len(o)), key=lambda j: o[j][0]) for o in options]
    else:
        b = int(np.argmin(dp))
        plan = [0] * len(options)
        for k in range(len(options) - 1, -1, -1):
            j = int(choice[k, b])
            plan[k] = j
            b -= -(-options[k][j][0] // unit)
    return _repair(options, plan, budget_bits)


def _repair(options, plan, budget_bits):
    """Spend bits left over from rounding: apply the upgrade with the best cost saved per bit
    while it fits, until none does."""
    used = sum(options[k][j][0] for k, j in enumerate(plan))
    while True:
        best, best_gain = None, 0.0
        for k, opts in enumerate(options):
            b0, c0 = opts[plan[k]]
            for j, (b, c) in enumerate(opts):
                if c < c0 and used - b0 + b <= budget_bits:
                    gain = (c0 - c) / max(b - b0, 1)
                    if gain > best_gain:
                        best, best_gain = (k, j), gain
        if best is None:
            return plan
        k, j = best
        used += options[k][j][0] - options[k][plan[k]][0]
        plan[k] = j
