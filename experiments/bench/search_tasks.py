"""The SFT tasks of the search benchmark, built offline from what every Python has:

  demo      reverse a word of 3-7 letters (evo_sft.data.demo, the demo's own task)
  stdlib    Python standard library docstrings: a function's or class's qualified name and signature
            as the prompt, the first line of its docstring as the response, built with `inspect`
  unicode   Unicode character names: the code point and character as the prompt
            (`U+0394 Δ`), its name as the response (`GREEK CAPITAL LETTER DELTA`), from `unicodedata`

Rows depend only on the Python version. The pretrained base (pretrained_base.py) never saw the
stdlib task's modules.
"""
import importlib
import inspect
import json
import unicodedata
from pathlib import Path

import numpy as np

TASKS = ("demo", "stdlib", "unicode")

STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "filecmp", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "lzma", "mailbox",
    "math", "mimetypes", "operator", "os", "os.path", "pathlib", "pickle", "platform", "plistlib", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zlib",
)
MAX_PROMPT, MAX_RESPONSE = 72, 72  # characters (one token each for the demo's byte-level tokenizer)


def stdlib_rows() -> list[dict]:
    """One row per public function, class and method with a signature and a docstring in the
    modules above: prompt `module.Qualified.name(signature)`, response the docstring's first line.
    Sorted by prompt, so the rows depend only on the Python version."""
    rows = {}
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. turtle without tkinter
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [(name, obj)]
            if inspect.isclass(obj):
                members += [(f"{name}.{n}", m) for n, m in sorted(vars(obj).items())
                            if not n.startswith("_") and inspect.isfunction(m)]
            for qualified, member in members:
                row = _row(f"{module_name}.{qualified}", member)
                if row is not None:
                    rows.setdefault(row["prompt"], row)
    return [rows[prompt] for prompt in sorted(rows)]


def _row(qualified: str, obj) -> dict | None:
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
        return None
    try:
        prompt = f"{qualified}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return None
    doc = inspect.getdoc(obj)
    first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
    if not (8 <= len(first) <= MAX_RESPONSE and len(prompt) <= MAX_PROMPT and (prompt + first).isascii()):
        return None
    return {"prompt": prompt, "response": first}


UNICODE_ROWS = 3000
UNICODE_RANGE = (0x20, 0x3000)  # Latin to CJK symbols; CJK ideographs and Hangul syllables (names that
# are only the code point) left out


def unicode_rows() -> list[dict]:
    """UNICODE_ROWS named letters, numbers, punctuation and symbols, drawn with a fixed seed."""
    named = []
    for code in range(*UNICODE_RANGE):
        character = chr(code)
        name = unicodedata.name(character, "")
        if name and unicodedata.category(character)[0] in "LNPS" and not name.startswith(("CJK", "HANGUL SYLLABLE")):
            named.append({"prompt": f"U+{code:04X} {character}", "response": name})
    picked = np.random.default_rng(0).choice(len(named), size=UNICODE_ROWS, replace=False)
    return [named[i] for i in sorted(picked)]


def data_config(task: str, folder: Path) -> dict:
    """The `data` section of a config for `task`; its rows are written under `folder`."""
    if task == "demo":
        return {"source": "demo", "num_rows": 2000, "test_size": 200, "max_length": 64}
    rows = {"stdlib": stdlib_rows, "unicode": unicode_rows}[task]()
    path = Path(folder) / f"{task}.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return {"source": str(path), "test_size": 200, "max_length": 160}
