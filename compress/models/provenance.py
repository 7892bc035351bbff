"""What a source model says about itself, for the manifest's "source" section and the model card.

Read from the loaded folder: a GGUF conversion's `compress-source.txt` names the GGUF file, whose
`general.*` metadata is read (compress/models/gguf.py); otherwise `config.json` and the front matter
of the folder's README.md. Nothing is guessed: a field the source does not declare stays None.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

import yaml

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
CONVERTED_FROM = "compress-source.txt"  # written by compress/models/gguf.py: the GGUF path on line 1


def is_hub_id(value: Any) -> bool:
    return isinstance(value, str) and HUB_ID.fullmatch(value) is not None and ".." not in value


def _text(value: Any) -> Optional[str]:
    return value.strip() if isinstance(value, str) and value.strip() else None


def languages(value: Any) -> Optional[list[str]]:
    """A model card's `language`: one code or a list of them; None when there is none."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    found = [v.strip() for v in items if isinstance(v, str) and v.strip()]
    return found or None


def readme_metadata(folder: Path) -> dict[str, Any]:
    """The YAML front matter of `folder/README.md` (the Hub's model card metadata), or {}."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.read_text(encoding="utf-8", errors="replace"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _gguf(folder: Path) -> Optional[dict[str, Any]]:
    marker = folder / CONVERTED_FROM
    if not marker.is_file():
        return None
    path = Path(marker.read_text(encoding="utf-8").splitlines()[0])
    if not path.is_file():
        log.warning("%s names %s, which is gone; its GGUF metadata is not recorded", marker, path)
        return {"file": path.name}
    from compress.models.gguf import gguf_metadata

    return gguf_metadata(path)


def describe_source(folder: Path) -> dict[str, Any]:
    """name, hub_id, license, language and (for a GGUF source) gguf, as the source declares them.

    `hub_id` is the Hub repo the weights are from: a GGUF's source repo, else a Hub-shaped
    `_name_or_path` in config.json (the id transformers saved the config from).
    """
    gguf = _gguf(folder) or {}
    config = _config(folder)
    readme = readme_metadata(folder)
    name_or_path = config.get("_name_or_path")
    hub_id = gguf.get("source_repo") or (
        name_or_path if is_hub_id(name_or_path) and not Path(name_or_path).exists() else None
    )
    return {
        "name": _text(gguf.get("name")) or _text(config.get("_model_name_or_path")) or hub_id,
        "hub_id": hub_id,
        "license": _text(readme.get("license")) or _text(gguf.get("license")),
        "language": languages(readme.get("language")) or gguf.get("languages"),
        "gguf": gguf or None,
    }
