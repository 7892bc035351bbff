"""Pure functions behind the comparison report: Pareto fronts and the budget recommendation.

Rows are plain dicts as written to comparison.json: `name`, `bytes` (on disk), `perplexity`,
`kl_divergence`, `top1_agreement`, and `error` for a candidate that failed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


def _usable(row: dict, *keys: str) -> bool:
    return not row.get("error") and all(row.get(k) is not None for k in keys)


def pareto_front(rows: list[dict], x: str = "bytes", y: str = "perplexity") -> list[str]:
    """Names of the rows no other row beats on both `x` and `y` (lower is better for both).

    A row is dominated when another is <= on both and < on one; failed rows and rows missing
    either value take no part. Returned in increasing `x`.
    """
    pts = [r for r in rows if _usable(r, x, y)]
    front = []
    for r in pts:
        dominated = any(
            o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in pts if o is not r
        )
        if not dominated:
            front.append(r)
    return [r["name"] for r in sorted(front, key=lambda r: (r[x], r[y]))]


@dataclass(frozen=True)
class Recommendation:
    name: Optional[str]  # None: no candidate is within the budget (or none was judged)
    line: str  # the one line printed under the table


def ppl_increase(row: dict, original: dict) -> Optional[float]:
    if row.get("perplexity") is None or not original.get("perplexity"):
        return None
    return row["perplexity"] / original["perplexity"] - 1


def within_budget(row: dict, original: dict, select) -> tuple[bool, str]:
    """Whether `row` meets every bound of `select` (a SelectConfig); the reason when not."""
    if select.max_ppl_increase is not None:
        inc = ppl_increase(row, original)
        if inc is None:
            return False, "no perplexity"
        if inc > select.max_ppl_increase:
            return False, f"perplexity +{inc:.1%} > +{select.max_ppl_increase:.1%}"
    if select.max_kl is not None:
        kl = row.get("kl_divergence")
        if kl is None:
            return False, "no KL"
        if kl > select.max_kl:
            return False, f"KL {kl:.4f} > {select.max_kl}"
    if select.min_top1 is not None:
        t = row.get("top1_agreement")
        if t is None:
            return False, "no top-1"
        if t < select.min_top1:
            return False, f"top-1 {t:.3f} < {select.min_top1}"
    return True, ""


def budget_text(select) -> str:
    parts = []
    if select.max_ppl_increase is not None:
        parts.append(f"perplexity +{select.max_ppl_increase:.1%} at most")
    if select.max_kl is not None:
        parts.append(f"KL <= {select.max_kl}")
    if select.min_top1 is not None:
        parts.append(f"top-1 >= {select.min_top1}")
    return ", ".join(parts)


def recommend(candidates: list[dict], original: dict, select) -> Recommendation:
    """The smallest candidate (bytes on disk) within the quality budget of `select`."""
    budget = budget_text(select)
    ok = [r for r in candidates if _usable(r, "bytes")]
    if not ok:
        return Recommendation(None, "select: no candidate completed")
    if not budget:
        smallest = min(ok, key=lambda r: r["bytes"])
        return Recommendation(
            None, f"select: no quality budget set (select.max_ppl_increase / max_kl / min_top1); "
            f"the smallest candidate is {smallest['name']}",
        )
    inside = [r for r in ok if within_budget(r, original, select)[0]]
    if not inside:
        closest = min(ok, key=lambda r: r.get("kl_divergence") or ppl_increase(r, original) or 0)
        why = within_budget(closest, original, select)[1]
        return Recommendation(None, f"select: no candidate within budget ({budget}); "
                              f"the closest, {closest['name']}, has {why}; keep the original or relax select")
    best = min(inside, key=lambda r: (r["bytes"], r.get("kl_divergence") or 0))
    facts = [f"{best['bytes'] / 1e6:.1f} MB"]
    inc = ppl_increase(best, original)
    if inc is not None:
        facts.append(f"perplexity {inc:+.2%}")
    if best.get("kl_divergence") is not None:
        facts.append(f"KL {best['kl_divergence']:.4f}")
    return Recommendation(best["name"], f"select: {best['name']} ({', '.join(facts)}) is the smallest "
                          f"candidate within budget ({budget})")
