"""`sweep:` -> candidates: the cartesian product of the listed values over the `quantize` section."""
from __future__ import annotations

import itertools

from compress.config import Candidate, ConfigError, RunConfig

# Swept boolean settings that the default candidate name does not show get a suffix when on
# (mse_clip) or off (propagate), so two combinations never share a name.
_NAME_FLAGS = {"mse_clip": (True, "mse"), "propagate": (False, "noprop")}


def sweep_candidates(cfg: RunConfig) -> list[Candidate]:
    """The sweep's combinations as named candidates, in the order the keys are declared. A
    setting the combination's method does not have is dropped for it, so `method: [rtn,
    gptq]` x `mse_clip: [true, false]` gives one RTN candidate, not two identical ones."""
    from compress.quantizers import get_method
    from compress.stages.quantize import candidate_name, merge_method

    if cfg.sweep is None:
        return []
    axes = {k: v for k, v in cfg.sweep.model_dump(exclude_none=True).items()}
    out: list[Candidate] = []
    seen: dict[str, dict] = {}
    for combo in itertools.product(*axes.values()):
        changes = dict(zip(axes, combo))
        fields = get_method(changes.get("method", cfg.quantize.method)).config.model_fields
        changes = {k: v for k, v in changes.items() if k in fields}
        try:
            q = merge_method(cfg.quantize, changes, "sweep")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        name = candidate_name(q)
        for key, (when, suffix) in _NAME_FLAGS.items():
            if key in axes and key in fields and getattr(q, key) == when:
                name += f"-{suffix}"
        if name in seen:
            if seen[name] == changes:
                continue  # the same candidate reached twice (a setting its method lacks)
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
