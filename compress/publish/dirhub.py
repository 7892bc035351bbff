"""A model hub in a plain directory: `<repo>/revisions/<revision>/<files>`, `refs.json` and `log.jsonl`.

A revision appears by one rename of a fully written and checked `.partial-*` folder, so a reader never
sees half a revision; a crash leaves at most a dot-folder, which is not a revision.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from compress.publish.errors import PublishError, PublishInputError
from compress.publish.verify import UploadFile, sha256_file

log = logging.getLogger(__name__)

_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REVISIONS = "revisions"
REFS = "refs.json"
LOG = "log.jsonl"


def check_revision(revision: str) -> None:
    if not _REVISION.match(revision):
        raise PublishInputError(
            f"revision '{revision}': a directory hub revision is letters, digits, '.', '_' and '-' "
            "(not starting with '.' or '-')"
        )


def list_revisions(repo: Path) -> list[str]:
    folder = repo / REVISIONS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_files(folder: Path) -> dict[str, tuple[int, str]]:
    """path -> (bytes, sha256) for every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, sha256_file(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_refs(repo: Path) -> dict:
    path = repo / REFS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def _locked(repo: Path) -> Iterator[None]:
    """One publisher per repo at a time (advisory lock on `.lock`)."""
    with (repo / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_file(item: UploadFile, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(item.source, bytes):
        dest.write_bytes(item.source)
    else:
        shutil.copyfile(item.source, dest)


def verify_folder(folder: Path, files: Sequence[UploadFile]) -> None:
    """The folder holds exactly `files`, each with its size and sha256."""
    found = list_files(folder)
    expected = {f.path: (f.size, f.sha256) for f in files}
    for path, (size, digest) in expected.items():
        if path not in found:
            raise PublishError(f"verification failed: '{path}' is missing at {folder}")
        if found[path] != (size, digest):
            raise PublishError(
                f"verification failed: '{path}' at {folder} is {found[path][0]} bytes sha256 {found[path][1]}, "
                f"expected {size} bytes sha256 {digest}"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise PublishError(f"verification failed: unexpected files at {folder}: {', '.join(extra)}")


def publish_to_directory(
    repo: Path, revision: str, files: Sequence[UploadFile], *, message: str, overwrite: bool
) -> tuple[Path, str]:
    """Publish `files` as `revision` of the repo folder `repo`; returns (revision folder, commit id)."""
    check_revision(revision)
    repo.mkdir(parents=True, exist_ok=True)
    revisions = repo / REVISIONS
    revisions.mkdir(exist_ok=True)
    final = revisions / revision
    with _locked(repo):
        if final.exists() and not overwrite:
            raise PublishInputError(f"{repo}: revision '{revision}' already exists; pass --overwrite to replace it")
        tag = uuid.uuid4().hex[:12]
        partial = revisions / f".partial-{revision}-{tag}"
        old = revisions / f".old-{revision}-{tag}"
        try:
            partial.mkdir()
            for item in files:
                _write_file(item, partial / item.path)
            verify_folder(partial, files)  # check what was written before it becomes visible
            if final.exists():
                os.rename(final, old)
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            if old.exists() and not final.exists():
                os.rename(old, final)  # put the previous revision back
            raise
        shutil.rmtree(old, ignore_errors=True)

        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        entry = {"revision": revision, "commit": tag, "message": message, "published": now, "files": len(files)}
        refs = read_refs(repo)
        refs[revision] = {k: entry[k] for k in ("commit", "message", "published", "files")}
        _write_json_atomic(repo / REFS, refs)
        with (repo / LOG).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
    log.info("published %d files to %s", len(files), final)
    return final, tag
