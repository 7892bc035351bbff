"""publish_artifact: verify an artifact, add its model card, send it to a destination, check what arrived."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.parse import unquote, urlparse

from compress.publish.card import render_card
from compress.publish.config import PublishConfig
from compress.publish.errors import PublishError, PublishInputError
from compress.publish.verify import CARD, UploadFile, in_memory, load_artifact

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Destination:
    kind: str  # "dir" or "hf"
    repo_id: str
    path: Optional[Path] = None  # the repo folder of a directory hub


@dataclass(frozen=True)
class PublishResult:
    destination: str  # where the revision can be found: a folder or a URL
    repo_id: str
    revision: str
    files: tuple[tuple[str, int], ...]  # (path in repo, bytes), sorted
    commit: Optional[str]  # None on a dry run
    dry_run: bool

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def parse_destination(dest: str, repo_id: Optional[str] = None) -> Destination:
    """`file:///root/org/name`, `hf://org/name` or `org/name`; `repo_id` overrides the id a file:// path implies."""
    if dest.startswith("file://"):
        parsed = urlparse(dest)
        if parsed.netloc not in ("", "localhost"):
            raise PublishInputError(f"--to {dest}: file:// destinations must be local (file:///path/org/name)")
        path = Path(unquote(parsed.path))
        if not path.is_absolute() or len(path.parts) < 3:
            raise PublishInputError(f"--to {dest}: expected file:///path/to/hub/<org>/<name>")
        return Destination("dir", repo_id or f"{path.parent.name}/{path.name}", path)
    name = dest[len("hf://"):] if dest.startswith("hf://") else dest
    if "://" in name:
        raise PublishInputError(f"--to {dest}: unknown scheme; use file:///path/org/name, hf://org/name or org/name")
    name = repo_id or name.strip("/")
    if not _REPO_ID.match(name) or ".." in name:
        raise PublishInputError(f"--to {dest}: '{name}' is not a Hub repo id of the form org/name")
    return Destination("hf", name)


def _card(artifact, repo_id: str) -> UploadFile:
    config_path = artifact.root / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        raise PublishInputError(f"{config_path}: cannot read: {err}") from None
    listing = {f.path: (f.size, f.sha256) for f in artifact.files}
    text = render_card(artifact.manifest, artifact.results, config if isinstance(config, dict) else {}, repo_id, listing)
    return in_memory(CARD, text.encode("utf-8"))


def _default_message(manifest: dict) -> str:
    quant = manifest.get("quantization") if isinstance(manifest.get("quantization"), dict) else {}
    parts = [str(quant[k]) for k in ("method", "format") if quant.get(k)]
    bits = f"w{quant['bits']}" if quant.get("bits") else ""
    return " ".join(["Publish", *parts, bits]).strip() + f" (compress {manifest.get('compress_version', '?')})"


def publish_artifact(
    artifact_dir: Union[str, Path],
    dest: str,
    *,
    repo_id: Optional[str] = None,
    revision: str = "main",
    private: bool = False,
    commit_message: Optional[str] = None,
    overwrite: bool = False,
    dry_run: bool = False,
    token: Optional[str] = None,
    card: bool = True,
    retry=None,
) -> PublishResult:
    """Publish one artifact folder. Raises PublishInputError (bad input) or PublishError (upload failed).

    The artifact on disk is not modified: the model card is generated in memory and replaces any README.md.
    `retry` is a hfhub.RetryPolicy for Hub uploads (default: 4 tries, 2 s doubling).
    """
    target = parse_destination(dest, repo_id)
    if not revision or not revision.strip():
        raise PublishInputError("--revision must not be empty")
    artifact = load_artifact(artifact_dir, drop=frozenset({CARD}) if card else frozenset())
    files = list(artifact.files)
    if card:
        files.append(_card(artifact, target.repo_id))
    files.sort(key=lambda f: f.path)
    listing = tuple((f.path, f.size) for f in files)
    message = commit_message or _default_message(artifact.manifest)

    if dry_run:
        where = str(target.path / "revisions" / revision) if target.path else f"{target.repo_id}@{revision}"
        return PublishResult(where, target.repo_id, revision, listing, None, True)
    if target.kind == "dir":
        from compress.publish.dirhub import publish_to_directory

        folder, commit = publish_to_directory(target.path, revision, files, message=message, overwrite=overwrite)
        published = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        if published != dict(listing):  # the rename kept what was checked before it
            raise PublishError(f"verification failed: {folder} does not hold the files that were written")
        return PublishResult(str(folder), target.repo_id, revision, listing, commit, False)

    from compress.publish.hfhub import RetryPolicy, publish_to_hub

    url, commit = publish_to_hub(
        target.repo_id, revision, files, message=message, private=private, overwrite=overwrite,
        token=token, retry=retry or RetryPolicy(),
    )
    return PublishResult(url, target.repo_id, revision, listing, commit, False)


def publish_stage(artifact_dir: Union[str, Path], cfg: PublishConfig) -> PublishResult:
    """The pipeline's publish stage: the run config's `publish:` section applied to one artifact."""
    result = publish_artifact(
        artifact_dir, cfg.to, revision=cfg.revision, private=cfg.private,
        commit_message=cfg.commit_message, overwrite=cfg.overwrite, card=cfg.card,
    )
    log.info("published %d files (%d bytes) to %s", len(result.files), result.total_bytes, result.destination)
    return result
