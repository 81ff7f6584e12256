"""Reading examples: every file format, every malformed-input message, HF datasets offline,
and the shipped sentiment set."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from zoft.errors import UsageError
from zoft.tasks.data import Examples, builtin_sentiment, check_fields, load_examples

FIX = Path(__file__).parent / "fixtures" / "data"


def usage_error(spec: str, **kw) -> str:
    """The message of the UsageError that ``load_examples(spec)`` raises (one line)."""
    with pytest.raises(UsageError) as e:
        load_examples(spec, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- formats that parse --------------------------------------------------------------------

def test_jsonl_skips_blank_lines_and_keeps_line_numbers():
    ex = load_examples(str(FIX / "texts.jsonl"), required=["text"])
    assert ex == [{"text": "the movie was great"}, {"text": "an awful waste of time", "id": 7}]
    assert ex.lines == [1, 3]
    assert ex.where(1) == f"{FIX / 'texts.jsonl'} line 3"


def test_csv_quoting_and_multiline_fields():
    ex = load_examples(str(FIX / "sst2.csv"))
    assert [e["sentence"] for e in ex] == ["A fine film, with a lovely cast.", "an awful waste of time",
                                          'a "quoted" word\nover two lines']
    assert [e["label"] for e in ex] == ["1", "0", "1"]  # CSV values are text; tasks map labels
    assert ex.lines == [2, 3, 4]


def test_tsv_and_json_match_csv():
    tsv = load_examples(str(FIX / "sst2.tsv"))
    js = load_examples(str(FIX / "sst2.json"))
    assert [e["sentence"] for e in tsv] == [e["sentence"] for e in js] == ["the movie was great",
                                                                          "an awful waste of time"]
    assert js.lines == [2, 3]  # where each object starts
    assert tsv.lines == [2, 3]


def test_csv_with_bom_and_crlf(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes(b"\xef\xbb\xbftext,label\r\nhello,1\r\nworld,0\r\n")
    ex = load_examples(str(p), required=["text", "label"])
    assert ex == [{"text": "hello", "label": "1"}, {"text": "world", "label": "0"}]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + '{"text": "c"}\n',
                 encoding="utf-8")
    ex = load_examples(str(p))
    assert ex == [{"text": "a\u2028b"}, {"text": "c"}] and ex.lines == [1, 2]


# --- malformed input: one line naming file, line and fix -----------------------------------

def test_jsonl_bad_line_is_named():
    msg = usage_error(str(FIX / "bad_json_line.jsonl"))
    assert "bad_json_line.jsonl line 3" in msg and "JSON object" in msg


def test_jsonl_non_object_line(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text('{"text": "a"}\n["not", "an", "object"]\n')
    assert f"{p} line 2: expected a JSON object, found list" in usage_error(str(p))


def test_csv_ragged_row_is_named():
    msg = usage_error(str(FIX / "ragged.csv"))
    assert "ragged.csv line 3" in msg and "3 fields but the header has 2" in msg


def test_csv_unterminated_quote(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('text,label\nfine,1\n"oops,0\n')
    assert "q.csv line" in usage_error(str(p))


@pytest.mark.parametrize("name,content,expected", [
    ("top.json", '"text"', "top.json line 1: the top level is not an array"),
    ("lines.json", '{"text": "a"}\n{"text": "b"}\n', "lines.json line 2: a second JSON value follows"),
    ("item.json", '[\n {"text": "a"},\n "b"\n]', "item.json line 3: array item 2 is a str"),
    ("trunc.json", '[\n {"text": "a"},\n {"text": ', "trunc.json line 3: not valid JSON"),
    ("comma.json", '[{"text": "a"} {"text": "b"}]', "comma.json line 1: expected ',' or ']'"),
    ("tail.json", '[{"text": "a"}]\n]', "tail.json line 2: unexpected text after"),
])
def test_json_errors(tmp_path, name, content, expected):
    p = tmp_path / name
    p.write_text(content)
    assert expected in usage_error(str(p))


def test_empty_dataset_is_an_error(tmp_path):
    assert "no examples" in usage_error(str(FIX / "empty.jsonl"))
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    assert "no examples" in usage_error(str(header_only))
    blank = tmp_path / "b.json"
    blank.write_text("[ ]")
    assert "no examples" in usage_error(str(blank))


def test_missing_required_field_names_first_offending_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"text": "a"}\n\n{"txt": "b"}\n{"other": 1}\n')
    msg = usage_error(str(p), required=["text"])
    assert f"{p} line 3: missing field 'text'" in msg and "'txt'" in msg


def test_missing_file_unknown_extension_not_utf8(tmp_path):
    assert "not found" in usage_error(str(tmp_path / "nope.jsonl"))
    assert "unknown data file type '.parquet'" in usage_error(str(tmp_path / "d.parquet"))
    (tmp_path / "dir.jsonl").mkdir()
    assert "is a directory" in usage_error(str(tmp_path / "dir.jsonl"))
    p = tmp_path / "latin1.csv"
    p.write_bytes(b"text,label\nok,1\ncaf\xe9,0\n")
    assert f"{p} line 3: not UTF-8" in usage_error(str(p))


def test_check_fields_on_plain_lists():
    with pytest.raises(UsageError, match="example 2: field 'label' is null; every example needs 'label'"):
        check_fields([{"label": 1}, {"label": None}], ["label"])
    with pytest.raises(UsageError, match="example 2: missing field 'label'"):
        check_fields([{"label": 1}, {"text": "x"}], ["label"])


# --- Hugging Face datasets ----------------------------------------------------------------

def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    assert "pip install datasets" in usage_error("hf:stanfordnlp/sst2:train")


@pytest.mark.parametrize("spec", ["hf:sst2", "hf:a:b:c:d", "hf::train", "hf:"])
def test_hf_bad_spec(spec):
    assert "hf:NAME:SPLIT" in usage_error(spec)


def test_hf_through_a_stand_in_datasets_module(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "offline/thing":
            raise ConnectionError("Couldn't reach the Hub\nmore detail")
        return [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ex = load_examples("hf:glue:sst2:validation", required=["sentence", "label"])
    assert calls[-1] == ("glue", "sst2", "validation")
    assert isinstance(ex, Examples) and ex.where(1) == "hf:glue:sst2:validation row 2"
    load_examples("hf:stanfordnlp/sst2:train[:10]")
    assert calls[-1] == ("stanfordnlp/sst2", None, "train[:10]")
    msg = usage_error("hf:offline/thing:train")
    assert "ConnectionError: Couldn't reach the Hub" in msg and "more detail" not in msg


# --- the shipped sentiment set ----------------------------------------------------------------

def test_builtin_sentiment_is_balanced_and_disjoint():
    train, held_out = builtin_sentiment("train"), builtin_sentiment("eval")
    assert len(train) == 400 and len(held_out) == 200
    for split in (train, held_out):
        assert all(set(e) == {"sentence", "label"} and e["label"] in (0, 1) for e in split)
        assert 2 * sum(e["label"] for e in split) == len(split)
    sentences = [e["sentence"].lower() for e in train + held_out]
    assert len(set(sentences)) == len(sentences)
    with pytest.raises(UsageError):
        builtin_sentiment("test")
