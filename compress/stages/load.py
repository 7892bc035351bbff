"""Stage: resolve `model.source` to a checkpoint folder and open it for streaming."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from compress.config import ConfigError, ModelConfig
from compress.engine import StreamedModel
from compress.models.arch import ArchSpec, arch_for
from compress.models.checkpoint import Checkpoint, CheckpointError, open_checkpoint, read_config_json

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
_TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                       "*.model", "*.tiktoken", "chat_template.*"]


@dataclass
class LoadedModel:
    source: str  # what the user wrote
    root: Path  # folder holding config.json and weights (and, unless model.tokenizer, the tokenizer)
    config: object  # transformers PretrainedConfig
    checkpoint: Checkpoint
    arch: ArchSpec
    device: torch.device
    dtype: torch.dtype
    tokenizer_dir: Optional[Path] = None  # where the tokenizer is read from; None: root
    gguf: Optional[Path] = None  # the GGUF file the checkpoint was converted from

    @property
    def tokenizer_root(self) -> Path:
        return self.tokenizer_dir or self.root

    def streamed(self, load_outer: bool = True) -> StreamedModel:
        return StreamedModel(self.config, self.checkpoint, self.device, self.dtype, load_outer=load_outer)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: cuda was asked for but no CUDA device is available; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _from_hub(cfg: ModelConfig) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(cfg.source, revision=cfg.revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise CheckpointError(
            f"model.source: '{cfg.source}' is not a local folder or file, and fetching it from the "
            f"Hugging Face Hub failed (offline, or no such repo?): {type(e).__name__}: {e}"
        ) from None


def package_file(spec: str, cache_dir: Optional[Path] = None, assemble: bool = True) -> Path:
    """`package:NAME/relative/path`: a file shipped inside an installed Python package, or
    assembled (once, into the cache) from its parts `path.part00`, ... in NAME and NAME_part*
    packages (compress/models/parts.py); with `assemble=False`, the first part."""
    import importlib.util

    from compress.models.gguf import default_cache_dir
    from compress.models.parts import assemble as assemble_parts, find_parts

    pkg, _, rel = spec[len("package:"):].partition("/")
    found = importlib.util.find_spec(pkg) if pkg else None
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"model.source: package '{pkg}' is not installed (from '{spec}')")
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    path = pkg_dir / rel
    if path.exists() or not rel:
        return path
    parts = find_parts(pkg_dir, Path(rel).name)
    if not parts:
        return path
    if not assemble:
        return parts[0]
    return assemble_parts(pkg_dir, Path(rel).name, parts, cache_dir or default_cache_dir())


def resolve_gguf(cfg: ModelConfig) -> Optional[Path]:
    """The GGUF file `model.source` names (assembling a package's parts), None for other sources."""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    if cfg.source.startswith("package:"):
        src = package_file(cfg.source, cache)
    else:
        src = Path(cfg.source).expanduser()
    if src.suffix == ".gguf":
        if not src.is_file():
            raise CheckpointError(f"model.source: GGUF file {src} not found")
        return src
    if src.is_dir() and cfg.gguf_file:
        if not (src / cfg.gguf_file).is_file():
            raise CheckpointError(f"model.gguf_file: {src / cfg.gguf_file} not found")
        return src / cfg.gguf_file
    return None


def resolve_folder(cfg: ModelConfig) -> Path:
    """The local folder for `model.source`, converting GGUF or downloading as needed."""
    from compress.models.gguf import convert_gguf

    gguf = resolve_gguf(cfg)
    if gguf is not None:
        return convert_gguf(gguf, Path(cfg.cache_dir) if cfg.cache_dir else None)
    src = Path(cfg.source).expanduser()
    if src.is_dir():
        return src
    if src.exists():
        raise CheckpointError(f"model.source: {src} is a file but not a .gguf file")
    if cfg.source.count("/") == 1 and not cfg.source.startswith((".", "/", "~")):
        return _from_hub(cfg)
    raise CheckpointError(f"model.source: {cfg.source} does not exist")


def check_source(cfg: ModelConfig) -> None:
    """Cheap checks of the `model` section before any work: the device exists, the cache folder
    is usable, the file or folder exists and, for a Hugging Face folder, its architecture is one
    we support; a GGUF file's header and tensor table are complete. Hub ids are checked at load."""
    from compress.models.gguf import check_gguf
    from compress.paths import unwritable_dir

    resolve_device(cfg.device)
    if cfg.tokenizer is not None:
        check_tokenizer_source(cfg.tokenizer)
    if cfg.cache_dir and (problem := unwritable_dir(cfg.cache_dir)):
        raise ConfigError(f"model.cache_dir: {problem}")
    if cfg.source.startswith("package:"):
        src = package_file(cfg.source, assemble=False)
        if src.name != Path(cfg.source).name:  # parts: checked once assembled, at conversion
            return
    else:
        src = Path(cfg.source).expanduser()
        if not src.exists() and cfg.source.count("/") == 1 and not cfg.source.startswith((".", "/", "~")):
            return  # a hub id
    if not src.exists():
        raise CheckpointError(f"model.source: {src} does not exist")
    if src.is_dir() and cfg.gguf_file:
        if not (src / cfg.gguf_file).is_file():
            raise CheckpointError(f"model.gguf_file: {src / cfg.gguf_file} not found")
        check_gguf(src / cfg.gguf_file)
    elif src.is_dir():
        if not (src / "config.json").is_file():
            raise CheckpointError(f"model.source: {src} has no config.json; not a Hugging Face model folder")
        arch_for(read_config_json(src).get("model_type", "?"))
    elif src.suffix == ".gguf":
        check_gguf(src)
    else:
        raise CheckpointError(f"model.source: {src} is a file but not a .gguf file")


def source_config(cfg: ModelConfig):
    """The transformers config of a local Hugging Face folder source, read without weights;
    None for GGUF files and hub ids (known only once loaded)."""
    src = package_file(cfg.source) if cfg.source.startswith("package:") else Path(cfg.source).expanduser()
    if not src.is_dir() or cfg.gguf_file or not (src / "config.json").is_file():
        return None
    return load_config(src, cfg.trust_remote_code)


def load_config(root: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(root), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"{root / 'config.json'}: cannot read the model config ({e})") from None
    arch_for(config.model_type)  # raises UnsupportedModelError naming the supported types
    check_attention_shape(config, root / "config.json")
    return config


def check_attention_shape(config, where: Path) -> None:
    """Head counts that cannot describe a model, caught before any weight is read: the model's
    own forward would only fail at the first attention call, after work was done."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if not heads or not kv:
        return
    if heads % kv:
        raise CheckpointError(
            f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
            f"({kv}); grouped-query attention needs a whole number of query heads per KV head"
        )
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        raise CheckpointError(
            f"{where}: hidden_size ({config.hidden_size}) is not a multiple of "
            f"num_attention_heads ({heads}) and no head_dim is given"
        )


def check_tokenizer_source(spec: str) -> Optional[Path]:
    """`model.tokenizer` as a local folder, None for a hub id; anything else is a ConfigError."""
    src = Path(spec).expanduser()
    if src.is_dir():
        return src
    if src.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ConfigError(f"model.tokenizer: {spec} is not a tokenizer folder or a hub id (org/name)")
    return None


def resolve_tokenizer(cfg: ModelConfig, root: Path) -> Optional[Path]:
    """The folder of `model.tokenizer` (a local folder, or a hub id's tokenizer files), None
    without one. Without one, a converted GGUF whose tokenizer failed its checks at conversion
    stops the run here, naming the problem and the fix."""
    from compress.models.gguf import TOKENIZER_PROBLEM

    if cfg.tokenizer is None:
        problem = root / TOKENIZER_PROBLEM
        if problem.is_file():
            raise ConfigError(problem.read_text().strip())
        return None
    src = check_tokenizer_source(cfg.tokenizer)
    if src is not None:
        return src
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(cfg.tokenizer, allow_patterns=_TOKENIZER_PATTERNS))
    except Exception as e:
        raise ConfigError(
            f"model.tokenizer: '{cfg.tokenizer}' is not a local folder, and fetching it from the Hugging Face "
            f"Hub failed (offline, or no such repo?): {type(e).__name__}: {e}"
        ) from None


def load_model(cfg: ModelConfig) -> LoadedModel:
    gguf = resolve_gguf(cfg)
    root = resolve_folder(cfg)
    return open_resolved(cfg, root, resolve_tokenizer(cfg, root), gguf)


def open_resolved(cfg: ModelConfig, root: Path, tokenizer_dir: Optional[Path] = None,
                  gguf: Optional[Path] = None) -> LoadedModel:
    """The model of a folder `load_model` already resolved (converted, downloaded): what a
    Ray task opens from the path the driver hands it, converting and fetching nothing."""
    config = load_config(root, cfg.trust_remote_code)
    checkpoint = open_checkpoint(root, allow_pickle=cfg.allow_pickle)
    device = resolve_device(cfg.device)
    return LoadedModel(
        cfg.source, root, config, checkpoint, arch_for(config.model_type), device,
        resolve_dtype(cfg.dtype, device), tokenizer_dir, gguf,
    )


def stage_load(ctx) -> None:
    """Open the model (converting a GGUF once), hash its files, and check every candidate's
    layer schemes against the model's shapes and the export format before any data is read."""
    from compress.hashing import sha256_file

    ctx.loaded = load_model(ctx.cfg.model)
    ctx.input_hashes = {p.name: sha256_file(p) for p in ctx.loaded.checkpoint.files}
    check_layer_schemes(ctx, ctx.loaded.streamed(load_outer=False))


def _layer_scheme_error(sm: StreamedModel, plan, fmt) -> Optional[str]:
    """The first layer whose scheme cannot be used, as a message: a group size that does not
    divide its input size, or a scheme the export format cannot hold."""
    from compress.stages.passes import weight_of
    from compress.stages.quantize import block_linears, layer_spec

    specs = {}
    for i in range(sm.n_blocks):
        for name in (n for g in block_linears(sm.templates[i], sm.arch.sequential) for n in g):
            full = f"{sm.block_prefix}{i}.{name}"
            spec = layer_spec(plan.q, full)
            if spec is None:
                continue
            specs[full] = spec
            shape = tuple(weight_of(sm.templates[i].get_submodule(name), sm.arch.conv1d).shape)
            try:
                spec.check_divides(shape[1], full)
            except ValueError as e:
                return str(e)
            why = fmt.check(full, spec, shape, sm.arch.conv1d)
            if why:
                return f"export.format: {fmt.name} cannot hold layer '{full}' of candidate '{plan.name}': {why}"
    why = fmt.check_plan(specs)
    if why:
        return f"export.format: {fmt.name} cannot hold candidate '{plan.name}': {why}"
    return _head_scheme_error(sm, plan, fmt)


def _head_scheme_error(sm: StreamedModel, plan, fmt) -> Optional[str]:
    """`quantize.lm_head` (and `quantize.embedding`) against the head's (the embedding's) shape,
    as `_layer_scheme_error` checks a block linear."""
    if plan.q.embedding is not None:
        emb = sm.model.get_input_embeddings()
        spec = plan.q.embedding.spec(plan.q)
        hidden = emb.weight.shape[1]
        if not isinstance(emb, torch.nn.Embedding):
            return f"quantize.embedding: the input embedding is a {type(emb).__name__}, not an nn.Embedding"
        if spec.group_size != -1 and hidden % spec.group_size:
            return (f"quantize.embedding.group_size: {spec.group_size} does not divide the embedding's width "
                    f"{hidden} (candidate '{plan.name}')")
    if plan.q.lm_head is None:
        return None
    name = sm._head_name()
    if name is None:
        return f"quantize.lm_head: the model has no lm_head (candidate '{plan.name}')"
    spec = plan.q.lm_head.spec(plan.q)
    shape = tuple(sm.model.get_output_embeddings().weight.shape)
    if spec.group_size != -1 and shape[1] % spec.group_size:
        return (f"quantize.lm_head.group_size: {spec.group_size} does not divide the lm_head's input size "
                f"{shape[1]} (candidate '{plan.name}')")
    why = fmt.check(name, spec, shape, False)
    if why:
        return f"quantize.lm_head: export.format {fmt.name} cannot hold the lm_head of candidate '{plan.name}': {why}"
    return None


def check_layer_schemes(ctx, sm: StreamedModel) -> None:
    """Group sizes that do not divide a layer, and schemes the format cannot hold, fail here,
    before any data is processed: the run stops when it has one candidate, else the candidate
    is marked failed and the rest go on."""
    from compress.config import ConfigError
    from compress.formats.registry import get_format

    fmt = get_format(ctx.cfg.export.format)
    if problem := fmt.check_model(ctx.loaded.config, ctx.loaded.root):
        raise ConfigError(problem)
    for k, p in enumerate(ctx.plans):  # grids the format chooses per tensor (GGUF mixes)
        ctx.plans[k] = fmt.resolve_plan(p, sm, ctx.loaded.config, ctx.cfg.export)
        if p.name in ctx.candidates:
            ctx.candidates[p.name].plan = ctx.plans[k]
    for p in ctx.plans:
        err = _layer_scheme_error(sm, p, fmt)
        if err and len(ctx.plans) == 1:
            raise ConfigError(err)
        if err:
            ctx.candidates[p.name].error = err
