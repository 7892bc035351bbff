"""`compress inspect`: what a checkpoint or artifact folder holds, read from headers only."""
from __future__ import annotations

import json
from pathlib import Path

from compress.models.checkpoint import CheckpointError, open_checkpoint, read_config_json


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def describe(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if path.is_file():
        raise CheckpointError(f"{path}: inspect takes a model folder (convert GGUF files with `compress run`)")
    config = read_config_json(path)
    q = config.get("quantization_config") or {}
    if not isinstance(q, dict):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config must be a JSON object")
    fmt = None
    if q:
        from compress.formats.registry import format_of_artifact

        try:
            fmt = format_of_artifact(q)
        except ValueError as e:
            raise CheckpointError(f"{path / 'config.json'}: quantization_config: {e}") from None
    summary = fmt.tensor_summary(path) if fmt is not None else None
    if summary is not None:  # a format whose file is not safetensors (GGUF)
        params, files = summary
        shapes = {}
    else:
        ckpt = open_checkpoint(path)
        if ckpt.pickled:
            raise CheckpointError(f"{path}: pickled checkpoints are not inspected")
        shapes = ckpt.tensor_info()
        params = 0
        plain = {n: s for n, (s, _) in shapes.items()}
        for name, (shape, _) in shapes.items():
            try:
                behind = fmt.weights_behind(name, plain, lambda k: ckpt.load([k])[k]) if fmt else None
            except KeyError as e:  # a packed weight without its companion tensor
                raise CheckpointError(f"{ckpt.index[name]}: '{name}' has no {e} beside it") from None
            params += _numel(shape) if behind is None else behind
        files = ckpt.files
    size = sum(p.stat().st_size for p in files)
    lines = [
        f"path:          {path}",
        f"architecture:  {', '.join(config.get('architectures') or ['?'])} (model_type {config.get('model_type')})",
        f"parameters:    {params:,} ({params / 1e6:.1f} M)",
        f"weight bytes:  {size:,} ({size / 1e6:.1f} MB in {len(files)} file(s))",
        f"bits/weight:   {8 * size / max(params, 1):.2f} (whole file, incl. scales and unquantized tensors)",
    ]
    if fmt is not None:
        first, *rest = fmt.describe(q)
        lines.append("quantization:  " + first)
        lines += [" " * 15 + line for line in rest]
    else:
        dtypes = sorted({d for _, d in shapes.values()})
        lines.append(f"quantization:  none (tensor dtypes {', '.join(dtypes)})")
    manifest = path / "compress-manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_bytes().decode("utf-8"))
        except ValueError as e:  # bad JSON or not UTF-8
            raise CheckpointError(f"{manifest}: not a valid JSON manifest ({e})") from None
        if not isinstance(m, dict):
            raise CheckpointError(f"{manifest}: must hold a JSON object")
        lines.append(f"made by:       compress {m.get('compress_version')} on {m.get('created')}")
    return "\n".join(lines)
