"""publish_artifact: verify an artifact, add its model card, send it to a destination, check what arrived."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.parse import unquote, urlsplit

from compress.evaluate.sanity import flagged_message
from compress.publish.card import render_card
from compress.publish.config import PublishConfig
from compress.publish.errors import PublishError, PublishInputError
from compress.publish.verify import CARD, UploadFile, in_memory, load_artifact

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


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


def check_repo_id(repo_id: str, given: str) -> str:
    """`org/name`, each part letters, digits, '.', '_', '-' starting with a letter or digit, no '..'.

    Checked on the raw text, before any URL decoding or path join, so '%2F..' or '..' cannot reach a path.
    """
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise PublishInputError(
            f"--to {given!r}: {repo_id!r} is not a repo id of the form org/name "
            "(letters, digits, '.', '_', '-'; no empty, '.' or '..' part)"
        )
    return repo_id


def parse_destination(dest: str, repo_id: Optional[str] = None) -> Destination:
    """`file:///root/org/name`, `hf://org/name` or `org/name`; `repo_id` overrides the id a file:// path implies."""
    if repo_id is not None:
        check_repo_id(repo_id, dest)
    if dest.startswith("file://"):
        parsed = urlsplit(dest)
        if parsed.netloc not in ("", "localhost"):
            raise PublishInputError(f"--to {dest!r}: file:// destinations must be local (file:///path/org/name)")
        if parsed.query or parsed.fragment or "?" in dest or "#" in dest:
            raise PublishInputError(f"--to {dest!r}: a file:// destination takes no '?' or '#' part")
        head, _, tail = parsed.path.rpartition("/")
        head, _, org = head.rpartition("/")
        implied = check_repo_id(f"{org}/{tail}", dest)  # the raw text: '%2F' and '..' fail here
        folder = unquote(head)  # only the hub folder above org/name is decoded
        if "\x00" in folder or any(part in (".", "..") for part in folder.split("/")):
            raise PublishInputError(f"--to {dest!r}: expected file:///path/to/hub/<org>/<name> with no '.' or '..' folder")
        return Destination("dir", repo_id or implied, Path(folder or "/") / org / tail)
    name = dest[len("hf://"):] if dest.startswith("hf://") else dest
    if "://" in name:
        raise PublishInputError(f"--to {dest!r}: unknown scheme; use file:///path/org/name, hf://org/name or org/name")
    return Destination("hf", repo_id or check_repo_id(name, dest))


def _card(artifact, files: list[UploadFile], repo_id: str) -> UploadFile:
    listing = {f.path: (f.size, f.sha256) for f in files}
    return in_memory(CARD, render_card(artifact.manifest, artifact.results, artifact.config, repo_id, listing).encode())


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
    force: bool = False,
) -> PublishResult:
    """Publish one artifact folder. Raises PublishInputError (bad input) or PublishError (upload failed).
    An artifact whose run flagged the original's perplexity as absurd (compress/evaluate/sanity.py)
    is refused unless `force`; its card then carries the warning.

    The artifact on disk is not modified: the model card is generated in memory and replaces any README.md.
    `retry` is a hfhub.RetryPolicy for Hub uploads (default: 4 tries, 2 s doubling).
    """
    target = parse_destination(dest, repo_id)
    if not revision or not revision.strip():
        raise PublishInputError("--revision must not be empty")
    artifact = load_artifact(artifact_dir, card=card)
    warning = flagged_message((artifact.results or {}).get("sanity"))
    if warning and not force:
        raise PublishInputError(
            f"{artifact_dir}: not published: {warning}. Fix the run, or publish anyway with --force "
            "(publish.force: true); the card then carries the warning"
        )
    files = [f for f in artifact.files if not (card and f.path == CARD)]  # the generated card replaces one listed
    if card:
        files.append(_card(artifact, files, target.repo_id))
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
        commit_message=cfg.commit_message, overwrite=cfg.overwrite, card=cfg.card, force=cfg.force,
    )
    log.info("published %d files (%d bytes) to %s", len(result.files), result.total_bytes, result.destination)
    return result
