"""`sweep:` -> candidates: the cartesian product of the listed values over the `quantize` section."""
from __future__ import annotations

import itertools

from compress.config import Candidate, ConfigError, RunConfig

# Settings that only GPTQ reads: for an RTN combination they are reset to the `quantize` value,
# so a matrix over method x desc_act does not produce RTN twins that differ in nothing.
_GPTQ_ONLY = ("desc_act", "propagate")


def sweep_candidates(cfg: RunConfig) -> list[Candidate]:
    """The sweep's combinations as named candidates, in the order the keys are declared."""
    from compress.stages.quantize import candidate_name

    if cfg.sweep is None:
        return []
    axes = {k: v for k, v in cfg.sweep.model_dump(exclude_none=True).items()}
    out: list[Candidate] = []
    seen: dict[str, dict] = {}
    for combo in itertools.product(*axes.values()):
        changes = dict(zip(axes, combo))
        if changes.get("method", cfg.quantize.method) == "rtn":
            for k in _GPTQ_ONLY:
                changes.pop(k, None)
        q = cfg.quantize.model_copy(update=changes)
        name = candidate_name(q)
        if "mse_clip" in axes and q.mse_clip:
            name += "-mse"
        if "propagate" in axes and q.method == "gptq" and not q.propagate:
            name += "-noprop"
        if name in seen:
            if seen[name] == changes:
                continue  # the same candidate reached twice (an RTN twin)
            raise ConfigError(f"sweep: combinations {seen[name]} and {changes} both resolve to '{name}'")
        seen[name] = changes
        out.append(Candidate(name=name, **changes))
    return out


def with_sweep(cfg: RunConfig) -> RunConfig:
    """`cfg` with the sweep expanded after any explicit `candidates:` entries."""
    extra = sweep_candidates(cfg)
    if not extra:
        return cfg
    names = {c.name for c in cfg.candidates if c.name}
    clash = sorted(names & {c.name for c in extra})
    if clash:
        raise ConfigError(f"candidates: names {clash} are also produced by sweep; rename them")
    return cfg.model_copy(update={"candidates": [*cfg.candidates, *extra]})
