"""Where rows and tokenizers come from: the built-in demo task, a local file or the hub.

Every row that `load_splits` returns carries where it came from (`LOCATION_COLUMN`: a file and
line, or a hub split and row), so that a problem found after the split's shuffle names the row
the user can open. Problems with the data or with reaching it are one-line `DataError`s. Only
the standard library is imported at the top, so the command line can check paths quickly.
"""
import codecs
import csv
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

LOCATION_COLUMN = "evo_sft_location"
FILE_TYPES = (".csv", ".json", ".jsonl", ".parquet", ".tsv")
LOCAL_DATA_COPY = "data.source: path/to/file.jsonl"
LOCAL_MODEL_COPY = "model.name: /path/to/model"


class DataError(ValueError):
    """Data that cannot be used: a missing, empty or malformed file, a bad row, an unreachable
    hub. The one-line message names the file and line (or the hub split and row) or the config key."""


def shown(value) -> str:
    """`value` for a one-line message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def looks_like_path(name: str) -> bool:
    """Whether `name` can only mean a local file or folder, not a hub id ('name' or
    'namespace/name'): it starts with '.', '/' or '~', has more than one '/', or ends in a file
    extension (letters after the last dot, so 'Qwen/Qwen2.5-0.5B' stays a hub id)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).suffix[1:].isalpha())


def is_hub_id(name: str) -> bool:
    """Whether `name` (a `model.name`, `tokenizer` or `data.source`) names something on the hub:
    not the built-in demo, not a local file or folder."""
    return name != "demo" and not looks_like_path(name) and not Path(name).expanduser().exists()


def check_paths(named: dict[str, str | None]) -> None:
    """{config key: value}: a value that can only be a local path must exist."""
    for key, value in named.items():
        if value is not None and looks_like_path(value) and not Path(value).expanduser().exists():
            raise DataError(f"{key}: no such file or folder: {value}")


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached, from one quick request without retries
    (the hub's own clients retry for half a minute), or None where it answers."""
    from huggingface_hub import constants

    try:
        with urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except OSError as error:
        return str(getattr(error, "reason", error))


def _from_hub(load, what: str, local_copy: str):
    """`load()` from the Hugging Face Hub, or a one-line DataError at once where the hub cannot
    be reached, or HF_HUB_OFFLINE is set and the Hugging Face cache does not hold it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    problem = None if constants.HF_HUB_OFFLINE else _hub_unreachable()
    if problem is None:
        try:
            return load()
        except OSError as error:  # datasets raises ConnectionError, transformers OSError from LocalEntryNotFoundError
            if not any(isinstance(e, (ConnectionError, LocalEntryNotFoundError)) for e in (error, error.__cause__)):
                raise
            if constants.HF_HUB_OFFLINE:
                raise DataError(f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so the hub "
                                f"was not tried; point at a local copy instead ({local_copy})") from None
            problem = str(error).splitlines()[0]
    raise DataError(f"could not reach the Hugging Face Hub at {constants.ENDPOINT} ({problem}) for {what}; point at a "
                    f"local copy instead ({local_copy}), or set HF_HUB_OFFLINE=1 to use the Hugging Face cache")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    def load():
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)

    tokenizer = load() if Path(name).expanduser().exists() else _from_hub(
        load, f"tokenizer '{name}'", f"{LOCAL_MODEL_COPY}, or tokenizer: /path/to/tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model(name: str, trust_remote_code: bool = False) -> None:
    """Fail now, in one line, where the model cannot be loaded: a local path that does not exist,
    or a hub model that cannot be reached (its config is fetched; the weights load later)."""
    from transformers import AutoConfig

    check_paths({"model.name": name})
    if not Path(name).expanduser().exists():
        _from_hub(lambda: AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code),
                  f"model '{name}'", LOCAL_MODEL_COPY)


# ----------------------------------------------------------------------- local files
def _read_text(path: Path) -> str:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 (byte 0x{data[error.start]:02x}); "
                        f"save the file as UTF-8") from None


def _json_lines(path: Path, text: str) -> tuple[list[dict], list[str]]:
    """One JSON object per line; blank lines are skipped."""
    rows, where = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{path} line {number}")
    return rows, where


def _json_array(path: Path, text: str) -> tuple[list[dict], list[str]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {index}: expected a JSON object, got {type(row).__name__}")
    return rows, [f"{path} row {index}" for index in range(len(rows))]


def _delimited(path: Path, text: str, delimiter: str) -> tuple[list[dict], list[str]]:
    """A header line, then one record per row; a record's line is where it starts (quoted fields
    may span lines); blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, where = [], []
    try:
        header = next(reader, None)
        start = reader.line_num + 1
        for record in reader:
            if record and len(record) != len(header):
                raise DataError(f"{path} line {start}: {len(record)} fields where the header has {len(header)}")
            if record:
                rows.append(dict(zip(header, record)))
                where.append(f"{path} line {start}")
            start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(f"{path} line {reader.line_num}: {error}") from None
    return rows, where


def _dataset(rows: list[dict], where: list[str]):
    """A Dataset with every key of any row as a column (None where a row lacks it). A column
    whose values do not share one type is refused, naming the first row that breaks it."""
    import pyarrow as pa
    from datasets import Dataset

    columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(key for row in rows for key in row)}
    for key, values in columns.items():
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            good, bad = 0, len(values)  # values[:good] convert, values[:bad] do not
            while bad - good > 1:
                middle = (good + bad) // 2
                try:
                    pa.array(values[:middle])
                    good = middle
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    bad = middle
            value = values[bad - 1]
            raise DataError(f"{where[bad - 1]}: '{key}' is {type(value).__name__} {shown(value)}, "
                            f"unlike the rows before it") from None
    return Dataset.from_dict({**columns, LOCATION_COLUMN: where})


def _parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    return Dataset(table.append_column(LOCATION_COLUMN, pa.array([f"{path} row {i}" for i in range(len(table))])))


def _read_file(path: Path):
    """A Dataset of a local .jsonl/.json/.csv/.tsv/.parquet file's rows, each with its location
    ('FILE line N' for JSON lines and csv/tsv, counting the header; 'FILE row N' for a JSON
    array or parquet, from 0)."""
    if path.suffix not in FILE_TYPES:
        raise DataError(f"data.source: {path}: unsupported file type '{path.suffix}' "
                        f"(supported: {', '.join(FILE_TYPES)})")
    if path.suffix == ".parquet":
        dataset = _parquet(path)
    else:
        text = _read_text(path)
        if path.suffix == ".json" and text.lstrip().startswith("["):
            dataset = _dataset(*_json_array(path, text))
        elif path.suffix in (".json", ".jsonl"):
            dataset = _dataset(*_json_lines(path, text))
        else:
            dataset = _dataset(*_delimited(path, text, "\t" if path.suffix == ".tsv" else ","))
    if len(dataset) == 0:
        raise DataError(f"{path}: the file holds no rows")
    return dataset


# ----------------------------------------------------------------------- splits
def _located(dataset, describe: str):
    """`dataset` with LOCATION_COLUMN `describe.format(index)` for each row."""
    return dataset.add_column(LOCATION_COLUMN, [describe.format(index) for index in range(len(dataset))])


def _named_split(splits, name: str, key: str, where: str):
    if name not in splits:
        raise DataError(f"{key}: {where} has no split '{name}' (splits: {', '.join(splits)})")
    return _located(splits[name], f"{where} split {name} row {{}}")


def load_splits(data, seed: int):
    """(train, test) `datasets.Dataset`s for a `DataConfig`, from the demo task, a local file
    (or a folder `datasets` can load) or the hub. Without `data.test_split`, `data.test_size`
    of the rows are held out at random (seeded)."""
    from datasets import load_dataset

    path = Path(data.source).expanduser()
    if data.source == "demo":
        from evo_sft.data.demo import demo_dataset

        dataset = _located(demo_dataset(data.num_rows, seed=seed), "demo row {}")
    elif path.is_file():
        if data.test_split is not None:
            raise DataError(f"data.test_split: {data.source} is one file without splits; leave data.test_split unset "
                            f"to hold out data.test_size of its rows")
        dataset = _read_file(path)
    else:
        check_paths({"data.source": data.source})
        if path.is_dir():
            where, splits = data.source, load_dataset(str(path))
        else:
            where = f"hub dataset {data.source}"
            splits = _from_hub(lambda: load_dataset(data.source), f"dataset '{data.source}'", LOCAL_DATA_COPY)
        dataset = _named_split(splits, data.train_split, "data.train_split", where)
        if data.test_split is not None:
            return dataset, _named_split(splits, data.test_split, "data.test_split", where)
    try:
        split = dataset.train_test_split(test_size=data.test_size, seed=seed)
    except ValueError as error:
        raise DataError(f"data.test_size: {error}") from None
    return split["train"], split["test"]
