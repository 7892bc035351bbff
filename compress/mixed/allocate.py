"""The allocation: one option per layer, minimising the summed predicted loss under a byte
budget (a multiple-choice knapsack), solved exactly by dynamic programming over layers.

The states after each layer are the Pareto frontier of (bytes, loss) over the choices made so
far: a state that costs more and loses no less than another is dropped. Each layer's bytes are
counted above its smallest option (that much is spent whatever the choice), in units of
`quantum` bytes rounded *up*, so any allocation the search accepts fits the budget in true
bytes. `quantum` is 1 (exact) while the layers' largest extra bytes sum to fewer than
`max_states` units, else the smallest unit that keeps the frontier within `max_states` states:
the loss is then optimal up to that rounding (at most one unit per layer left unspent; on
SmolLM2-135M about 330 bytes per layer, 0.1% of a 4-bit artifact). The unit depends only on the
problem, not on the budget, so a larger budget never yields a larger loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


class BudgetTooSmall(ValueError):
    """No choice of options fits the budget; `smallest` is the fewest bytes any choice needs."""

    def __init__(self, budget: int, smallest: int) -> None:
        super().__init__(f"budget {budget} bytes is below the smallest reachable, {smallest} bytes")
        self.budget, self.smallest = budget, smallest


@dataclass(frozen=True)
class Allocation:
    choice: list[int]  # option index per layer
    bytes: int  # true bytes of the chosen options
    loss: float  # summed predicted loss


def _quantum(costs: Sequence[Sequence[int]], max_states: int) -> int:
    # Leaving a layer in float costs far more than any quantized option; counting it in the
    # range would coarsen the unit for a choice a tight budget never makes. Such states are
    # still searched: they are simply many units and pruned above the budget.
    top = sum(sorted(c)[-2] - min(c) if len(c) > 1 else 0 for c in costs)
    return max(1, -(-top // max_states))


def allocate(
    costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int, max_states: int = 1 << 18,
) -> Allocation:
    """`costs[l][o]` bytes and `losses[l][o]` predicted loss of option `o` of layer `l`; the
    choice of least summed loss whose summed bytes are at most `budget`."""
    if len(costs) != len(losses) or any(len(c) != len(l) or not c for c, l in zip(costs, losses)):
        raise ValueError("costs and losses must give the same non-empty options per layer")
    smallest = sum(min(c) for c in costs)
    if smallest > budget:
        raise BudgetTooSmall(budget, smallest)
    q = _quantum(costs, max_states)
    cap = (budget - smallest) // q
    units = [np.array([-(-(int(b) - min(c)) // q) for b in c], dtype=np.int64) for c in costs]
    B = np.zeros(1, dtype=np.int64)
    L = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for u, loss in zip(units, losses):
        k = len(u)
        # Option-major: each option's run is the frontier shifted, so already sorted by bytes,
        # and a stable sort (timsort) merges the k runs in O(n log k).
        cb = (B[None, :] + u[:, None]).ravel()
        cl = (L[None, :] + np.asarray(loss, dtype=np.float64)[:, None]).ravel()
        parent = np.tile(np.arange(len(B)), k)
        opt = np.repeat(np.arange(k), len(B))
        keep = cb <= cap
        if not keep.any():  # unreachable: each layer's smallest option is 0 units
            break
        cb, cl, parent, opt = cb[keep], cl[keep], parent[keep], opt[keep]
        order = np.argsort(cb, kind="stable")
        cb, cl, parent, opt = cb[order], cl[order], parent[order], opt[order]
        # Pareto: keep a state only if it loses strictly less than every state before it in
        # this order (cheaper, or as cheap and earlier: a tie in bytes may keep two states).
        best_before = np.concatenate(([np.inf], np.minimum.accumulate(cl)[:-1]))
        front = cl < best_before
        B, L = cb[front], cl[front]
        back.append((parent[front], opt[front]))
    else:
        s = int(np.argmin(L))  # the least loss; ties go to the first in order (fewest bytes)
        choice = [0] * len(costs)
        for layer in range(len(costs) - 1, -1, -1):
            parent, opt = back[layer]
            choice[layer] = int(opt[s])
            s = int(parent[s])
        return _result(choice, costs, losses)
    # Unreachable (see the break above), kept as a safe answer.
    return _result([int(np.argmin(c)) for c in costs], costs, losses)


def _result(choice: list[int], costs, losses) -> Allocation:
    return Allocation(choice, sum(int(costs[l][o]) for l, o in enumerate(choice)),
                      float(sum(losses[l][o] for l, o in enumerate(choice))))
