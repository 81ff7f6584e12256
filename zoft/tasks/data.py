"""Reading examples: local JSONL / JSON / CSV / TSV files, Hugging Face datasets, and the
sentiment set that ships with zoft.

Every reader returns ``Examples``: a plain ``list`` of dicts that also remembers where each
record came from, so that a task can say "train.csv line 17: missing field 'label'". Any
problem with the input is one ``UsageError`` line naming the file, the line and the fix.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
from importlib import resources
from typing import Iterable, Literal, Sequence

from zoft.errors import UsageError

SPEC_HELP = ("a .jsonl, .json, .csv or .tsv file, a `datasets` save_to_disk folder (one split), "
             "or hf:NAME[:CONFIG]:SPLIT")


class Examples(list):
    """A list of example dicts plus, for each, its location in ``source``.

    lines: 1-based line (files) or row (datasets) of each record, same length as the list.
    unit:  "line" for text files, "row" for Hugging Face datasets.
    """

    def __init__(self, records: Iterable[dict], source: str, lines: Sequence[int], unit: str = "line"):
        super().__init__(records)
        self.source = source
        self.lines = list(lines)
        self.unit = unit

    def where(self, i: int) -> str:
        return f"{self.source} {self.unit} {self.lines[i]}"


def where(examples: Sequence[dict], i: int) -> str:
    """Location of ``examples[i]`` for an error message ("a.csv line 3", or "example 4")."""
    if isinstance(examples, Examples):
        return examples.where(i)
    return f"example {i + 1}"


def check_fields(examples: Sequence[dict], fields: Sequence[str]) -> None:
    """``UsageError`` at the first example that lacks one of ``fields`` (or holds null there)."""
    for i, ex in enumerate(examples):
        for f in fields:
            if ex.get(f) is None:
                have = ", ".join(repr(k) for k in ex) or "none"
                need = ", ".join(repr(k) for k in fields)
                raise UsageError(f"{where(examples, i)}: missing field {f!r} (fields there: {have}); "
                                 f"every example needs {need}")


def load_examples(spec: str | os.PathLike, required: Sequence[str] = ()) -> Examples:
    """Read all examples named by ``spec`` (``SPEC_HELP``); refuse an empty set.

    ``required``: field names every example must have (checked here with the first offending
    line named; tasks check the values with ``Task.validate``).
    """
    spec = os.fspath(spec)
    if spec.startswith("hf:"):
        examples = _load_hf(spec)
    elif os.path.isdir(spec):
        examples = _load_disk(spec)
    else:
        examples = _load_file(spec)
    if not examples:
        raise UsageError(f"{examples.source}: no examples found; give at least one record")
    check_fields(examples, required)
    return examples


def builtin_sentiment(split: Literal["train", "eval"]) -> Examples:
    """zoft's own sentiment set (``{"sentence": str, "label": 0|1}``, 1 = positive): short
    original movie and product reviews, balanced, 400 for training and 200 held out."""
    if split not in ("train", "eval"):
        raise UsageError(f"builtin sentiment split must be 'train' or 'eval', not {split!r}")
    name = f"sentiment_{split}.jsonl"
    text = resources.files("zoft.tasks").joinpath("data", name).read_text(encoding="utf-8")
    return _parse_jsonl(text, f"zoft/tasks/data/{name}")


# ---------------------------------------------------------------------------------------------
# Local files


def _load_file(path: str) -> Examples:
    ext = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv,
               ".tsv": functools.partial(_parse_csv, delimiter="\t")}
    if ext not in readers:
        raise UsageError(f"{path}: unknown data file type {ext or '(no extension)'!r}; use {SPEC_HELP}")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "not found"
        raise UsageError(f"data file {path} {what}; give {SPEC_HELP}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"cannot read data file {path}: {e.strerror}") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Excel writes one)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} line {_line_of(raw, e.start)}: not UTF-8 text; "
                         "save the file as UTF-8") from None
    return readers[ext](text, path)


def _line_of(text: str | bytes, offset: int) -> int:
    newline = b"\n" if isinstance(text, bytes) else "\n"
    return text.count(newline, 0, offset) + 1


def _parse_jsonl(text: str, source: str) -> Examples:
    """One JSON object per line; blank lines are skipped."""
    records, lines = [], []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{source} line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                             'each line must be one JSON object, e.g. {"text": "..."}') from None
        if not isinstance(obj, dict):
            raise UsageError(f"{source} line {n}: expected a JSON object, found {type(obj).__name__}; "
                             'each line must be one JSON object, e.g. {"text": "..."}')
        records.append(obj)
        lines.append(n)
    return Examples(records, source, lines)


def _parse_json(text: str, source: str) -> Examples:
    """A JSON array of objects; each record's line is where its object starts."""
    dec = json.JSONDecoder()
    fix = 'the file must hold one JSON array of objects, e.g. [{"text": "..."}]'

    def fail(pos: int, what: str):
        raise UsageError(f"{source} line {_line_of(text, pos)}: {what}; {fix}") from None

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip_ws(0)
    if i == len(text):
        return Examples([], source, [])
    if text[i] != "[":
        try:
            _, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            fail(e.pos, f"not valid JSON ({e.msg})")
        if text[i] == "{" and skip_ws(end) < len(text):
            fail(skip_ws(end), "a second JSON value follows the first (JSON Lines? then name the file .jsonl)")
        fail(i, "the top level is not an array")
    records, lines = [], []
    i = skip_ws(i + 1)
    if i < len(text) and text[i] == "]":
        i += 1
    else:
        while True:
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                fail(e.pos, f"not valid JSON ({e.msg})")
            if not isinstance(obj, dict):
                fail(i, f"array item {len(records) + 1} is a {type(obj).__name__}, not an object")
            records.append(obj)
            lines.append(_line_of(text, i))
            i = skip_ws(end)
            if i < len(text) and text[i] == ",":
                i = skip_ws(i + 1)
            elif i < len(text) and text[i] == "]":
                i += 1
                break
            else:
                fail(i, "expected ',' or ']' after an array item")
    if skip_ws(i) < len(text):
        fail(skip_ws(i), "unexpected text after the closing ']'")
    return Examples(records, source, lines)


def _parse_csv(text: str, source: str, delimiter: str = ",") -> Examples:
    """A header row naming the fields, then one record per row (quoted fields may span lines)."""
    kind = "TSV (tab-separated)" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records, lines = [], []
    header: list[str] | None = None
    prev_end = 0
    try:
        for row in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in row]
                if len(set(header)) != len(header) or "" in header:
                    raise UsageError(f"{source} line {start}: the header row needs distinct, non-empty "
                                     f"column names, got {header}")
                continue
            if len(row) != len(header):
                raise UsageError(f"{source} line {start}: {len(row)} fields but the header has "
                                 f"{len(header)}; quote fields that contain {delimiter!r} "
                                 f"(the file is read as {kind})")
            records.append(dict(zip(header, row)))
            lines.append(start)
    except csv.Error as e:
        raise UsageError(f"{source} line {reader.line_num}: malformed {kind} ({e}); "
                         'check the quoting (a quote inside a quoted field is written "")') from None
    return Examples(records, source, lines)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{what} needs the Hugging Face `datasets` package: pip install datasets "
                         "(or pass a local .jsonl/.csv file)") from None
    return datasets


def _load_disk(path: str) -> Examples:
    """A folder written by ``Dataset.save_to_disk`` (offline). A ``DatasetDict`` folder holds one
    such folder per split: name the split's folder."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise UsageError(f"{path} holds several splits ({', '.join(splits)}); give one of them, e.g. "
                         f"{os.path.join(path, splits[0] if splits else 'train')}")
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise UsageError(f"{path} is a directory but not a `datasets` save_to_disk folder; give {SPEC_HELP}")
    datasets = _import_datasets(path)
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # a damaged or foreign folder
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"cannot load {path}: {type(e).__name__}: {msg}") from None
    records = [dict(r) for r in ds]
    return Examples(records, path, range(1, len(records) + 1), unit="row")


def _load_hf(spec: str) -> Examples:
    body, bracket, slicing = spec[3:].partition("[")  # a split may slice: train[:10%]
    parts = body.split(":")
    parts[-1] += bracket + slicing
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"bad dataset spec {spec!r}; write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT "
                         "(e.g. hf:stanfordnlp/sst2:train)")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    datasets = _import_datasets(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name/config/split: all surface here
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"cannot load {spec}: {type(e).__name__}: {msg} (check the name, config "
                         "and split, and the network; or pass a local .jsonl/.csv file)") from None
    records = [dict(r) for r in ds]
    return Examples(records, spec, range(1, len(records) + 1), unit="row")
