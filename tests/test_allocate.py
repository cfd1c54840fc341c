import itertools
import random

import pytest

from pocketlm import PocketError
from pocketlm.quant.allocate import allocate


def brute_force(options, budget):
    best_cost = float("inf")
    for plan in itertools.product(*[range(len(o)) for o in options]):
        bits = sum(options[k][j][0] for k, j in enumerate(plan))
        cost = sum(options[k][j][1] for k, j in enumerate(plan))
        if bits <= budget and cost < best_cost:
            best_cost = cost
    return best_cost


@pytest.mark.parametrize("seed", range(6))
def test_allocation_finds_the_known_optimum_and_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    options = []
    for _ in range(6):
        n = rng.randint(100, 400)
        opts = [(n * b + rng.randint(0, 30), 2.0 ** (-b) * n * rng.uniform(0.2, 5)) for b in (2, 3, 4, 8)]
        options.append(opts)
    lo = sum(min(b for b, _ in o) for o in options)
    hi = sum(max(b for b, _ in o) for o in options)
    for budget in (lo, (2 * lo + hi) // 3, (lo + hi) // 2, hi):
        plan = allocate(options, budget, resolution=budget)  # unit of one bit: exact
        bits = sum(options[k][j][0] for k, j in enumerate(plan))
        cost = sum(options[k][j][1] for k, j in enumerate(plan))
        assert bits <= budget
        assert cost == pytest.approx(brute_force(options, budget))
        coarse = allocate(options, budget, resolution=200)  # rounded units never break the budget
        assert sum(options[k][j][0] for k, j in enumerate(coarse)) <= budget


def test_budget_below_the_smallest_plan_is_refused():
    with pytest.raises(PocketError, match="below the smallest plan"):
        allocate([[(100, 1.0), (200, 0.5)]], 99)
