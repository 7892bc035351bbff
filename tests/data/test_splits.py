import hashlib

import pytest

from compress.data import SPLITS, iter_documents, resolve_source, split_documents, split_of


def _reference_split(key: str, fraction: float) -> str:
    # The rule as calibration/README.md states it, written independently.
    h = hashlib.sha256(b"compress-split-v1\x00" + key.encode("utf-8")).hexdigest()
    return "evaluation" if int(h[:16], 16) < fraction * 2**64 else "calibration"


def test_split_matches_documented_rule():
    keys = [f"doc {i}" for i in range(2000)] + ["Anarchism", "Hamlet #3: ACT I SCENE III"]
    for key in keys:
        assert split_of(key, 0.2) == _reference_split(key, 0.2)
    share = sum(split_of(k, 0.2) == "evaluation" for k in keys) / len(keys)
    assert 0.17 < share < 0.23


@pytest.fixture(scope="module", params=["wikipedia", "shakespeare"])
def builtin(request):
    source = resolve_source(request.param)
    return source, list(iter_documents(source))


def test_builtin_splits_are_disjoint_and_cover(builtin):
    source, docs = builtin
    keys = [d.key for d in docs]
    assert len(set(keys)) == len(keys), "document keys must be unique"
    parts = {s: [d for d in docs if split_of(d.key, source.eval_fraction) == s] for s in SPLITS}
    cal_keys = {d.key for d in parts["calibration"]}
    ev_keys = {d.key for d in parts["evaluation"]}
    assert not cal_keys & ev_keys
    assert cal_keys | ev_keys == set(keys)
    assert not {d.text for d in parts["calibration"]} & {d.text for d in parts["evaluation"]}
    assert 0.1 < len(ev_keys) / len(keys) < 0.3


def test_builtin_text_is_plain(builtin):
    source, docs = builtin
    text = "\n".join(d.text for d in docs)
    markups = ["[[", "]]", "{{", "}}", "**", "<ref", "#REDIRECT", "\\[", "_Enter", "\n###"]
    if source.name == "wikipedia":
        markups.append("''")  # bold/italic quotes; in Shakespeare "''Tis" is genuine text
    for markup in markups:
        assert markup not in text, f"{source.name}: leftover markup {markup!r}"
    assert all(len(d.text) >= 20 for d in docs)


def test_split_documents_filters_in_source_order():
    source = resolve_source("shakespeare")
    docs = list(iter_documents(source))
    for split in SPLITS:
        expected = [d for d in docs if split_of(d.key, source.eval_fraction) == split]
        assert list(split_documents(source, split)) == expected


def test_unknown_split_named():
    with pytest.raises(ValueError, match="unknown split 'train'"):
        list(split_documents(resolve_source("shakespeare"), "train"))
