"""Data files and hub sources (issue items 4-9): every problem is one line naming the file and
line (or the config key), found before anything expensive starts; through the command line it
is `error: ...` with exit code 2.

Files are written here row by row, and the test keeps its own count of the physical line each
row starts on; that count is what the errors must name."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from evo_sft.config import DataConfig
from evo_sft.data import tokenize_split
from evo_sft.data.demo import build_tokenizer, write_demo_model
from evo_sft.data.sources import DataError, load_splits
from tests.helpers.paths import REPO



def _load(source, **data) -> tuple:
    return load_splits(DataConfig(source=str(source), **data), seed=0)


def _tokenize_both(splits, tokenizer=None):
    tokenizer = tokenizer or build_tokenizer()
    for name, split in zip(("train", "test"), splits):
        tokenize_split(split, tokenizer, name, "prompt", "response", max_length=None)


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"reverse: w{i}", "response": f"{i}w"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict], blank_every: int = 0) -> list[int]:
    """Rows as JSON lines, a blank line after every `blank_every` rows; the line of each row."""
    lines, numbers = [], []
    for i, row in enumerate(rows):
        lines.append(json.dumps(row, ensure_ascii=False))
        numbers.append(len(lines))
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return numbers


def _write_delimited(path: Path, rows: list[dict], delimiter: str) -> list[int]:
    """A header, then the rows; the line each row starts on (a field with newlines spans lines)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        writer.writerow(["prompt", "response"])
        line, numbers = 2, []
        for row in rows:
            writer.writerow([row["prompt"], row["response"]])
            numbers.append(line)
            line += 1 + row["prompt"].count("\n") + row["response"].count("\n")
    return numbers


def _all_rows(splits) -> list[dict]:
    return sorted(({"prompt": r["prompt"], "response": r["response"]} for split in splits for r in split),
                  key=lambda r: r["prompt"])


# ----------------------------------------------------------------------- file types (item 5)
@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_and_tsv_load_with_quotes_delimiters_and_newlines_in_fields(tmp_path, suffix):
    rows = _rows(20)
    rows[3] = {"prompt": 'say "hi", then\nstop', "response": "a,b\tc"}
    rows[7] = {"prompt": "two\nnew\nlines", "response": "x"}
    path = tmp_path / f"rows{suffix}"
    _write_delimited(path, rows, "\t" if suffix == ".tsv" else ",")
    splits = _load(path, test_size=5)
    assert [len(s) for s in splits] == [15, 5]
    expected = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    assert _all_rows(splits) == sorted(expected.to_dict("records"), key=lambda r: r["prompt"])
    _tokenize_both(splits)


def test_json_array_jsonl_and_parquet_still_load(tmp_path):
    rows = _rows(12)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    _write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON lines in .json
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.json", "a.jsonl", "lines.json", "a.parquet"):
        assert _all_rows(_load(tmp_path / name, test_size=2)) == sorted(rows, key=lambda r: r["prompt"]), name


def test_an_existing_file_of_an_unknown_type_is_a_clear_error(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("prompt,response\na,b\n")
    with pytest.raises(DataError, match=r"^data\.source: .*rows\.txt: unsupported file type '\.txt' "
                                        r"\(supported: \.csv, \.json, \.jsonl, \.parquet, \.tsv\)$"):
        _load(path)


def test_a_missing_file_is_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(DataError, match=r"^data\.source: no such file or folder: .*missing\.csv$"):
        _load(tmp_path / "missing.csv")


# ----------------------------------------------------------------------- empty files (item 4)
@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", b""), ("blank.jsonl", b"\n  \n\n"), ("header.csv", b"prompt,response\n"),
    ("empty.tsv", b""), ("empty.json", b"[]"), ("empty.parquet", None)])
def test_an_empty_file_is_one_line_naming_it(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: the file holds no rows$"):
        _load(path)


# ----------------------------------------------------------------------- encoding and syntax (item 6)
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, suffix):
    rows = _rows(100)
    rows[56]["prompt"] = "caf\N{LATIN SMALL LETTER E WITH ACUTE}"
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        line = _write_jsonl(path, rows, blank_every=10)[56]
    elif suffix == ".csv":
        line = _write_delimited(path, rows, ",")[56]
    else:
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "caf" in text)
    path.write_bytes(path.read_bytes().replace("caf\u00e9".encode(), "caf\u00e9".encode("latin-1")))
    with pytest.raises(DataError, match=rf"^{path} line {line}: not UTF-8 \(byte 0xe9\); save the file as UTF-8$"):
        _load(path)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,response\n" + b"".join(f"p{i},r{i}\n".encode() for i in range(4)))
    assert set(_load(path, test_size=1)[0].column_names) == {"prompt", "response", "evo_sft_location"}


@pytest.mark.parametrize("text, line, fragment", [
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": }\n', 3,
     "not valid JSON (Expecting value, column 29)"),
    ('{"prompt": "a", "response": "b"}\n["c", "d"]\n', 2, "expected a JSON object, got list"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": 4}\n', 2,
     "'response' is int 4, unlike the rows before it"),
])
def test_a_malformed_json_line_is_named(tmp_path, text, line, fragment):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{path} line {line}: ") as error:
        _load(path)
    assert str(error.value).endswith(fragment)


def test_a_csv_record_with_the_wrong_number_of_fields_is_named(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,response\na,b\n"multi\nline",c\nd,e,f\n')
    with pytest.raises(DataError, match=rf"^{path} line 5: 3 fields where the header has 2$"):
        _load(path)


# ----------------------------------------------------------------------- rows named by file and line (item 7)
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_bad_row_is_named_by_its_line_in_the_file_not_its_place_after_the_shuffle(tmp_path, suffix):
    rows = _rows(200)
    for i in range(0, 200, 9):  # fields spanning lines push the csv's lines away from the row numbers
        rows[i]["prompt"] += "\nmore"
    rows[140]["response"] = " "
    path = tmp_path / f"rows{suffix}"
    lines = _write_jsonl(path, rows, blank_every=7) if suffix == ".jsonl" else _write_delimited(path, rows, ",")
    assert lines[140] != 141 and lines[140] != 142
    splits = _load(path, test_size=0.5)
    with pytest.raises(DataError, match=rf"^{path} line {lines[140]}: 'response' is empty or not a string: ' '$"):
        _tokenize_both(splits)


def test_json_arrays_and_parquet_name_the_row_index(tmp_path):
    rows = _rows(30)
    rows[17]["response"] = ""
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("rows.json", "rows.parquet"):
        with pytest.raises(DataError, match=rf"^{tmp_path / name} row 17: 'response' is empty"):
            _tokenize_both(_load(tmp_path / name, test_size=0.5))


def test_a_dataset_folder_names_the_split_and_the_row(tmp_path):
    rows = _rows(10)
    rows[6]["response"] = ""
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "train.jsonl", _rows(10))
    _write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    splits = _load(tmp_path / "data", test_split="test")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'data'} split test row 6: 'response' is empty"):
        _tokenize_both(splits)
    with pytest.raises(DataError, match=r"^data\.test_split: .* has no split 'dev' \(splits: train, test\)$"):
        _load(tmp_path / "data", test_split="dev")


def test_splitting_problems_name_the_key(tmp_path):
    path = tmp_path / "rows.jsonl"
    _write_jsonl(path, _rows(3))
    with pytest.raises(DataError, match=r"^data\.test_size: "):
        _load(path, test_size=3)
    with pytest.raises(DataError, match=r"^data\.test_split: .* is one file without splits"):
        _load(path, test_split="test")


# ----------------------------------------------------------------------- the command line (items 4-9)
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), TOKENIZERS_PARALLELISM="false",
               RAY_AUTH_MODE="disabled", **extra)
    return env


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("model") / "demo")


def evo(args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evo_sft.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env or _env(HF_HUB_OFFLINE="1"), timeout=120)


def _config(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"name": "t", **sections}))
    return path


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.mark.integration  # a process of the command line each
@pytest.mark.parametrize("section, key", [
    ({"data": {"source": "data/train.jsonl"}}, "data.source"),
    ({"data": {"source": "./train"}}, "data.source"),
    ({"model": {"name": "models/mine/v1"}}, "model.name"),
    ({"tokenizer": "~/no/such/tokenizer"}, "tokenizer")])
def test_dry_run_refuses_a_missing_local_path_naming_the_key(tmp_path, section, key):
    value = section.get("tokenizer") or next(iter(next(iter(section.values())).values()))
    line = _one_error_line(evo(["run", _config(tmp_path, **section), "--dry-run"], tmp_path))
    assert line == f"error: {key}: no such file or folder: {value}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment.yaml"]  # nothing started


@pytest.mark.integration  # a process of the command line each
def test_dry_run_accepts_existing_paths_and_hub_ids_without_the_network(tmp_path, demo_model):
    _write_jsonl(tmp_path / "train.jsonl", _rows(4))
    local = {"data": {"source": "train.jsonl"}, "model": {"name": str(demo_model)}, "tokenizer": str(demo_model)}
    hub = {"data": {"source": "someorg/some-data"}, "model": {"name": "Qwen/Qwen2.5-0.5B"}}
    for sections in (local, hub):
        result = evo(["run", _config(tmp_path, **sections), "--dry-run"], tmp_path)
        assert result.returncode == 0, result.stderr


@pytest.mark.integration  # a process of the command line each
@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "{path}: the file holds no rows"),
    ("latin1.csv", b"prompt,response\nab,ba\ncaf\xe9,x\n",
     "{path} line 3: not UTF-8 (byte 0xe9); save the file as UTF-8"),
    ("rows.txt", b"ab ba\n",
     "data.source: {path}: unsupported file type '.txt' (supported: .csv, .json, .jsonl, .parquet, .tsv)"),
])
def test_run_with_bad_data_is_one_line_and_exit_code_2(tmp_path, demo_model, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    config = _config(tmp_path, model={"name": str(demo_model)}, data={"source": str(path)})
    line = _one_error_line(evo(["run", config, "--run-dir", tmp_path / "run"], tmp_path))
    assert line == "error: " + message.format(path=path)


# ----------------------------------------------------------------------- the hub out of reach (item 9)
HUB_CASES = {
    "dataset": ({"data": {"source": "someorg/some-data"}}, "dataset 'someorg/some-data'",
                "data.source: path/to/file.jsonl"),
    "model": ({"model": {"name": "someorg/some-model"}}, "model 'someorg/some-model'", "model.name: /path/to/model"),
}


@pytest.mark.integration  # a process of the command line each
@pytest.mark.parametrize("case", HUB_CASES)
def test_an_unreachable_hub_is_one_line_at_once(tmp_path, demo_model, case):
    sections, what, local_copy = HUB_CASES[case]
    sections = {"model": {"name": str(demo_model)}, **sections}
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = _env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    line = _one_error_line(evo(["run", _config(tmp_path, **sections), "--run-dir", tmp_path / "run"], tmp_path, env))
    assert line.startswith(f"error: could not reach the Hugging Face Hub at {endpoint} (")
    assert line.endswith(f") for {what}; point at a local copy instead ({local_copy}), "
                         "or set HF_HUB_OFFLINE=1 to use the Hugging Face cache")


@pytest.mark.integration  # a process of the command line each
@pytest.mark.parametrize("case", HUB_CASES)
def test_offline_without_a_cached_copy_is_one_line(tmp_path, demo_model, case):
    sections, what, local_copy = HUB_CASES[case]
    sections = {"model": {"name": str(demo_model)}, **sections}
    env = _env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    line = _one_error_line(evo(["run", _config(tmp_path, **sections), "--run-dir", tmp_path / "run"], tmp_path, env))
    assert line == (f"error: {what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so the hub "
                    f"was not tried; point at a local copy instead ({local_copy})")


LOAD_TIMER = """
import time, datasets, transformers
from evo_sft.config import DataConfig
from evo_sft.data.sources import DataError, load_splits, load_tokenizer
for load in (lambda: load_splits(DataConfig(source="someorg/some-data"), 0), lambda: load_tokenizer("someorg/tok")):
    start = time.perf_counter()
    try:
        load()
    except DataError:
        print(time.perf_counter() - start)
"""


@pytest.mark.integration  # a process of the command line each
@pytest.mark.parametrize("offline", [False, True], ids=["closed-port", "HF_HUB_OFFLINE"])
def test_an_unreachable_hub_fails_within_seconds(tmp_path, offline):
    """The hub's clients retry a refused connection five times (about 25 s) before they give up."""
    env = _env(HF_HOME=str(tmp_path / "hf"), **({"HF_HUB_OFFLINE": "1"} if offline else
                                                 {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}))
    result = subprocess.run([sys.executable, "-c", LOAD_TIMER], capture_output=True, text=True, env=env, timeout=120)
    seconds = [float(s) for s in result.stdout.split()]
    assert len(seconds) == 2, result.stderr[-3000:]
    assert max(seconds) < 3, seconds
