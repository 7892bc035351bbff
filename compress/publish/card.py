"""Model card (README.md) from the manifest and the evaluation results.

Front matter follows the Hub's model card metadata
(https://huggingface.co/docs/hub/model-cards#model-card-metadata) and is built with huggingface_hub's
ModelCardData/ModelCard, which dump it as YAML, so user text (model names, licenses) is always quoted.
Markdown text goes through `cell`, so a name cannot add table cells, links or HTML.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from compress.evaluate.sanity import flagged_message
from compress.models.provenance import is_hub_id, languages, readme_metadata
from compress.report.columns import CARD_TABLE, COLUMNS, Column

_VLLM_FORMATS = frozenset({"gptq", "awq", "compressed-tensors"})


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def cell(value: Any) -> str:
    """Markdown-safe text for a table cell or inline prose."""
    text = " ".join(str(value).split())
    for char in "\\|`*_[]<>":
        text = text.replace(char, "\\" + char)
    return text


def _fmt(value: Any, column: Column) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return column.text(value)
    return cell(value)


def base_model(manifest: dict[str, Any]) -> Optional[str]:
    """The Hub id of the model that was quantized, or None when nothing names one.

    In order: the run config's `model.name`; `model.source` when it was a Hub id; the id the source
    records about itself (a GGUF's general.source.repo_url, a config's `_name_or_path`).
    """
    named = _section(_section(manifest, "config"), "model").get("name")
    source = _section(manifest, "source")
    model = source.get("model")
    given = model if isinstance(model, str) and not Path(model).exists() else None  # a local folder is no id
    for candidate in (named, given, source.get("hub_id")):
        if is_hub_id(candidate):
            return candidate
    return None


def model_name(manifest: dict[str, Any]) -> str:
    """What the title calls the source: its Hub name, else the name it declares, else its file or folder name."""
    base = base_model(manifest)
    if base:
        return base.split("/")[-1]
    source = _section(manifest, "source")
    if isinstance(source.get("name"), str) and source["name"].strip():
        return source["name"].strip()
    gguf = _section(source, "gguf")
    where = gguf.get("file") or str(source.get("model") or "").rstrip("/").split("/")[-1]
    return where.removesuffix(".gguf") or "an unnamed model"


def source_license(manifest: dict[str, Any]) -> Optional[str]:
    """The license the source declares (recorded at export), else a local source folder's README front matter."""
    source = _section(manifest, "source")
    if isinstance(source.get("license"), str) and source["license"].strip():
        return source["license"].strip()
    model = source.get("model")
    if not isinstance(model, str) or not model or not Path(model).is_dir():
        return None
    value = readme_metadata(Path(model)).get("license")  # manifests written before the source was described
    return value.strip() if isinstance(value, str) and value.strip() else None


def gguf_note(manifest: dict[str, Any]) -> Optional[str]:
    """A sentence saying the source was a GGUF file, and that its weights were already quantized if so."""
    gguf = _section(_section(manifest, "source"), "gguf")
    if not gguf:
        return None
    kind = f"{cell(gguf['file_type'])} " if gguf.get("file_type") else ""
    what = f"The source is a {kind}GGUF file ({cell(gguf.get('file') or '?')})"  # no code span: it shows escapes
    if not gguf.get("quantized"):
        return what + "."
    bits = f" to {gguf['bits']} bits" if isinstance(gguf.get("bits"), int) else ""
    return (
        f"{what}, so its weights were already quantized{bits} before this run: they were dequantized "
        "to fp32 and quantized again, and the measurements compare with those dequantized weights."
    )


def quant_format(manifest: dict[str, Any], config: dict[str, Any]) -> Optional[str]:
    fmt = _section(manifest, "quantization").get("format")
    return fmt or _section(config, "quantization_config").get("quant_method")


def front_matter(manifest: dict[str, Any], config: dict[str, Any]):
    """The Hub's model card metadata as huggingface_hub.ModelCardData (fields left None are omitted)."""
    from huggingface_hub import ModelCardData

    quant = _section(manifest, "quantization")
    tags = ["compress", "quantized"]
    fmt = quant_format(manifest, config)
    for tag in (fmt, quant.get("method"), f"{quant['bits']}-bit" if quant.get("bits") else None):
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)
    base = base_model(manifest)
    return ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base else None,
        license=source_license(manifest),
        language=languages(_section(manifest, "source").get("language")),
        library_name="onnxruntime" if fmt == "onnx" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )


def _usage(repo_id: str, fmt: Optional[str]) -> list[str]:
    rid = json.dumps(repo_id)  # a valid Python string literal for any repo id
    if fmt == "onnx":
        return [
            "With ONNX Runtime through Optimum:", "",
            "```python",
            "from optimum.onnxruntime import ORTModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f"tokenizer = AutoTokenizer.from_pretrained({rid})",
            f"model = ORTModelForCausalLM.from_pretrained({rid})",
            "```", "",
        ]
    if fmt == "gguf":
        return [
            "With llama.cpp (or Ollama, LM Studio):", "",
            "```sh",
            f"llama-cli -hf {repo_id}",
            "```", "",
            "With transformers (dequantizes to float):", "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained({rid}, gguf_file="model.gguf")',
            f'model = AutoModelForCausalLM.from_pretrained({rid}, gguf_file="model.gguf")',
            "```", "",
        ]
    lines = ["With transformers:", ""]
    if fmt == "gptq":
        lines += ["Needs a GPTQ kernel package: `pip install gptqmodel optimum`.", ""]
    elif fmt == "awq":
        lines += ["Needs GPTQModel's AWQ kernels: `pip install gptqmodel`.", ""]
    elif fmt == "compressed-tensors":
        lines += ["Needs `pip install compressed-tensors`.", ""]
    lines += [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"tokenizer = AutoTokenizer.from_pretrained({rid})",
        f'model = AutoModelForCausalLM.from_pretrained({rid}, device_map="auto")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```", "",
    ]
    if fmt in _VLLM_FORMATS:
        lines += [
            "With vLLM:", "",
            "```python",
            "from vllm import LLM",
            "",
            f"llm = LLM(model={rid})",
            'print(llm.generate("The capital of France is")[0].outputs[0].text)',
            "```", "",
        ]
    return lines


def _kv_table(rows: list[tuple[str, Any]]) -> list[str]:
    present = [(k, v) for k, v in rows if v is not None and v != []]
    if not present:
        return ["Not recorded.", ""]
    lines = ["| Setting | Value |", "|---|---|"]
    for key, value in present:
        value = ", ".join(map(str, value)) if isinstance(value, list) else value
        lines.append(f"| {key} | {cell(value)} |")
    return lines + [""]


def _evaluation(results: Optional[dict[str, Any]]) -> list[str]:
    lines = ["## Evaluation", ""]
    rows = [r for r in (results or {}).get("rows") or [] if isinstance(r, dict)]
    if not rows:
        return lines + ["No measurements were recorded for this artifact.", ""]
    warning = flagged_message(results.get("sanity"))
    if warning:
        lines += [f"> **{cell(warning)}** (published with `--force`).", ""]
    protocol = _section(results, "protocol")
    if protocol.get("name"):
        lines.append(f"Protocol: **{cell(protocol['name'])}**.")
    details = [
        f"{label} {cell(protocol[key])}"
        for key, label in (("dataset", "dataset"), ("split", "split"), ("windows", "windows:"), ("seqlen", "seqlen"))
        if protocol.get(key) is not None
    ]
    if details:
        lines.append(", ".join(details) + ".")
    if protocol.get("description"):
        lines.append(cell(protocol["description"]))
    lines.append("")
    # Columns, headers and formats come from the one column model (compress/report/columns.py).
    columns = [COLUMNS[k] for k in CARD_TABLE if any(r.get(k) is not None for r in rows)]
    this = results.get("this")
    lines.append("| Model | " + " | ".join(c.card_header for c in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for row in rows:
        name = cell(row.get("name", "?"))
        name = f"**{name}** (this model)" if this is not None and row.get("name") == this else name
        values = [_fmt(row.get(c.key), c) for c in columns]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return lines + [""]


def render_card(
    manifest: dict[str, Any],
    results: Optional[dict[str, Any]],
    config: dict[str, Any],
    repo_id: str,
    files: Optional[dict[str, tuple[int, str]]] = None,
) -> str:
    """README.md text. `config` is the artifact's config.json; `files` maps path -> (bytes, sha256)."""
    from huggingface_hub import ModelCard

    quant = _section(manifest, "quantization")
    calib = _section(manifest, "calibration")
    source = _section(manifest, "source")
    fmt = quant_format(manifest, config)
    base = base_model(manifest)
    name = cell(model_name(manifest))
    origin = f"[{base}](https://huggingface.co/{base})" if base else name
    bits = f"{quant['bits']}-bit " if quant.get("bits") else ""
    note = gguf_note(manifest)
    lines = [
        f"# {name} ({bits}{cell(fmt or 'quantized')})", "",
        f"A {bits}{cell(fmt or 'quantized')} quantization of {origin}, made with "
        f"compress {cell(manifest.get('compress_version') or '?')}.", "",
        *([note, ""] if note else []),
        "## Usage", "",
        *_usage(repo_id, fmt),
        "## Quantization", "",
        *_kv_table([
            ("method", quant.get("method")), ("format", fmt), ("bits", quant.get("bits")),
            ("group size", quant.get("group_size")), ("symmetric", quant.get("sym")),
            ("act-order (desc_act)", quant.get("desc_act")), ("not quantized", quant.get("skipped")),
            ("source architecture", source.get("architecture")),
        ]),
        "## Calibration data", "",
        *_kv_table([
            ("dataset", calib.get("dataset")), ("samples", calib.get("nsamples")),
            ("sequence length", calib.get("seqlen")), ("seed", calib.get("seed")),
            ("windows sha256", calib.get("windows_sha256")),
        ]),
        *_evaluation(results),
    ]
    packages = _section(manifest, "packages")
    lines += ["## Reproducibility", ""]
    if manifest.get("created"):
        lines.append(f"Created {cell(manifest['created'])}.")
    if packages:
        lines.append("Packages: " + ", ".join(f"{cell(k)} {cell(v)}" for k, v in sorted(packages.items())) + ".")
    lines.append("The resolved run configuration is in `compress-manifest.json`.")
    lines.append("")
    if files:
        lines += ["## Files", "", "| File | Bytes | sha256 |", "|---|---:|---|"]
        lines += [f"| {cell(p)} | {size} | `{digest}` |" for p, (size, digest) in sorted(files.items())]
        lines.append("")
    return str(ModelCard(f"---\n{front_matter(manifest, config).to_yaml()}\n---\n\n" + "\n".join(lines)))
