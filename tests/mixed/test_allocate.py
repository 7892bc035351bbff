"""The allocator against brute force: optimal, within budget, monotone in the budget."""
from __future__ import annotations

import itertools
import random

import pytest

from compress.mixed.allocate import BudgetTooSmall, allocate


def brute_force(costs, losses, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        b = sum(costs[l][o] for l, o in enumerate(choice))
        if b > budget:
            continue
        loss = sum(losses[l][o] for l, o in enumerate(choice))
        if best is None or loss < best - 1e-12:
            best = loss
    return best


def random_problem(seed, layers=5, options=4):
    rng = random.Random(seed)
    costs, losses = [], []
    for _ in range(layers):
        # options not sorted and not convex: a Lagrangian relaxation would miss some optima
        costs.append([rng.randint(5, 60) for _ in range(options)])
        losses.append([rng.uniform(0, 10) for _ in range(options)])
    return costs, losses


def test_hand_built_problem_where_the_lagrangian_hull_is_not_optimal():
    # Upgrades: A and B save 1 loss per byte, C 0.3 per byte. Every budget here leaves spare
    # bytes in multiples of 10, so the optimum is whole upgrades in that order of value.
    costs = [[10, 20], [10, 20], [1, 11]]
    losses = [[10.0, 0.0], [10.0, 0.0], [3.0, 0.0]]
    for budget, best in ((21, 23.0), (31, 13.0), (41, 3.0), (51, 0.0)):
        got = allocate(costs, losses, budget)
        assert got.loss == pytest.approx(brute_force(costs, losses, budget)) == best
        assert got.bytes <= budget


@pytest.mark.parametrize("seed", range(12))
def test_optimal_and_within_budget_against_brute_force(seed):
    costs, losses = random_problem(seed)
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for budget in range(lo, hi + 1, 7):
        got = allocate(costs, losses, budget)
        assert got.bytes <= budget
        assert got.bytes == sum(costs[l][o] for l, o in enumerate(got.choice))
        assert got.loss == pytest.approx(brute_force(costs, losses, budget), abs=1e-9)


def test_monotone_in_the_budget_also_when_bytes_are_rounded():
    costs, losses = random_problem(3, layers=8, options=5)
    costs = [[c * 1000 + 7 for c in row] for row in costs]  # max_states forces a unit > 1 byte
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    prev = float("inf")
    for budget in range(lo, hi + 1, (hi - lo) // 97):
        got = allocate(costs, losses, budget, max_states=512)
        assert got.bytes <= budget
        assert got.loss <= prev + 1e-12
        prev = got.loss


def test_budget_below_the_smallest_choice_says_the_smallest():
    with pytest.raises(BudgetTooSmall) as e:
        allocate([[10, 20], [5, 8]], [[1.0, 0.0], [1.0, 0.0]], 14)
    assert e.value.smallest == 15
