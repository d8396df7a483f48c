"""Reading evaluation data: CSV as the official scripts' pandas saw it, JSONL (optionally gzipped), clear errors.

`read_csv` reproduces what `pd.read_csv(...)` (pandas 1.x/2.x, the official scripts' era) followed by `str()` of
each cell gives: numeric and boolean columns are converted the way pandas infers them, missing cells read "nan".
`find_data` names where to get a data set and the expected layout when it is not there. Task modules own the rest.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# pandas' default na_values (STR_NA_VALUES): such a cell reads as NaN, and str(NaN) is "nan".
PANDAS_NA = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
     "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip
_TRUE, _FALSE = {"True", "TRUE", "true"}, {"False", "FALSE", "false"}
_INT = re.compile(r"\s*[+-]?\d+\s*")


class MissingDataError(FileNotFoundError):
    """The data set is not where it was looked for; the message says where to get it and the layout."""


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "_" not in text  # Python accepts 1_000; pandas does not


def _column_as_pandas(cells: list[str]) -> list[str]:
    """str() of each cell after pandas' type inference for the whole column."""
    present = [c for c in cells if c not in PANDAS_NA]
    missing = len(present) < len(cells)
    if present and all(_INT.fullmatch(c) for c in present) and not missing:
        return [str(int(c)) for c in cells]
    if present and all(c in _TRUE or c in _FALSE for c in present) and not missing:
        return [str(c in _TRUE) for c in cells]
    if present and all(_is_float(c) for c in present):
        return [str(float(c)) if c not in PANDAS_NA else "nan" for c in cells]
    return ["nan" if c in PANDAS_NA else c for c in cells]


def read_csv(path: Path, names: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Rows of a CSV file as `str(cell)` of `pd.read_csv(path, names=names)` (header row when names is None)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if names is None:
        if not rows:
            raise ValueError(f"{path} is empty; expected a header row")
        header, rows = rows[0], rows[1:]
    else:
        header = list(names)
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"{path}: row {i + 1} has {len(row)} fields, expected {len(header)} ({header})")
    columns = [_column_as_pandas([r[j] for r in rows]) for j in range(len(header))]
    return [{name: col[i] for name, col in zip(header, columns, strict=True)} for i in range(len(rows))]


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Objects of a JSON-lines file (`.gz` is decompressed); blank lines are skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({exc.msg})") from exc


def find_data(data_dir: Path | None, candidates: Sequence[str], what: str, how_to_get: str) -> Path:
    """The first of `candidates` (paths relative to `data_dir`, '' for itself) that exists, else a clear error."""
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        for rel in candidates:
            path = data_dir / rel if rel else data_dir
            if path.exists():
                return path
    where = f"under {data_dir}" if data_dir is not None else "(no --data DIR given)"
    looked = ", ".join(repr(c) if c else "DIR itself" for c in candidates)
    raise MissingDataError(
        f"{what} not found {where}; looked for {looked}.\n{how_to_get}\nThen pass --data DIR."
    )


def require_fields(row: dict[str, Any], fields: Sequence[str], source: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(f"{source}: record lacks field(s) {missing}; expected fields {list(fields)}")


def load_hub(dataset_id: str, config: str | None, split: str, layout_help: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset through `datasets` (online, or from its cache); clear error otherwise."""
    try:
        import datasets
    except ImportError as exc:
        raise MissingDataError(
            f"no --data DIR given and the `datasets` library is not installed (pip install 'qwenkit[eval]') "
            f"to fetch {dataset_id}.\n{layout_help}"
        ) from exc
    try:
        return [dict(row) for row in datasets.load_dataset(dataset_id, config, split=split)]
    except Exception as exc:  # offline, unknown id, ...: datasets raises many types
        raise MissingDataError(
            f"could not load {dataset_id} ({config or 'default'}, {split}) with `datasets`: {exc}\n{layout_help}"
        ) from exc
