import json
import sys

import pytest

from compress.data import SOURCES, TextSource, iter_documents, resolve_source


def test_builtin_names_resolve():
    for name in ("wikipedia", "shakespeare", "random-tokens"):
        assert resolve_source(name) == TextSource(name)
    assert {"wikipedia", "shakespeare"} <= set(SOURCES)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        resolve_source("wikitext2")
    msg = str(exc.value)
    assert "'wikitext2'" in msg
    for name in ("wikipedia", "shakespeare", "random-tokens", ".jsonl", "hf:"):
        assert name in msg


def test_missing_file_is_clear(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=r"nope\.jsonl' does not exist"):
        resolve_source(str(missing))


def test_txt_documents_are_blank_line_separated(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first line\nstill first\n\n\n  \nsecond\n\nthird\n", encoding="utf-8")
    docs = list(iter_documents(resolve_source(str(path))))
    assert [d.text for d in docs] == ["first line\nstill first", "second", "third"]


def test_jsonl_uses_the_configured_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": "alpha", "text": "x"}, {"body": "beta"}, {"body": "   "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = list(iter_documents(resolve_source(str(path), text_field="body")))
    assert [d.text for d in docs] == ["alpha", "beta"]


def test_jsonl_missing_field_names_the_key(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "alpha"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.jsonl:1: no field 'text' \(calibration\.text_field\)"):
        list(iter_documents(resolve_source(str(path))))


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["one doc", None, "two doc"], "id": [1, 2, 3]}), path)
    docs = list(iter_documents(resolve_source(str(path), text_field="content")))
    assert [d.text for d in docs] == ["one doc", "two doc"]
    with pytest.raises(ValueError, match="no column 'text'.*columns: content, id"):
        list(iter_documents(resolve_source(str(path))))


def test_parquet_without_pyarrow_is_clear(tmp_path, monkeypatch):
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="needs pyarrow"):
        resolve_source(str(path))


def test_hf_without_datasets_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="needs the Hugging Face `datasets` package"):
        resolve_source("hf:wikitext:wikitext-2-raw-v1")
    # a source built directly (bypassing resolve) fails the same way when read
    with pytest.raises(ValueError, match="needs the Hugging Face `datasets` package"):
        list(iter_documents(TextSource("hf", "wikitext", "wikitext-2-raw-v1")))


def test_hf_spec_parses_config():
    pytest.importorskip("datasets")
    assert resolve_source("hf:wikitext:wikitext-2-raw-v1") == TextSource(
        "hf", "wikitext", "wikitext-2-raw-v1"
    )


def test_random_tokens_have_no_documents():
    with pytest.raises(ValueError, match="no documents"):
        list(iter_documents(resolve_source("random-tokens")))
