"""Which runtime runs an artifact, keyed by the artifact's kind, and the decoder it gives.

`kind_of(path)` reads what a folder holds: the `quant_method` of its `config.json` names one of
compress's formats (`gptq`, `compressed-tensors`, `awq`, `gguf`), a folder without one is a
plain float model (`dense`), and a folder with an ONNX model is `onnx`. `open_decoder(path,
device)` opens it with the runtime registered for that kind. Speed measurement
(`compress.evaluate.speed`) and `compress generate` only talk to the `Decoder` it returns, so a
new runtime is one `@register_runtime(KIND)` function that returns one (torch: `torch_runtime`;
ONNX Runtime: `onnx_runtime`, when the onnx extra is installed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

import torch

from compress.models.checkpoint import CheckpointError


class Decoder(Protocol):
    """A causal LM with a KV cache, one sequence at a time."""

    label: str  # the runtime and kernels behind its speed figures, e.g. "torch int4pack bf16 x210"
    vocab_size: int

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence with prompt `ids` [1, T]; the last position's logits [vocab] (float32)."""

    def step(self, token: int) -> torch.Tensor:
        """Append `token`; the logits [vocab] (float32) of the token that follows it."""


Opener = Callable[[Path, str, torch.device], Decoder]  # (folder, kind, device) -> decoder
RUNTIMES: dict[str, Opener] = {}


def register_runtime(*kinds: str) -> Callable[[Opener], Opener]:
    def deco(fn: Opener) -> Opener:
        for k in kinds:
            RUNTIMES[k] = fn
        return fn

    return deco


def kind_of(path: Path) -> str:
    """The artifact kind of folder `path` (a key of `RUNTIMES`); CheckpointError (bad input,
    exit 2) when it is no model folder compress reads."""
    from compress.formats.registry import format_of_artifact

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model folder (give the folder a compress run wrote)")
    if any(path.glob("*.onnx")) or (path / "genai_config.json").exists():
        return "onnx"
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json; not a model folder compress wrote or reads")
    try:
        qcfg = json.loads(cfg.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{cfg}: not a JSON object ({e})") from None
    if not qcfg:
        return "dense"
    try:
        return format_of_artifact(qcfg).name
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def open_decoder(path: Path, device: torch.device) -> Decoder:
    kind = kind_of(path)
    _load_builtins()
    try:
        opener = RUNTIMES[kind]
    except KeyError:
        raise CheckpointError(f"{path}: a {kind} artifact, and no runtime for {kind} is installed "
                              f"(runtimes: {', '.join(sorted(RUNTIMES))})") from None
    return opener(Path(path), kind, device)


def _load_builtins() -> None:
    from compress.runtime import torch_runtime  # noqa: F401  (registers itself)

    try:
        from compress.runtime import onnx_runtime  # noqa: F401  (needs the onnx extra)
    except ImportError:
        pass
