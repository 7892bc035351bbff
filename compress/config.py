"""The run configuration: a typed schema where every error names its key path.

Unknown keys are errors (``extra="forbid"``) so a typo never reads as a default. Loading goes
YAML -> ``--set`` overrides -> validation, and nothing runs before validation has passed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from compress.models.provenance import is_hub_id
from compress.publish.config import PublishConfig
from compress.quantizers.base import Override, check_group_size  # noqa: F401  (re-exported)
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A bad configuration; the message names the key path. The CLI exits 2 on it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    source: str = Field(description="Local Hugging Face folder, a .gguf file, or a hub id")
    gguf_file: Optional[str] = Field(None, description="GGUF file name inside `source` when it is a folder")
    revision: Optional[str] = Field(None, description="Hub revision (hub ids only)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    allow_pickle: bool = Field(False, description="Opt in to loading pickled .bin checkpoints")
    trust_remote_code: bool = False
    cache_dir: Optional[str] = Field(None, description="Where converted GGUF checkpoints are cached")
    tokenizer: Optional[str] = Field(
        None,
        description="Take the tokenizer from this folder or Hub id instead of the source's own (for any "
        "source; the fix when the tokenizer a GGUF yields fails its checks)",
    )
    name: Optional[str] = Field(
        None,
        description="The source's Hub id (org/name), for the model card's base_model when `source` is a "
        "local folder or a GGUF file that does not record it",
    )

    @field_validator("name")
    @classmethod
    def _hub_id(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not is_hub_id(v):
            raise ValueError(f"{v!r} is not a Hub id of the form org/name")
        return v


def _bos_word(v: Any) -> Any:
    return str(v).lower() if isinstance(v, bool) else v  # YAML reads `bos: true` as a bool


BosPolicy = Annotated[Literal["auto", "true", "false"], BeforeValidator(_bos_word)]
_BOS_DESCRIPTION = (
    "Start every window with the BOS token: 'auto' where the tokenizer adds one by default "
    "(Gemma, Llama 3; a GGUF's tokenizer.ggml.add_bos_token), 'true' always, 'false' never"
)


class CalibrationConfig(_Strict):
    dataset: str = "wikipedia"
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0
    chat_template: bool = False
    text_field: str = "text"
    split: Literal["auto", "all", "held-out"] = Field(
        "auto",
        description="Which documents of calibration.dataset calibration draws from: 'all', or "
        "'held-out' (the documents that the deterministic split does not keep for evaluation); "
        "'auto' is held-out when evaluate.dataset is the same source, otherwise all",
    )
    bos: BosPolicy = Field("auto", description=_BOS_DESCRIPTION)
    activations: Literal["auto", "memory", "disk"] = Field(
        "auto",
        description="Where the calibration windows' activations wait between decoder blocks: "
        "'memory', or 'disk' (an unlinked temporary file in the output folder: the process holds "
        "one batch, the page cache the rest); 'auto' is disk on CPU and device memory on CUDA",
    )


def _method_union():
    """`quantize:` is one of the registered methods' configs, chosen by its `method` key
    (default rtn); the error for an unknown method lists the registered ones."""
    from compress.quantizers import METHODS

    def which(v: Any) -> str:
        return v.get("method", "rtn") if isinstance(v, dict) else getattr(v, "method", "rtn")

    members = tuple(Annotated[m.config, Tag(name)] for name, m in METHODS.items())
    return Annotated[
        Union[members],  # type: ignore[valid-type]
        Discriminator(
            which, custom_error_type="unknown_method",
            custom_error_message=f"unknown method; valid: {', '.join(sorted(METHODS))}",
        ),
    ]


QuantizeConfig = _method_union()


def _method_fields() -> dict[str, Any]:
    """Every setting of every method except the per-layer lists: what a candidate or a sweep
    may change, each with its annotation (validators included) from the method that has it."""
    from compress.quantizers import METHODS

    fields: dict[str, Any] = {}
    for m in METHODS.values():
        for k, f in m.config.model_fields.items():
            if k not in ("method", "skip", "overrides") and k not in fields:
                fields[k] = f
    return fields


def _candidate_model() -> type[BaseModel]:
    from compress.quantizers import METHODS

    fields: dict[str, Any] = {
        "name": (Optional[str], None),
        "method": (Optional[Literal[tuple(METHODS)]], None),  # type: ignore[misc]
    }
    for k, f in _method_fields().items():
        fields[k] = (Optional[f.rebuild_annotation()], Field(None, description=f.description))
    return create_model("Candidate", __base__=_Strict, __doc__=(
        "One quantization level of a sweep: a name plus changes to the `quantize` section."), **fields)


def _sweep_model() -> type[BaseModel]:
    from compress.quantizers import METHODS

    fields: dict[str, Any] = {"method": (Optional[list[Literal[tuple(METHODS)]]], Field(None, min_length=1))}  # type: ignore[misc]
    for k, f in _method_fields().items():
        fields[k] = (Optional[list[f.rebuild_annotation()]], Field(None, min_length=1))
    return create_model("SweepConfig", __base__=_Strict, __doc__=(
        "A matrix of candidates: the cartesian product of these lists over the `quantize` "
        "section. Keys left out keep the `quantize` value; a key the combination's method does "
        "not have is dropped for that combination (so `method: [rtn, gptq]` x `desc_act: "
        "[false, true]` gives 3 candidates)."), **fields)


Candidate = _candidate_model()
SweepConfig = _sweep_model()


def _format_names() -> tuple[str, ...]:
    from compress.formats.registry import format_names

    return format_names()


class ExportConfig(_Strict):
    format: Literal[_format_names()] = Field(  # type: ignore[valid-type]
        "compressed-tensors",
        description="On-disk format: 'compressed-tensors' (transformers + compressed-tensors, "
        "vLLM; loads where compress is installed; W8A8 as int-quantized), 'gptq' (GPTQModel/optimum, "
        "vLLM), 'awq' (AWQ GEMM: transformers + GPTQModel's AWQ kernels, vLLM; asymmetric 4-bit groups), "
        "'gguf' (llama.cpp, Ollama; see gguf_type) or 'onnx' (ONNX Runtime MatMulNBits, onnxruntime-genai; float32)",
    )
    output_dir: str = "runs/out"
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the tensors that stay unquantized (embeddings, norms)"
    )
    overwrite: bool = False
    max_shard_bytes: int = Field(2 * 1024**3, ge=1024)
    gguf_type: Optional[Literal["Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M"]] = Field(
        None, validate_default=True,
        description="GGUF type of the quantized linears (format gguf only). Simple types take the grid "
        "from quantize: Q8_0 (bits 8, sym), Q4_0 (bits 4, sym), Q4_1 (bits 4, asym), all group_size 32. "
        "k-quants (Q2_K..Q6_K: every tensor in that type, llama-quantize --pure) and llama.cpp's mixes "
        "(Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M: types per tensor as llama-quantize chooses them) set bits, "
        "group_size and sym per tensor themselves; rtn or gptq round on that grid. With quantize.target "
        "a byte budget chooses each block linear's type instead (target_options.bits 2..6, 8: Q2_K..Q6_K, "
        "Q8_0, with the same fallbacks), and keeps the mix where that measures lower",
    )
    gguf_embedding: Literal["auto", "float"] = Field(
        "auto", description="GGUF type of token_embd and of an output (lm_head) tensor that quantize "
        "leaves in float (format gguf only). auto: the type llama-quantize gives them under gguf_type, "
        "so the file has its layout and size (tied or output rows: Q6_K, or Q8_0 where rows are not a "
        "multiple of 256 or the type is Q8_0; an untied token_embd: gguf_type's base type), rounded to "
        "nearest. float: export.dtype, as llama-quantize --token-embedding-type f16 --output-tensor-type f16",
    )

    onnx_accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits accuracy_level of an ONNX export (format onnx): 4 (default, the "
        "onnxruntime-genai builder's CPU setting) quantizes activations to int8 per block inside the op, "
        "ONNX Runtime's fast CPU kernels (4-bit and 8-bit); the evaluation measures it, so KL includes "
        "that rounding (SmolLM2-135M RTN W4: +1%, W8: 0.0018 -> 0.0063). 0 computes in float32 (logits "
        "equal to our torch loader's), about 1.3x slower for 4-bit and, with no float kernel for 8-bit in "
        "ONNX Runtime's CPU library, some 20x slower than float32 for bits 8",
    )

    onnx_shared_embedding: bool = Field(
        True, description="A tied model with a quantized head (quantize.lm_head) under format onnx: "
        "true (default, as onnxruntime-genai's builder with shared_embeddings) stores the table once, as "
        "the head's MatMulNBits codes that the embedding gathers from (GatherBlockQuantized); false keeps "
        "the embedding in float32 and unties the head",
    )

    @field_validator("gguf_type")
    @classmethod
    def _gguf_type(cls, v: Optional[str], info) -> Optional[str]:
        fmt = info.data.get("format")
        if fmt == "gguf" and v is None:
            raise ValueError("required with export.format: gguf (Q8_0, Q4_0, Q4_1, a k-quant such as Q4_K, "
                             "or a mix such as Q4_K_M)")
        if fmt is not None and fmt != "gguf" and v is not None:
            raise ValueError(f"applies to export.format: gguf only (format is '{fmt}')")
        return v

    @field_validator("gguf_embedding")
    @classmethod
    def _gguf_embedding(cls, v: str, info) -> str:
        fmt = info.data.get("format")
        if v != "auto" and fmt is not None and fmt != "gguf":
            raise ValueError(f"applies to export.format: gguf only (format is '{fmt}')")
        return v

    @field_validator("onnx_shared_embedding")
    @classmethod
    def _onnx_shared(cls, v: bool, info) -> bool:
        fmt = info.data.get("format")
        if not v and fmt is not None and fmt != "onnx":
            raise ValueError(f"applies to export.format: onnx only (format is '{fmt}')")
        return v


class EvaluateConfig(_Strict):
    enabled: bool = True
    dataset: str = "wikipedia"
    windows: int = Field(40, ge=1)
    seqlen: int = Field(512, ge=8)
    divergence: bool = True
    speed: bool = True
    speed_prompt_tokens: int = Field(128, ge=1)
    speed_new_tokens: int = Field(32, ge=1)
    bos: BosPolicy = Field("auto", description=_BOS_DESCRIPTION)
    gguf_runtime: Literal["auto", "llama.cpp", "torch"] = Field(
        "auto", description="what evaluates a GGUF artifact: llama.cpp (llama-cpp-python), compress's "
        "torch view, or auto: llama.cpp where llama_cpp is importable")


class ReportConfig(_Strict):
    markdown: bool = True
    print: bool = True
    html: bool = Field(True, description="report.html and PNG plots of the comparison (needs matplotlib)")


def _fraction(v: Any) -> Optional[float]:
    """`"2%"` -> 0.02; a number is already a fraction (0.02), so 2 (a likely typo for 2%) is refused."""
    if v is None:
        return None
    if isinstance(v, str):
        s = v.strip()
        if not s.endswith("%"):
            raise ValueError("write a fraction (0.02) or a percent string ('2%')")
        try:
            v = float(s[:-1]) / 100
        except ValueError:
            raise ValueError(f"{s!r} is not a percentage") from None
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        if v >= 1:
            raise ValueError(f"{v} reads as {v:.0%}; write a fraction (0.02) or a percent string ('2%')")
        v = float(v)
    else:
        raise ValueError("write a fraction (0.02) or a percent string ('2%')")
    if v < 0:
        raise ValueError("must not be negative")
    return v


class SelectConfig(_Strict):
    """The quality budget: the recommendation is the smallest candidate (bytes on disk) within it."""

    max_ppl_increase: Optional[float] = Field(
        None, description="Largest perplexity increase over the original: '2%' or 0.02"
    )
    max_kl: Optional[float] = Field(None, ge=0, description="Largest mean KL(original || candidate), nats/token")
    min_top1: Optional[float] = Field(None, ge=0, le=1, description="Smallest top-1 agreement with the original")

    @field_validator("max_ppl_increase", mode="before")
    @classmethod
    def _pct(cls, v: Any) -> Optional[float]:
        return _fraction(v)


class ServingConfig(_Strict):
    """Memory to serve each candidate: weights + KV cache + a fixed runtime overhead (compress/serving.py)."""

    context_length: int = Field(4096, ge=1, description="Tokens of KV cache per sequence")
    batch: int = Field(1, ge=1, description="Sequences served at once")
    kv_dtype: Literal["float32", "float16", "bfloat16", "float8"] = "float16"
    overhead_gb: float = Field(
        1.0, ge=0, description="GiB for CUDA context, kernels' workspaces, activations and allocator slack"
    )
    gpus: Optional[str] = Field(None, description="YAML table of GPUs (name, memory_gb); default configs/gpus.yaml")


class ExecutorConfig(_Strict):
    """Where the candidates of a sweep run: in this process, one after another (`local`), or
    as one Ray task each (`ray`, needs `pip install 'compress[ray]'`; docs/ray.md)."""

    kind: Literal["local", "ray"] = "local"
    address: Optional[str] = Field(
        None, description="Ray cluster to join: 'auto' (a running cluster, else a new one on this "
        "machine), 'local' (always a new one here) or an address such as 'ray://head:10001' or 'head:6379'",
    )
    max_retries: int = Field(1, ge=0, description="Times a candidate whose worker died is run again")
    threads: Optional[int] = Field(
        None, ge=1, description="torch threads (and Ray CPUs) per candidate task; default: this "
        "process's torch thread count, so the weights hash as in a local run",
    )
    gpus: Optional[float] = Field(
        None, ge=0, description="GPUs per candidate task; default 1 when model.device resolves to cuda, else 0",
    )
    memory_gb: Optional[float] = Field(
        None, gt=0, description="Memory per candidate task in GiB; default: the plan's estimate "
        "(compress/executor/resources.py)",
    )
    artifacts: Literal["shared", "stream"] = Field(
        "shared", description="'shared' (default): workers write into export.output_dir, which every "
        "node mounts (one machine, NFS), and a retried task resumes from its stored blocks; 'stream': "
        "workers write and evaluate in a node-local scratch folder and send the files back to this "
        "process in 64 MiB chunks, each file's sha256 checked before the artifact is renamed into "
        "place (a retry starts from block 0; docs/ray.md)",
    )

    @field_validator("address", "threads", "gpus", "memory_gb", "artifacts")
    @classmethod
    def _ray_only(cls, v: Any, info) -> Any:
        if info.data.get("kind") == "local" and v is not None and v != cls.model_fields[info.field_name].default:
            raise ValueError("applies to executor.kind: ray only")
        return v


class PublishSection(PublishConfig):
    candidate: Optional[str] = Field(
        None, description="Which candidate to publish; default: the only one, else the recommended one"
    )


class RunConfig(_Strict):
    model: ModelConfig
    calibration: CalibrationConfig = CalibrationConfig()
    quantize: QuantizeConfig = Field(default_factory=lambda: _default_quantize())  # type: ignore[valid-type]
    candidates: list[Candidate] = Field(default_factory=list)  # type: ignore[valid-type]
    sweep: Optional[SweepConfig] = None  # type: ignore[valid-type]
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    select: SelectConfig = SelectConfig()
    serving: ServingConfig = ServingConfig()
    publish: Optional[PublishSection] = None
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> "RunConfig":
        names = [c.name for c in self.candidates if c.name]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"candidates: duplicate names {sorted(dup)}")
        return self


def _default_quantize():
    from compress.quantizers.rtn import RTNConfig

    return RTNConfig()


def _key_path(loc: tuple) -> str:
    """The YAML key path of an error: the union's method tag (`quantize.gptq.bits`) is not a key."""
    from compress.quantizers import METHODS

    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] == "quantize" and parts[1] in METHODS:
        del parts[1]
    return ".".join(parts)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = _key_path(e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "unknown_method":
            path += ".method"
            msg = f"{msg} (got {e['input'].get('method')!r})" if isinstance(e["input"], dict) else msg
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: `line L, column C: problem` (PyYAML's own text spans lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(problem.split())


def _refuse_duplicate_keys(node: yaml.Node, where: str, path: tuple[str, ...], seen: set[int]) -> None:
    """PyYAML keeps the last of two equal keys without a word; a config must not, since the
    first value would then read as if it had been applied."""
    if id(node) in seen:  # an alias to a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else "?"
            line = k.start_mark.line + 1
            if key in first and key != "<<":
                raise ConfigError(
                    f"{'.'.join((*path, key))}: duplicate key in {where} (line {line}; first on line {first[key]})"
                )
            first.setdefault(key, line)
            _refuse_duplicate_keys(v, where, (*path, key), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _refuse_duplicate_keys(v, where, (*path, str(i)), seen)


def load_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load` that refuses duplicate keys, naming the key path and both lines."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, where, (), set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _coerce(path: str, value: str) -> Any:
    """`--set` values are YAML scalars: `4` is an int, `true` a bool, `[8, 4]` a list."""
    try:
        return load_yaml(value, f"--set {path}")
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: --set value {value!r} is not valid YAML ({_yaml_problem(e)})") from None


def apply_overrides(data: Any, overrides: list[str]) -> Any:
    if overrides and not isinstance(data, dict):
        raise ConfigError(
            f"(top level): the config must be a mapping of sections, not a {type(data).__name__}; "
            "--set cannot apply to it"
        )
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        path, value = item.split("=", 1)
        path = path.strip()
        keys = path.split(".")
        if not all(keys):
            raise ConfigError(f"--set {item!r}: '{path}' is not a key path (empty part)")
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:  # `quantize:` written with nothing under it
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: cannot set a key inside a non-mapping value")
        node[keys[-1]] = _coerce(path, value)
    return data


def parse_config(data: Any) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError("(top level): the config must be a mapping of sections")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        data = load_yaml(text, str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    return parse_config(apply_overrides({} if data is None else data, list(overrides)))
