"""`wikipedia`: the English Wikipedia excerpt shipped inside gensim's test data, as plain text.

The excerpt (about 200 pages, half of them redirects) is streamed from its bz2 XML at run time;
gensim's `filter_wiki` removes templates, links, refs and tables, and `clean_article` below
turns what is left into readable prose with case and punctuation kept.
"""
from __future__ import annotations

import bz2
import importlib.util
import os
import re
from typing import Iterator

from compress.data.sources import Document, TextSource, register_source

EXCERPT = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_CHARS = 500  # pages shorter than this after cleaning are stubs or disambiguation lists

# Trailing apparatus: lists of citations and links, not prose.
_DROPPED_SECTIONS = {
    "references", "external links", "further reading", "see also", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "works cited",
}
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_EMPHASIS = re.compile(r"'{2,}")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")


def excerpt_path() -> str:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ValueError("the 'wikipedia' source needs gensim: pip install 'compress[data]'")
    path = os.path.join(os.path.dirname(spec.origin), EXCERPT)
    if not os.path.isfile(path):
        raise ValueError(f"the installed gensim has no Wikipedia excerpt at {path}")
    return path


def clean_article(filtered: str) -> str:
    """Plain text from `filter_wiki` output: headings as lines, no emphasis quotes, no tables."""
    out: list[str] = []
    headings: set[int] = set()  # indices in `out` of section titles
    skipping = False
    for raw in filtered.splitlines():
        heading = _HEADING.match(raw)
        if heading:
            title = _EMPHASIS.sub("", heading.group(2)).strip()
            skipping = title.lower() in _DROPPED_SECTIONS
            if not skipping and title:
                if out and out[-1]:
                    out.append("")
                if len(out) - 2 in headings:  # the previous section had no prose
                    headings.discard(len(out) - 2)
                    del out[-2:]
                headings.add(len(out))
                out.extend([title, ""])
            continue
        # Table cells survive filter_wiki as indented fragments; galleries as "File:...|caption".
        if skipping or raw.startswith((" ", "\t", "{", "|", "!")) or raw.startswith("File:"):
            continue
        line = _EMPHASIS.sub("", _LIST_MARK.sub("", raw)).strip()
        if line:
            out.append(line)
        elif out and out[-1]:
            out.append("")
    while out and (not out[-1] or len(out) - 1 in headings):  # trailing empty sections
        headings.discard(len(out) - 1)
        out.pop()
    text = "\n".join(out).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


@register_source("wikipedia")
def read_wikipedia(source: TextSource) -> Iterator[Document]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(excerpt_path(), "rb") as fh:
        # Namespace 0 only: articles, not talk/user/file pages.
        for title, wikitext, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if wikitext.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = clean_article(filter_wiki(wikitext))
            if len(text) >= MIN_CHARS:
                yield Document(key=title, text=text)
