"""Stage: write a candidate as a safetensors folder in `export.format`'s layout, block by block.

The writer works in a temporary sibling folder and renames it at the end, so an interrupted
run never leaves a folder that looks complete (`compress-manifest.json` is written last).
"""
from __future__ import annotations

import datetime as _dt
import logging
import dataclasses
import re
import socket
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from compress import __version__
from compress.config import RunConfig
from compress.engine import StreamedModel
from compress.formats.qweight import BlockQuantWeight, QuantizedWeight
from compress.formats.registry import ActivationScheme, LayerScheme, QuantizedLinear, get_format
from compress.quantizers.base import QuantResult
from compress.models.provenance import describe_source
from compress.stages.load import LoadedModel
from compress.stages.quantize import Plan

log = logging.getLogger(__name__)

# Files copied from the source folder: tokenizer, chat template, generation defaults, license.
_COPY = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|added_tokens\.json|"
    r"chat_template\.(jinja|json)|generation_config\.json|LICENSE.*|.*\.tiktoken)$"
)
# The tokenizer's own files: from `model.tokenizer`'s folder when one is given.
_TOKENIZER = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|added_tokens\.json|"
    r"chat_template\.(jinja|json)|.*\.tiktoken)$"
)
_PACKAGES = ("compress", "torch", "transformers", "safetensors", "numpy")


def package_versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclasses.dataclass
class BlockRecord:
    """One block as the exporter writes it: the tensors in writing order and the metadata
    `finish` needs. The resume store keeps these, so a resumed run writes the same bytes."""

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    layers: list[LayerScheme] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    quantized_params: int = 0
    quantized_bytes: int = 0

    def meta(self) -> dict:
        return {"layers": [dataclasses.asdict(s) for s in self.layers], "skipped": self.skipped,
                "quantized_params": self.quantized_params, "quantized_bytes": self.quantized_bytes}

    @classmethod
    def restore(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "BlockRecord":
        layers = [LayerScheme(**{**d, "activations": None if d.get("activations") is None
                                 else ActivationScheme(**d["activations"])}) for d in meta["layers"]]
        return cls(tensors, layers, list(meta["skipped"]), int(meta["quantized_params"]),
                   int(meta["quantized_bytes"]))


class Exporter:
    """Receives quantized blocks from the quantize stage and writes them as they come, in the
    layout of `export.format` (`compress.formats.registry`)."""

    def __init__(self, loaded: LoadedModel, sm: StreamedModel, plan: Plan, cfg: RunConfig, out_dir: Path,
                 overwrite: Optional[bool] = None):
        """`overwrite`: replace a finished folder at `out_dir` (default: `export.overwrite`)."""
        self.loaded, self.sm, self.plan, self.cfg = loaded, sm, plan, cfg
        self.format = get_format(cfg.export.format)
        self.dtype = getattr(torch, cfg.export.dtype)
        self.out_dir = out_dir
        # resume rewrites a folder its own interrupted run finished (overwrite=True)
        self.overwrite = cfg.export.overwrite if overwrite is None else overwrite
        self.writer = self.format.open_writer(out_dir, self)
        self.keep: Optional[Callable[[int, BlockRecord], None]] = None  # sees each finished block
        self.skipped: list[str] = []
        self.layers: list[LayerScheme] = []
        self.quantized_params = 0
        self.quantized_bytes = 0
        self.head: Optional[dict] = None  # the quantized lm_head, for the manifest
        self.embedding: Optional[dict] = None  # the quantized embedding, for the manifest
        self.head_reports: list = []  # its LayerReport, after the blocks'
        self._head_src: Optional[tuple[str, str, bool, tuple[int, int]]] = None  # `_head_source`
        try:
            self._write_outer()
        except BaseException:  # the caller gets no exporter to abort: remove the partial here
            self.writer.abort()
            raise

    @property
    def linear_bits_per_weight(self) -> float:
        """Bits per quantized weight including scales, zeros and g_idx."""
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", self.dtype if t.is_floating_point() else t.dtype).contiguous()

    def _write_outer(self, rows_per_slice: int = 4096) -> None:
        """Every tensor outside the block list, read from the checkpoint (not the model, whose
        memory-mapped embedding would stay resident once read) and cast slice by slice: the
        embedding is the largest tensor of a small model."""
        ckpt = self.sm.checkpoint
        from transformers.pytorch_utils import Conv1D

        # Linears outside the blocks (the lm_head) stay in float: formats that quantize every
        # Linear by class (compressed-tensors) must be told to leave them alone.
        head = self.sm._head_name() if self.plan.q.lm_head is not None else None
        emb = self.sm._embedding_name() if self.plan.q.embedding is not None else None
        self.shared = shares_table(self.sm, self.format, self.plan.q.embedding, self.plan.q.lm_head, self.cfg.export)
        shared = f"{self.sm._embedding_name()}.weight" if self.shared else None  # stored as the head's codes
        with self.sm._outer_only() as outer:
            self.skipped += [n for n, m in outer.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n != head]
        for name, t in outer_state(self.sm, untie=emb is not None):
            if name in (f"{head}.weight", f"{emb}.weight", shared):
                continue  # written quantized by `write_head`, `_write_embedding`
            ck = self.sm.ckpt_name(name)
            if ck is None and emb is not None and name == f"{self.sm._head_name()}.weight":
                ck = self.sm.ckpt_name(f"{emb}.weight")  # a tied head, untied: the embedding's float rows
            if ck is None:
                raise ValueError(f"{ckpt.root}: tensor '{name}' is missing from the checkpoint")
            dtype = self.dtype if t.is_floating_point() else t.dtype
            if t.dim() == 0:
                self.writer.add_tensors({name: self._cast(ckpt.load([ck])[ck])})
                continue
            rows = range(0, t.shape[0], rows_per_slice)
            slices = (self._cast(ckpt.load_rows(ck, s, s + rows_per_slice)) for s in rows)
            self.writer.add_tensor_chunks(name, dtype, tuple(t.shape), slices)
        if emb is not None:
            self._write_embedding(emb, rows_per_slice)
        if head is not None:
            # A head rounded by GPTQ waits for the Hessian of its inputs: the caller writes it
            # (`write_head`) once the block walk has produced that.
            self._head_src = self._head_source(head)
            if not self.needs_head_hessian:
                self.write_head()

    def _write_embedding(self, name: str, rows_per_slice: int) -> None:
        """`quantize.embedding`: the table rounded to nearest on its grid (groups run along the
        hidden size, so a slice of rows rounds as the whole table would), read from the checkpoint
        and written a slice of rows at a time, one stored tensor after another."""
        from compress.quantizers.rtn import round_to_nearest

        q, ckpt = self.plan.q, self.sm.checkpoint
        spec = q.embedding.spec(q)
        ck = self.sm.ckpt_name(f"{name}.weight")
        vocab, hidden = tuple(self.sm.model.get_input_embeddings().weight.shape)
        spec.check_divides(hidden, name)
        err = {"num": 0.0, "den": 0.0}

        def tensors(s: int, measure: bool = False) -> dict[str, torch.Tensor]:
            W = ckpt.load_rows(ck, s, s + rows_per_slice).float()
            qw = round_to_nearest(W, spec)
            if measure:
                err["num"] += float((qw.dequantize(torch.float32) - W).pow(2).sum())
                err["den"] += float(W.pow(2).sum())
            return self.format.embedding_tensors(name, qw, self.dtype)

        starts = range(0, vocab, rows_per_slice)
        nbytes = 0
        for k, (key, t) in enumerate(tensors(0).items()):  # one pass over the rows per stored tensor
            shape = (vocab, *t.shape[1:])
            self.writer.add_tensor_chunks(key, t.dtype, shape, (tensors(s, measure=k == 0)[key] for s in starts))
            nbytes += t.element_size() * int(torch.Size(shape).numel())
        self.layers.append(LayerScheme(name, spec.bits, spec.group_size, spec.sym, False, lookup=True))
        self.embedding = {"name": name, "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                          "rounding": "rtn", "bytes": nbytes,
                          "weight_rel_error": (err["num"] / err["den"]) ** 0.5 if err["den"] else 0.0}

    @property
    def needs_head_hessian(self) -> bool:
        """Whether `quantize.lm_head` rounds by GPTQ: `write_head` then takes the Hessian of
        the head's inputs, which the quantize walk produces after its last block."""
        q = self.plan.q
        return q.lm_head is not None and q.lm_head.rounding_for(q) == "gptq"

    def _head_source(self, name: str) -> tuple[str, str, bool, tuple[int, int]]:
        """The head's name, the checkpoint key of its rows (a tied head's: the embedding's),
        whether it is tied, and its shape, its grid checked against that shape."""
        model = self.sm.model
        head = model.get_output_embeddings()
        self.plan.q.lm_head.spec(self.plan.q).check_divides(head.weight.shape[1], name)
        ck = self.sm.ckpt_name(f"{name}.weight") or self.sm._weight_ckpt_name(model.get_input_embeddings())
        return name, ck, head.weight is model.get_input_embeddings().weight, tuple(head.weight.shape)

    def write_head(self, hessian: Optional[torch.Tensor] = None, rows_per_slice: int = 4096) -> None:
        """`quantize.lm_head`: the head rounded on its grid (to nearest, or by GPTQ against
        `hessian` of its inputs, `compress.stages.head`), read from the checkpoint a slice of rows
        at a time, written as the format writes a quantized linear under the head's own name. A
        tied head is read from the embedding, which stays as written (the artifact unties them),
        unless the format stores the table once as the head (`shares_table`)."""
        import time

        from compress.stages.head import head_gptq_spec, round_head
        from compress.stages.quantize import LayerReport

        t0 = time.perf_counter()
        sm, q = self.sm, self.plan.q
        name, ck, tied, (vocab, _) = self._head_src
        spec = q.lm_head.spec(q)
        rounding = q.lm_head.rounding_for(q)
        if (rounding == "gptq") != (hessian is not None):
            raise ValueError(f"lm_head: rounding {rounding} {'needs' if hessian is None else 'takes no'} "
                             "Hessian of the head's inputs")
        gspec = head_gptq_spec(q, spec) if hessian is not None else None
        rows = (sm.checkpoint.load_rows(ck, s, s + rows_per_slice) for s in range(0, vocab, rows_per_slice))
        got = round_head(rows, spec, name, hessian, gspec)
        bias_ck = sm.ckpt_name(f"{name}.bias")
        bias = None if bias_ck is None else sm.checkpoint.load([bias_ck])[bias_ck]
        lin = QuantizedLinear(name, got.weight, spec, bias)
        out = self.format.linear_tensors(lin, self.dtype)
        self.writer.add_tensors(out)
        self.layers.append(LayerScheme.of(lin))
        self.head = {"name": name, "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                     "rounding": rounding, "method": got.method, "untied_from_embedding": tied and not self.shared,
                     "shared_with_embedding": self.shared,
                     "bytes": sum(v.numel() * v.element_size() for v in out.values() if v.dim() > 0),
                     "weight_rel_error": got.weight_rel_error}
        if got.output_rel_error is not None:
            self.head.update(output_rel_error=got.output_rel_error, damp_percent=got.damp_percent)
        self.head_reports = [LayerReport(name, spec.bits, spec.group_size, got.method, got.weight_rel_error,
                                         got.output_rel_error, time.perf_counter() - t0)]

    def add_block(self, i: int, block: nn.Module, results: dict[str, QuantResult]) -> None:
        """Write block `i`, and hand what was written to `self.keep` (the resume store)."""
        rec = self.block_record(i, block, results)
        self.write_block(rec)
        if self.keep is not None:
            self.keep(i, rec)

    def block_record(self, i: int, block: nn.Module, results: dict[str, QuantResult]) -> "BlockRecord":
        """Block `i` as this format writes it: its tensors (cast, packed) and layer metadata."""
        prefix = f"{self.sm.block_prefix}{i}."
        rec = BlockRecord()
        for name, t in block.state_dict().items():
            if name.rsplit(".", 1)[0] in results:
                continue
            rec.tensors[prefix + name] = self._cast(t)
        for name, res in results.items():
            bias = getattr(block.get_submodule(name), "bias", None)
            lin = QuantizedLinear(prefix + name, _to_cpu(res.weight), res.spec.grid,
                                  None if bias is None else bias.detach().cpu(), res.spec.activations)
            out = self.format.linear_tensors(lin, self.dtype)
            rec.quantized_params += lin.weight.codes.numel()
            # a 0-dim tensor is a format's per-layer tag (GGUF's type), not stored bytes
            rec.quantized_bytes += sum(v.numel() * v.element_size() for k, v in out.items()
                                       if not k.endswith(".bias") and v.dim() > 0)
            rec.layers.append(LayerScheme.of(lin))
            rec.tensors.update(out)
        from transformers.pytorch_utils import Conv1D

        for name, mod in block.named_modules():
            if isinstance(mod, (nn.Linear, Conv1D)) and name not in results:
                rec.skipped.append(prefix + name)
        return rec

    def write_block(self, rec: "BlockRecord") -> None:
        self.quantized_params += rec.quantized_params
        self.quantized_bytes += rec.quantized_bytes
        self.layers += rec.layers
        self.skipped += rec.skipped
        self.writer.add_tensors(rec.tensors)

    def _copy_side_files(self) -> None:
        own = self.loaded.tokenizer_dir
        for p in sorted(self.loaded.root.iterdir()):
            if p.is_file() and _COPY.match(p.name) and not (own and _TOKENIZER.match(p.name)):
                self.writer.add_file(p.name, p)
        for p in sorted(own.iterdir()) if own else ():
            if p.is_file() and _TOKENIZER.match(p.name):
                self.writer.add_file(p.name, p)

    def finish(self, manifest: dict) -> Path:
        q = self.plan.q
        if q.lm_head is not None and self.head is None:
            raise RuntimeError("lm_head: the quantized head was never written (write_head after the block walk)")
        algorithm = q.model_dump(mode="json")
        options = {**algorithm, "act_order": bool(algorithm.get("desc_act")),
                   "meta": {"quantizer": [f"compress:{__version__}"], "method": q.method}}
        base = q.spec(q.bits, q.group_size, q.sym).grid
        qcfg = self.format.quantization_config(base, self.layers, self.skipped, options)
        config = self.loaded.config.to_dict()
        config["quantization_config"] = qcfg
        config["dtype"] = self.cfg.export.dtype
        if (self.head is not None and self.head["untied_from_embedding"]) or self.embedding is not None:
            config["tie_word_embeddings"] = False  # the head is its own tensor now (quantized, or float)
        for name, content in self.format.side_files(qcfg).items():
            self.writer.add_file(name, content)
        if self.format.copies_side_files:
            self._copy_side_files()
        manifest = dict(manifest)
        overrides = [dataclasses.asdict(s) for s in self.layers if s.key[:3] != (q.bits, q.group_size, q.sym)]
        manifest["quantization"] = {
            # the file's fields, then the algorithm's settings as configured
            "format": self.format.name, "method": q.method, "bits": q.bits, "group_size": q.group_size,
            "sym": q.sym, "permuted_g_idx": any(s.permuted for s in self.layers),
            "skipped": self.skipped, "overrides": overrides,
            "quantized_params": self.quantized_params,
            "linear_bits_per_weight": self.linear_bits_per_weight,
            "algorithm": algorithm,
        }
        if self.head is not None:
            manifest["quantization"]["lm_head"] = self.head
        if self.embedding is not None:
            manifest["quantization"]["embedding"] = self.embedding
        return self.writer.finish(config, manifest)

    def abort(self) -> None:
        self.writer.abort()


def stage_quantize(ctx) -> None:
    """Quantize and export every candidate, one at a time: the block walk hands each finished
    block to the exporter, and to the resume store (compress/resume.py). A failing candidate
    is marked failed and the others go on (a run with one candidate stops). With `ctx.resume`,
    a candidate continues from its stored blocks, and one whose artifact was finished is kept."""
    from compress.resume import fingerprint, open_store

    manifest = base_manifest(ctx.cfg, ctx.loaded, ctx.input_hashes, ctx.calibration)
    store = open_store(ctx.out_dir, fingerprint(ctx), ctx.resume)
    for name, res in ctx.candidates.items():
        if res.error:
            continue
        res.node = socket.gethostname()
        try:
            quantize_candidate(ctx, res, store.candidate(name), manifest)
        except Exception as e:
            if len(ctx.candidates) == 1:
                raise
            log.exception("candidate %s failed", name)
            res.error = f"{type(e).__name__}: {e}"


def quantize_candidate(ctx, res, saved, manifest: dict) -> None:
    """One candidate's artifact at `ctx.out_dir / name`, continued from the blocks `saved` (its
    resume store) holds, or kept when that store says it was finished. Raises on failure, after
    removing the partial folder. A Ray task (compress/executor/task.py) calls this too."""
    from compress.evaluate.memory import release_freed
    from compress.stages.calibrate import spool_dir
    from compress.stages.quantize import quantize_model

    name = res.plan.name
    if _keep_finished(ctx, res, saved):
        return
    sm = ctx.loaded.streamed()
    exporter = None
    try:
        point = saved.resume_point(sm.n_blocks)
        # Every block stored but no record that the artifact is done: the kill fell between
        # its rename and that record, so the folder there is this run's and is rewritten.
        exporter = Exporter(ctx.loaded, sm, res.plan, ctx.cfg, ctx.out_dir / name,
                            overwrite=True if point.start == sm.n_blocks else None)
        for i in range(point.start):  # the interrupted run's blocks, as it wrote them
            exporter.write_block(BlockRecord.restore(*saved.load_block(i)))
        exporter.keep = lambda i, rec: saved.save_block(i, rec.tensors, rec.meta())
        head_sink = exporter.write_head if exporter.needs_head_hessian else None
        res.layers = quantize_model(sm, res.plan, ctx.calib_ids, exporter.add_block, spool_dir(ctx), saved, point,
                                    head_sink=head_sink)
        res.layers += exporter.head_reports
        res.quantize_seconds = saved.seconds()  # the interrupted runs' share included
        res.artifact = exporter.finish(manifest if res.allocation is None else {**manifest, "allocation": res.allocation})
        res.metrics.linear_bits_per_weight = exporter.linear_bits_per_weight
        saved.mark_done({"reports": [dataclasses.asdict(r) for r in res.layers],
                         "quantize_seconds": res.quantize_seconds,
                         "linear_bits_per_weight": res.metrics.linear_bits_per_weight})
    except BaseException:  # Ctrl-C too: no temporary folder may outlive the run
        if exporter is not None:
            exporter.abort()
        raise
    finally:
        sm = exporter = None  # this candidate's model and buffers go before the next
        release_freed()


def _keep_finished(ctx, res, saved) -> bool:
    """Whether the interrupted run finished this candidate's artifact (the store says so and the
    folder is complete); its reports and figures are then taken from the store."""
    from compress.formats.writer import is_complete
    from compress.stages.quantize import LayerReport

    done = saved.done()
    if done is None:
        return False
    folder = ctx.out_dir / res.plan.name
    if not is_complete(folder):
        log.warning("--resume: %s was finished, but %s is no longer a complete artifact; quantizing it again",
                    res.plan.name, folder)
        saved.discard()
        return False
    res.artifact = folder
    res.layers = [LayerReport(**r) for r in done["reports"]]
    res.quantize_seconds = done["quantize_seconds"]
    res.metrics.linear_bits_per_weight = done["linear_bits_per_weight"]
    log.info("--resume: %s was finished by the interrupted run; keeping %s", res.plan.name, folder)
    return True


def shares_table(sm: StreamedModel, fmt, embedding, head, export=None) -> bool:
    """Whether the artifact stores a tied table once, as the quantized head the embedding also
    reads (`Format.shares_tied_head`): the model ties them, `head` (`quantize.lm_head` or its
    spec) is set and `embedding` is not. `export`: the run's settings (None: the format's default)."""
    model = sm.model
    out = model.get_output_embeddings()
    return (fmt.shares_tied_head(export) and head is not None and embedding is None and out is not None
            and out.weight is model.get_input_embeddings().weight)


def outer_state(sm: StreamedModel, untie: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The tensors outside the block list that an artifact stores (a tied lm_head once, unless
    `untie`: a quantized embedding leaves the head its own tensor)."""
    model = sm.model
    out_emb = model.get_output_embeddings()
    tied = not untie and out_emb is not None and out_emb.weight is model.get_input_embeddings().weight
    # transformers re-ties lm_head to the embedding on load; storing it twice is waste
    tied_name = f"{[n for n, m in model.named_modules() if m is out_emb][0]}.weight" if tied else None
    return [(n, t) for n, t in model.state_dict().items() if not n.startswith(sm.block_prefix) and n != tied_name]


def _to_cpu(qw):
    if isinstance(qw, BlockQuantWeight):
        return qw.to("cpu")
    return dataclasses.replace(
        qw, codes=qw.codes.cpu(), scales=qw.scales.cpu(), zeros=qw.zeros.cpu(), g_idx=qw.g_idx.cpu()
    )


def base_manifest(cfg: RunConfig, loaded: LoadedModel, input_hashes: dict[str, str],
                  calibration) -> dict:
    return {
        "compress_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": cfg.model_dump(mode="json"),
        "packages": package_versions(),
        "source": {
            "model": loaded.source,
            "architecture": (loaded.config.architectures or ["?"])[0],
            "model_type": loaded.config.model_type,
            "files": input_hashes,
            **describe_source(loaded.root),  # name, hub_id, license, language, gguf: for the model card
        },
        "calibration": None if calibration is None else dataclasses.asdict(calibration),
        "runtime": runtime_settings(loaded.device),
    }


def runtime_settings(device: torch.device) -> dict:
    """What the quantized bytes depend on besides the inputs: reductions in the Hessian and the
    block forward are summed in an order that follows the thread count (and, on CUDA, the
    kernels chosen), so hashes reproduce only at equal settings and package versions."""
    return {
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "hashes_reproduce_with": "the same device, torch_threads and package versions",
    }
