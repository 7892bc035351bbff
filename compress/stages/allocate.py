"""Stage: turn each candidate's `quantize.target` into exact per-layer overrides.

Between calibration and quantization: for every candidate with a target, the quantizable
linears and the bytes of each option in `export.format` (`compress.mixed.plan`), the budget
the target leaves them, and a check that the smallest choice fits (else exit 2 naming
`quantize.target`, before any quantization); then one sensitivity walk for all of them
(`compress.mixed.sensitivity`) and the allocation (`compress.mixed.allocate`). The candidate's
plan gets `^name$` overrides, so quantize, export and evaluate run unchanged and the artifact's
per-layer metadata is exact; the allocation is kept for the manifest and the report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

PREDICTOR = "tr((W-Q) H (W-Q)^T) of each option's RTN weights, H the layer's calibration Hessian (2/n sum x x^T)"


@dataclass
class _Job:
    name: str
    slots: list
    budget: object
    block_prefix: str
    outer: object = None  # `plan.OuterSlot`: the embedding and head, when they are options


def _grid_key(spec) -> Optional[tuple]:
    if spec is None:
        return None
    return (spec.gguf_grid,) if spec.gguf_grid is not None else (spec.bits, spec.group_size, spec.sym)


def stage_allocate(ctx) -> None:
    import torch

    from compress.config import ConfigError
    from compress.formats.registry import get_format
    from compress.mixed import plan as mp

    targeted = [n for n, r in ctx.candidates.items() if r.plan.q.target is not None and not r.error]
    if not targeted:
        return
    cfg = ctx.cfg
    fmt = get_format(cfg.export.format)
    dtype = getattr(torch, cfg.export.dtype)
    sm = ctx.loaded.streamed()
    jobs: list[_Job] = []
    for name in targeted:
        q = ctx.candidates[name].plan.q
        try:
            slots = mp.slots(sm, q, fmt, dtype, with_bias=q.target.bits_per_weight is None, export=cfg.export)
            outer = mp.outer_slot(sm, q, fmt, dtype, cfg.export)
            fixed = (mp.fixed_bytes(sm, {s.name for s in slots}, dtype, q, fmt, outer=outer is None, export=cfg.export)
                     if q.target.bits_per_weight is None else 0)
            budget = mp.budget(q.target, cfg, ctx.loaded.config, slots, fixed)
            outer_min = min(outer.bytes) if outer is not None else 0
            smallest = sum(min(s.bytes) for s in slots) + outer_min
            if smallest > budget.slots_bytes:
                raise ValueError(_too_small(q.target, budget, smallest, slots, outer_min))
        except ValueError as e:
            msg = str(e) if str(e).startswith("quantize.") else f"quantize.target: {e}"
            if len(ctx.candidates) == 1:
                raise ConfigError(msg) from None
            ctx.candidates[name].error = msg
            continue
        log.info("candidate %s: budget %s for %s (%s)", name, f"{budget.slots_bytes + budget.fixed_bytes:,}",
                 budget.counts, budget.note)
        jobs.append(_Job(name, slots, budget, sm.block_prefix, outer))
    if not jobs:
        return
    for j in jobs:
        if _options(ctx, j).predictor == "block_kl" and not _reference(ctx, j):
            q = ctx.candidates[j.name].plan.q
            raise ConfigError(f"quantize.target_options.reference_bits: block_kl measures each block at "
                              f"{q.target_options.reference_bits or q.bits} bits, group_size {q.group_size}, which "
                              f"no layer can take in export.format {cfg.export.format}; choose bits among the "
                              f"layers' options")
    refs = {tuple((n, option_label(spec)) for n, spec in _reference(ctx, j).items()) for j in jobs
            if _options(ctx, j).predictor == "block_kl"}
    if len(refs) > 1:  # one walk measures one reference per block
        got = sorted({_labels_text({label for _, label in r}) for r in refs})
        raise ConfigError(f"quantize.target_options.reference_bits: candidates with predictor block_kl "
                          f"must share one reference option (plan bits, group_size, sym); got {got}")
    windows = {_options(ctx, j).kl_windows for j in jobs if _options(ctx, j).predictor in ("block_kl", "fisher")}
    if len(windows) > 1:  # one walk each for every candidate
        raise ConfigError(f"quantize.target_options.kl_windows: candidates with predictor block_kl or fisher "
                          f"must share one; got {sorted(windows)}")
    losses = _sensitivity(ctx, sm, jobs)
    for job in jobs:
        _apply(ctx, job, losses)


def _too_small(target, budget, smallest: int, slots, outer_min: int = 0) -> str:
    if target.bits_per_weight is not None:
        n = sum(s.weights for s in slots)
        return (f"quantize.target: bits_per_weight {target.bits_per_weight:g} is below the smallest reachable "
                f"with quantize.target_options, {8 * smallest / n:.3f} bits per weight")
    need = smallest + budget.fixed_bytes
    outer = (f"{outer_min:,} in the embedding, head and other tensors outside the blocks at their smallest "
             f"options (target_options.outer_bits), {budget.fixed_bytes:,} in norms and other tensors kept in float"
             if outer_min else f"{budget.fixed_bytes:,} in embeddings, norms and other tensors kept in float")
    return (f"quantize.target: {budget.note} is below the smallest artifact reachable with "
            f"quantize.target_options, {need:,} bytes ({smallest - outer_min:,} in the quantizable linears, {outer})")


def _sensitivity(ctx, sm, jobs: list[_Job]) -> dict[tuple, float]:
    """(layer, grid) -> predicted loss over the union of every job's options: one walk. With a
    `block_kl` job, also (layer, "kl_scale"): its block's measured KL per unit of relative error."""
    from compress.mixed.sensitivity import measure
    from compress.stages.calibrate import spool_dir

    union: dict[str, dict[Optional[tuple], object]] = {}
    for job in jobs:
        for s in job.slots:
            for spec in s.options:
                union.setdefault(s.name, {}).setdefault(_grid_key(spec), spec)
    options = {n: list(d.values()) for n, d in union.items()}
    kl_job = next((j for j in jobs if _options(ctx, j).predictor == "block_kl"), None)
    reference = _reference(ctx, kl_job) if kl_job is not None else None
    kl_windows = _options(ctx, kl_job).kl_windows if kl_job is not None else 0
    outer_jobs = [j for j in jobs if j.outer is not None]
    outer = _outer_options(ctx, outer_jobs)
    gptq_head = any(k[1] == "gptq" for d in outer for k in d)  # the head's Hessian, from this walk
    got, energy, block_kl, head_h = measure(sm, ctx.calib_ids, options, spool_dir(ctx), reference, kl_windows,
                                            head=gptq_head)
    ctx.sensitivity = {n: {**{option_label(spec): v for spec, v in zip(options[n], got[n])},
                           "output_energy": energy[n]} for n in options}
    out: dict[tuple, float] = {(n, _grid_key(spec)): v for n in options for spec, v in zip(options[n], got[n])}
    out.update({(n, "energy"): max(e, 1e-30) for n, e in energy.items()})
    fisher_job = next((j for j in jobs if _options(ctx, j).predictor == "fisher"), None)
    if fisher_job is not None:
        from compress.mixed.fisher import fisher_losses

        windows = _options(ctx, fisher_job).kl_windows
        fisher = fisher_losses(ctx.loaded.streamed(), ctx.calib_ids[:windows], options, spool_dir(ctx))
        for n in options:
            for spec, v in zip(options[n], fisher[n]):
                out[(n, "fisher", _grid_key(spec))] = v
                ctx.sensitivity[n]["fisher " + option_label(spec)] = v
    if outer_jobs:
        out.update(_outer_sensitivity(ctx, outer_jobs, *outer, head_h))
    if block_kl is not None:
        out.update(_kl_scales(sm.block_prefix, block_kl, reference, out))
        for n in options:
            ctx.sensitivity[n]["kl_scale"] = out[(n, "kl_scale")]
        log.info("block KL at the reference options (%s): %s", _reference_label(reference.values()),
                 " ".join(f"{k:.3g}" for k in block_kl))
    return out


def _head_rounding(q) -> str:
    """How the head of a plan's chosen option is rounded: the explicit `quantize.lm_head`'s way,
    else the method's default (`OuterQuant.rounding_for`; `_outer_quant` leaves it unset)."""
    from compress.quantizers.base import OuterQuant

    return (q.lm_head or OuterQuant(bits=8)).rounding_for(q)


def _outer_keys(q, outer, i: int) -> tuple[Optional[tuple], Optional[tuple]]:
    """The keys of option `i`'s embedding and head losses, (grid, rounding), None for float: the
    embedding rounds to nearest on its own grid, and as the head does on a table it shares."""
    emb, head = outer.options[i]
    grid, hgrid = outer.embedding_grid(i), outer.head_grid(i)
    by_format = outer.format_rounded(i)  # the format's own rounding is to nearest
    r = _head_rounding(q)
    return (None if grid is None else (_grid_key(grid), "rtn" if emb is not None or by_format[0] else r),
            None if hgrid is None else (_grid_key(hgrid), "rtn" if by_format[1] else r))


def _outer_options(ctx, jobs: list[_Job]) -> tuple[dict, dict]:
    """Every embedding and head option of the jobs, key (`_outer_keys`) -> (grid, plan)."""
    embs: dict[tuple, tuple] = {}
    heads: dict[tuple, tuple] = {}
    for j in jobs:
        q = ctx.candidates[j.name].plan.q
        for i in range(len(j.outer.options)):
            ek, hk = _outer_keys(q, j.outer, i)
            if ek is not None:
                embs.setdefault(ek, (j.outer.embedding_grid(i), q))
            if hk is not None:
                heads.setdefault(hk, (j.outer.head_grid(i), q))
    return embs, heads


def _outer_sensitivity(ctx, jobs: list[_Job], embs: dict, heads: dict, head_h) -> dict[tuple, float]:
    """("outer", "embedding" | "lm_head", key) -> the whole-model KL with only that tensor
    rounded as the key says (`compress.mixed.outer`), over the jobs' `kl_windows`; one more block
    walk. A GPTQ head (and a table it shares) is rounded against `head_h`."""
    from compress.mixed.outer import gptq_rows, outer_kl
    from compress.stages.calibrate import spool_dir
    from compress.stages.head import head_gptq_spec

    def how(key, grid, q):
        return gptq_rows(head_h, head_gptq_spec(q, grid)) if key[1] == "gptq" else grid

    windows = _options(ctx, jobs[0]).kl_windows
    emb_kl, head_kl = outer_kl(ctx.loaded.streamed(), ctx.calib_ids[:windows],
                               [how(k, *v) for k, v in embs.items()], [how(k, *v) for k, v in heads.items()],
                               spool_dir(ctx))
    out = {("outer", "embedding", None): 0.0, ("outer", "lm_head", None): 0.0}
    out.update({("outer", "embedding", k): v for k, v in zip(embs, emb_kl)})
    out.update({("outer", "lm_head", k): v for k, v in zip(heads, head_kl)})
    for what, specs, kls in (("embedding", embs, emb_kl), ("lm_head", heads, head_kl)):
        name = jobs[0].outer.embedding if what == "embedding" else jobs[0].outer.head
        if name is not None and specs:
            ctx.sensitivity[name] = {_outer_label(k, g): v for (k, (g, _)), v in zip(specs.items(), kls)}
    log.info("outer tensors, KL with only each quantized: %s", ", ".join(
        [f"embedding {_outer_label(k, g)[3:]} {v:.3g}" for (k, (g, _)), v in zip(embs.items(), emb_kl)]
        + [f"lm_head {_outer_label(k, h)[3:]} {v:.3g}" for (k, (h, _)), v in zip(heads.items(), head_kl)]))
    return out


def _outer_label(key: tuple, grid) -> str:
    """`KL 4/64/asym` (to nearest) or `KL 4/64/asym gptq`: an outer option's key in `sensitivity`."""
    return f"KL {option_label(grid)}" + ("" if key[1] == "rtn" else f" {key[1]}")


def _options(ctx, job: _Job):
    return ctx.candidates[job.name].plan.q.target_options


def _reference(ctx, job: _Job) -> dict:
    """Each slot's reference option: `target_options.reference_bits` at the plan's group size and
    symmetry, or by default the option the plan itself gives that layer (its bits, group size and
    symmetry; under a k-quant gguf_type the type llama-quantize's mix gives it, so Q3_K_M's blocks
    are measured at Q3_K and its fallbacks, not at 4 bits), where that is an option of the layer,
    else the plan's bits; a slot without it is left out of its block's KL."""
    from compress.formats.registry import get_format

    q = ctx.candidates[job.name].plan.q
    ref = q.spec(q.target_options.reference_bits or q.bits, q.group_size, q.sym)
    fmt, export = get_format(ctx.cfg.export.format), ctx.cfg.export
    out = {}
    for s in job.slots:
        own = _own_option(q, s) if q.target_options.reference_bits is None else None
        if own is not None and s.options[own] is not None:
            out[s.name] = s.options[own]
            continue
        keys = {_grid_key(spec): spec for spec in s.options if spec is not None}
        want = fmt.target_spec(ref, s.shape, export)  # GGUF k-quants: the type the bits name there
        if want is not None and _grid_key(want) in keys:
            out[s.name] = keys[_grid_key(want)]
    return out


def _own_option(q, slot) -> Optional[int]:
    """The index of the option the plan itself gives `slot` (float where it skips it), or None
    where that is not one of the slot's options."""
    from compress.stages.quantize import layer_spec

    want = _grid_key(layer_spec(q, slot.name))
    return next((k for k, spec in enumerate(slot.options) if _grid_key(spec) == want), None)


def _reference_label(specs) -> str:
    """One reference option's label, or the labels of a per-layer reference (a k-quant mix's types)."""
    return _labels_text({option_label(s) for s in specs})


def _labels_text(labels: set) -> str:
    labels = sorted(labels)
    return labels[0] if len(labels) == 1 else "the plan's own option per layer (" + ", ".join(labels) + ")"


def _block_of(name: str, prefix: str) -> int:
    return int(name[len(prefix):].split(".", 1)[0])


def _kl_scales(prefix: str, block_kl: list[float], reference: dict, losses: dict[tuple, float]) -> dict[tuple, float]:
    """(layer, "kl_scale") -> KL_b / sum over block b's layers of their relative error at the
    reference option: the factor that puts a relative error of block b in units of KL."""
    rel: dict[int, float] = {}
    for n, spec in reference.items():
        b = _block_of(n, prefix)
        rel[b] = rel.get(b, 0.0) + losses[(n, _grid_key(spec))] / losses[(n, "energy")]
    layers = {k[0] for k in losses if k[0] != "outer"}
    return {(n, "kl_scale"): block_kl[b] / rel[b] if rel.get(b) else 0.0
            for n in layers for b in [_block_of(n, prefix)]}


def predicted_loss(predictor: str, losses: dict[tuple, float], name: str, spec) -> float:
    """One layer's predicted loss of one option under `predictor` (`quantize.target_options.predictor`)."""
    if predictor == "fisher":
        return losses[(name, "fisher", _grid_key(spec))]
    v = losses[(name, _grid_key(spec))]
    if predictor == "output_error":
        return v
    v /= losses[(name, "energy")]
    return v * losses[(name, "kl_scale")] if predictor == "block_kl" else v


def option_label(spec) -> str:
    """`4/64/sym`, `3/-1/asym`, a GGUF type (`Q6_K`: a table the format rounds by itself) or
    `float`: an option's key in results.json's `sensitivity`."""
    if spec is not None and spec.gguf_grid is not None:
        return spec.gguf_grid
    return "float" if spec is None else f"{spec.bits}/{spec.group_size}/{'sym' if spec.sym else 'asym'}"


def _describe(q, reference: Optional[dict] = None) -> str:
    p = q.target_options.predictor
    if p == "output_error":
        return PREDICTOR
    if p == "relative_output_error":
        return PREDICTOR + ", over the output energy tr(W H W^T)"
    if p == "fisher":
        return ("1/2 E[(g . (W-Q) x)^2] of each option's RTN weights, g the gradient at the layer's output of the "
                "log-probability of a label drawn from the model (Fisher-weighted output error: predicted KL), "
                f"over {q.target_options.kl_windows} calibration windows")
    ref = _reference_label(reference.values()) if reference else \
        option_label(q.spec(q.target_options.reference_bits or q.bits, q.group_size, q.sym))
    return (PREDICTOR + ", over the output energy tr(W H W^T), times the block's measured KL per unit of it "
            f"(whole-model KL with only that block at {ref} RTN, over {q.target_options.kl_windows} "
            "calibration windows)")


def _apply(ctx, job: _Job, losses: dict[tuple, float]) -> None:
    from compress.mixed.allocate import allocate
    from compress.mixed.plan import overrides_for
    from compress.report.mixed import bits_mix
    from compress.stages.quantize import Plan

    res = ctx.candidates[job.name]
    q = res.plan.q
    predictor = q.target_options.predictor
    described = _describe(q, _reference(ctx, job) if predictor == "block_kl" else None)  # the plan before
    table = [[predicted_loss(predictor, losses, s.name, spec) for spec in s.options] for s in job.slots]
    costs = [s.bytes for s in job.slots]
    if job.outer is not None:  # the last slot: the embedding and head together
        costs.append(job.outer.bytes)
        keys = [_outer_keys(q, job.outer, i) for i in range(len(job.outer.options))]
        table.append([losses[("outer", "embedding", e)] + losses[("outer", "lm_head", h)] for e, h in keys])
    measured = None  # each embedding/head option's allocation and joint KL, when that chooses
    if job.outer is not None and q.target_options.outer_choice == "measured":
        alloc, measured = _measured_outer(ctx, job, costs, table)
    else:
        alloc = allocate(costs, table, job.budget.slots_bytes)
    alloc, against_recipe = _against_recipe(ctx, job, alloc, table)
    chosen = {s.name: s.options[o] for s, o in zip(job.slots, alloc.choice)}
    update = {"overrides": [*q.overrides, *overrides_for(q, chosen)]}
    outer = None
    if job.outer is not None:
        o = alloc.choice[-1]
        emb, head = job.outer.options[o]
        update.update(embedding=_outer_quant(emb), lm_head=q.lm_head if head is None else _outer_quant(head, q.lm_head))
        outer = {"embedding": _outer_entry(job.outer.embedding, emb), "lm_head": _outer_entry(job.outer.head, head),
                 "shared": job.outer.shared and emb is None and head is not None,
                 "bytes": job.outer.bytes[o], "predicted_loss": table[-1][o]}
        for key, by_format, grid in zip(("embedding", "lm_head"), job.outer.format_rounded(o),
                                         (job.outer.embedding_grid(o), job.outer.head_grid(o))):
            if by_format and outer[key] is not None:
                outer[key]["format_type"] = option_label(grid)  # the type the file holds
    res.plan = Plan(job.name, q.model_copy(update=update))
    n = sum(s.weights for s in job.slots)
    layers = []
    for s, o, row in zip(job.slots, alloc.choice, table):
        spec = s.options[o]
        layers.append({
            "name": s.name, "bits": None if spec is None else spec.bits, "type": option_label(spec),
            "group_size": None if spec is None else spec.group_size,
            "sym": None if spec is None else spec.sym, "bytes": s.bytes[o], "predicted_loss": row[o],
        })
    slot_bytes = alloc.bytes - (outer["bytes"] if outer else 0)
    res.allocation = {
        "target": q.target.model_dump(exclude_none=True),
        "counts": job.budget.counts, "budget_note": job.budget.note,
        "budget_bytes": job.budget.slots_bytes + job.budget.fixed_bytes,
        "fixed_bytes": job.budget.fixed_bytes,
        "achieved_bytes": alloc.bytes + job.budget.fixed_bytes,
        "slots_bits_per_weight": 8 * slot_bytes / n,  # biases included unless bits_per_weight
        "predicted_loss": alloc.loss,
        "predictor": described,
        "block_prefix": job.block_prefix,
        "layers": layers,
        "outer": outer,  # the embedding and head, where they were options (their bytes: every outer tensor)
        # each embedding/head option's best allocation: its predicted and jointly measured KL
        "outer_measured": measured,
        # the format's recipe (a k-quant mix) beside the allocation, jointly measured
        "against_recipe": against_recipe,
    }
    log.info("candidate %s: %s; %s of %s bytes, predicted loss %.4g", job.name, bits_mix(layers),
             f"{res.allocation['achieved_bytes']:,}", f"{res.allocation['budget_bytes']:,}", alloc.loss)
    if outer is not None:
        log.info("candidate %s: embedding %s, lm_head %s", job.name, option_label(emb), option_label(head))


def _against_recipe(ctx, job: _Job, alloc, table: list) -> tuple:
    """Where the plan's per-layer options are the format's recipe (`Format.recipe`: GGUF's
    k-quant mixes) and fit the budget, the allocation and the recipe both rounded to nearest at
    once, their whole-model KL over the `kl_windows` calibration windows (`compress.mixed.joint`);
    the recipe is kept where it measures lower, so a budget of at least the mix's bytes never
    writes an allocation that measures worse than the mix on those windows. Returns
    (allocation, record or None)."""
    from compress.formats.registry import get_format
    from compress.mixed.allocate import Allocation
    from compress.mixed.joint import joint_kl
    from compress.stages.calibrate import spool_dir

    q = ctx.candidates[job.name].plan.q
    if job.outer is not None or not get_format(ctx.cfg.export.format).recipe(ctx.cfg.export):
        return alloc, None
    own = [_own_option(q, s) for s in job.slots]
    if None in own:
        return alloc, None
    nbytes = sum(s.bytes[k] for s, k in zip(job.slots, own))
    if nbytes > job.budget.slots_bytes or own == list(alloc.choice):
        return alloc, None
    recipe = Allocation(own, nbytes, sum(row[k] for row, k in zip(table, own)))
    linears = [{s.name: s.options[c] for s, c in zip(job.slots, a.choice) if s.options[c] is not None}
               for a in (alloc, recipe)]
    kls = joint_kl(ctx.loaded.streamed(), ctx.calib_ids[:_options(ctx, job).kl_windows], linears,
                   [None, None], [None, None], spool_dir(ctx))
    keep = recipe if kls[1] < kls[0] else alloc
    log.info("candidate %s: joint KL of the allocation %.4g, of the plan's own options %.4g: %s kept", job.name,
             kls[0], kls[1], "the plan's own" if keep is recipe else "the allocation")
    return keep, {"allocation": {"bytes": alloc.bytes, "predicted_loss": alloc.loss, "joint_rtn_kl": kls[0]},
                  "recipe": {"bytes": recipe.bytes, "predicted_loss": recipe.loss, "joint_rtn_kl": kls[1]},
                  "kept": "recipe" if keep is recipe else "allocation"}


def _measured_outer(ctx, job: _Job, costs: list, table: list) -> tuple:
    """The allocation whose embedding/head option has the lowest joint KL (`compress.mixed.joint`):
    per option, the linears' best allocation under the bytes left beside it, all rounded at once
    over the `kl_windows` calibration windows; and each option's (labels, predicted, measured)."""
    from compress.mixed.allocate import Allocation, BudgetTooSmall, allocate
    from compress.mixed.joint import joint_kl
    from compress.mixed.outer import rounded
    from compress.stages.calibrate import spool_dir

    outer, budget = job.outer, job.budget.slots_bytes
    tried = []
    for o, cost in enumerate(outer.bytes):
        try:
            a = allocate(costs[:-1], table[:-1], budget - cost)
        except BudgetTooSmall:
            continue
        tried.append(Allocation([*a.choice, o], a.bytes + cost, a.loss + table[-1][o]))
    as_rows = lambda spec: None if spec is None else (lambda t: rounded(t, spec))  # noqa: E731
    linears = [{s.name: s.options[c] for s, c in zip(job.slots, a.choice) if s.options[c] is not None}
               for a in tried]
    kls = joint_kl(ctx.loaded.streamed(), ctx.calib_ids[:_options(ctx, job).kl_windows], linears,
                   [as_rows(outer.embedding_grid(a.choice[-1])) for a in tried],
                   [as_rows(outer.head_grid(a.choice[-1])) for a in tried], spool_dir(ctx))
    best = min(range(len(tried)), key=lambda k: kls[k])
    report = [{"embedding": option_label(outer.options[a.choice[-1]][0]),
               "lm_head": option_label(outer.options[a.choice[-1]][1]), "shared": outer.shared,
               "bytes": a.bytes, "predicted_kl": a.loss, "joint_rtn_kl": kl, "chosen": k == best}
              for k, (a, kl) in enumerate(zip(tried, kls))]
    log.info("candidate %s: embedding/head options by joint KL: %s", job.name, ", ".join(
        f"{r['embedding']} / {r['lm_head']} {r['joint_rtn_kl']:.3g} (predicted {r['predicted_kl']:.3g})"
        for r in report))
    return tried[best], report


def _outer_quant(spec, keep=None):
    """The `quantize.embedding` / `quantize.lm_head` setting for a chosen option (None: float);
    an explicit setting the allocation kept stays as written (its rounding included)."""
    from compress.quantizers.base import OuterQuant

    if spec is None:
        return None
    if keep is not None:
        return keep
    return OuterQuant(bits=spec.bits, group_size=spec.group_size, sym=spec.sym)


def _outer_entry(name, spec) -> Optional[dict]:
    if name is None:
        return None
    return {"name": name, "bits": None if spec is None else spec.bits,
            "group_size": None if spec is None else spec.group_size, "sym": None if spec is None else spec.sym}
