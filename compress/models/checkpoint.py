"""Read tensors of a Hugging Face checkpoint folder lazily, a few at a time.

Safetensors files are memory-mapped through ``safe_open`` so loading one decoder block reads
only that block's bytes. Pickled ``.bin`` checkpoints are refused unless the user opts in.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint is missing, corrupt or in a form we refuse to load; says what and where."""


@dataclass
class Checkpoint:
    root: Path
    index: dict[str, Path]  # tensor name -> file holding it
    pickled: bool = False
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _info: Optional[dict[str, tuple[tuple[int, ...], str]]] = field(default=None, repr=False)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.index.values()))

    def tensor_info(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and safetensors dtype name ("F32", "I32", ...) of every tensor, read from the
        file headers only; empty for a pickled checkpoint, which has no headers."""
        if self._info is None:
            from safetensors import safe_open

            self._info = {}
            for path in [] if self.pickled else self.files:
                with safe_open(str(path), framework="pt") as f:
                    for n in f.keys():
                        s = f.get_slice(n)
                        self._info[n] = (tuple(s.get_shape()), s.get_dtype())
        return self._info

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.index if n.startswith(prefix)]

    def load(self, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.index:
                raise CheckpointError(f"{self.root}: tensor '{n}' is missing from the checkpoint")
            by_file.setdefault(self.index[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            if self.pickled:
                tensors = self._pickle_cache.get(path)
                if tensors is None:
                    tensors = _load_pickle(path)
                    self._pickle_cache[path] = tensors
                out.update({n: tensors[n].to(device) for n in wanted})
                continue
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    for n in wanted:
                        out[n] = f.get_tensor(n)
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{path}: cannot read tensor data ({e})") from None
        return out


    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` on the CPU, read-only: a view into a mapping
        of the file made for this call and released with the returned tensor, so reading a
        large tensor slice by slice keeps only the slices in hand resident (a mapping keeps
        every page it has touched for as long as it lives)."""
        if name not in self.index:
            raise CheckpointError(f"{self.root}: tensor '{name}' is missing from the checkpoint")
        if self.pickled:
            return self.load([name])[name][start:stop].clone()
        from safetensors import safe_open

        path = self.index[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_slice(name)[start:stop]
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor data ({e})") from None


def read_config_json(root: Path) -> dict:
    """`config.json` of a model folder as a dict; anything else is a CheckpointError naming it."""
    path = Path(root) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{root}: no config.json; not a Hugging Face model folder")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object of settings, not a {type(data).__name__}")
    return data


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """`isfinite(t).all()` in slices, so a large embedding needs no full-size bool copy."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[s : s + chunk]).all()) for s in range(0, flat.numel(), chunk))


def _misfit(shape: tuple[int, ...], is_float: bool, dtype: object, like: torch.Tensor) -> Optional[str]:
    if tuple(shape) != tuple(like.shape):
        return f"has shape {list(shape)} where the model's config.json implies {list(like.shape)}"
    if like.is_floating_point() and not is_float:
        return f"is {dtype} where a floating-point tensor is expected"
    return None


def check_header(ckpt: Checkpoint, name: str, like: torch.Tensor) -> None:
    """Tensor `name` as the safetensors header describes it against the model's own tensor
    `like` (a meta tensor of the skeleton): shape and float-ness, before any data is read."""
    info = ckpt.tensor_info().get(name)
    if info is None:
        return
    shape, dtype = info
    problem = _misfit(shape, dtype.startswith(("F", "BF")), dtype, like)
    if problem:
        raise CheckpointError(f"{ckpt.index[name]}: tensor '{name}' {problem}")


def check_loaded(ckpt: Checkpoint, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """A loaded tensor against the model's tensor `like`: shape, float-ness and finite values
    (a NaN or Inf weight would otherwise flow through every later statistic unnoticed)."""
    problem = _misfit(tuple(t.shape), t.is_floating_point(), t.dtype, like)
    if problem is None and t.is_floating_point() and not all_finite(t):
        problem = "holds NaN or Inf values"
    if problem:
        raise CheckpointError(f"{ckpt.index.get(name, ckpt.root)}: tensor '{name}' {problem}")


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, tensors only (`weights_only`): anything else is bad input."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for corrupt files
        raise CheckpointError(f"{path}: cannot load as a tensors-only pickle ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a safetensors header, validating that the file is complete."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def open_checkpoint(root: str | Path, allow_pickle: bool = False) -> Checkpoint:
    root = Path(root)
    read_config_json(root)
    st_index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if st_index.is_file():
        try:
            weight_map = json.loads(st_index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{st_index}: malformed shard index ({e})") from None
        index: dict[str, Path] = {}
        for fname in sorted(set(weight_map.values())):
            path = root / fname
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {st_index.name} is missing")
            names = set(_safetensors_names(path))
            for n, f in weight_map.items():
                if f == fname and n not in names:
                    raise CheckpointError(f"{path}: tensor '{n}' listed in the index is missing")
            index.update({n: path for n in names})
        return Checkpoint(root, index)
    if single.is_file():
        return Checkpoint(root, {n: single for n in _safetensors_names(single)})
    others = sorted(p.name for p in root.glob("*.safetensors"))
    if others:
        index = {}
        for name in others:
            index.update({n: root / name for n in _safetensors_names(root / name)})
        return Checkpoint(root, index)
    bins = sorted(root.glob("pytorch_model*.bin"))
    if bins:
        if not allow_pickle:
            raise CheckpointError(
                f"{root}: only pickled .bin weights found ({bins[0].name}); pickles can run code "
                "when loaded, so set model.allow_pickle: true only if you trust this checkpoint"
            )
        index = {}
        for b in bins:
            tensors = _load_pickle(b)
            index.update({n: b for n in tensors})
        return Checkpoint(root, index, pickled=True)
    raise CheckpointError(f"{root}: no weight files (*.safetensors or pytorch_model*.bin)")
