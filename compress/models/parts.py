"""A file shipped in numbered chunks, `NAME.part00`, `NAME.part01`, ... (PyPI caps a wheel's
size, so large GGUF files are split across packages `PKG_part1`, `PKG_part2`, ...).

`package:PKG/NAME` where PKG holds no NAME resolves to those chunks, searched in PKG and in
its sibling packages `PKG_part*`, and concatenated once into the cache (checked against a
`SHA256SUMS` file the packages ship, where one names the file).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from compress.hashing import sha256_file
from compress.models.checkpoint import CheckpointError
from compress.owner import OWNER, make_partial, sweep_dead

log = logging.getLogger(__name__)


def find_parts(pkg_dir: Path, name: str) -> list[Path]:
    """The chunks of `name` in order, [] when there are none; a gap in the numbering is an error."""
    roots = [pkg_dir] + sorted({p for d in sys.path if d and os.path.isdir(d) for p in Path(d).glob(f"{pkg_dir.name}_part*")})
    pattern = re.compile(re.escape(name) + r"\.part(\d+)")
    numbered = {}
    for root in roots:
        for p in root.rglob(f"{name}.part*"):
            m = pattern.fullmatch(p.name)
            if m and p.is_file():
                numbered.setdefault(int(m.group(1)), p)
    if not numbered:
        return []
    first = min(numbered)
    missing = [i for i in range(first, max(numbered) + 1) if i not in numbered]
    if missing or first > 1:
        raise CheckpointError(
            f"model.source: {name} is split in parts but part {(missing or [0])[0]} is not installed "
            f"(found {', '.join(p.name for _, p in sorted(numbered.items()))})"
        )
    return [numbered[i] for i in sorted(numbered)]


def _expected_sha256(pkg_dir: Path, name: str) -> Optional[str]:
    for sums in pkg_dir.rglob("SHA256SUMS"):
        for line in sums.read_text(errors="replace").splitlines():
            digest, _, file = line.strip().partition("  ")
            if file.strip().lstrip("*") == name:
                return digest.lower()
    return None


def assemble(pkg_dir: Path, name: str, parts: list[Path], cache_dir: Path) -> Path:
    """`cache_dir/parts/name`, the parts concatenated (once: an existing file of the parts'
    total size is reused); written in a `.partial-` folder and renamed into place."""
    total = sum(p.stat().st_size for p in parts)
    target = cache_dir / "parts" / name
    if target.is_file() and target.stat().st_size == total:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead(target.parent)
    tmp = make_partial(target.parent, f".{name}.partial-")
    try:
        log.info("assembling %s from %d parts into %s (once)", name, len(parts), target)
        with open(tmp / name, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        want = _expected_sha256(pkg_dir, name)
        if want and sha256_file(tmp / name) != want:
            raise CheckpointError(f"model.source: {name} assembled from {len(parts)} parts does not match its SHA256SUMS")
        os.replace(tmp / name, target)
    finally:
        (tmp / OWNER).unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return target
