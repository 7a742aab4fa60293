"""Find private data in a saved folder before it is shared: subject identifiers, event timestamps, rare codes.

`scan_folder_for_leaks` lists every place in a saved folder where a training subject's identifier, the
timestamp of one of their real events, or a code seen in fewer than `min_code_count` training subjects appears.
How each kind is searched (and why):

* codes: as whole tokens (not inside a longer code) in the bytes of every file, binary ones included; a code
  is a string, so it can only be written as its UTF-8 bytes.
* timestamps: every `YYYY-MM-DD[T ]HH:MM` in every file is compared with the real events' times truncated to
  the minute; and integers of 9 digits or more are compared with the events' epoch seconds/milliseconds/
  microseconds.
* subject identifiers: small integers (1, 2, 17) appear everywhere in weights metadata, step counts and
  vocabularies, so an identifier counts as found only where it could be an identifier: (a) in a JSON file,
  as the value (or an element of the list value) of a key that names an identifier (`subject_id`,
  `patient_id`, `stay_id`, `person_id`, `hadm_id`, `subject_ids`, ...); (b) in any file, as a number
  right after such a name (`subject_id=17`, `"subject_ids": [3, 17]`, `patient 17`); and (c) for
  identifiers of 6 digits or more, which do not occur by chance, as a whole number anywhere in any file's
  text. Tests use a cohort with 10-digit identifiers so that (c) covers everything.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint_safety import SAFE_WEIGHT_SUFFIX, UnsafeCheckpointError, read_safetensors_header

# ------------------------------------------------------------------------------------------------ privacy
IDENTIFIER_NAME = (
    r"(?:subject|patient|person|stay|hadm|encounter|visit|admission|mrn|member)s?[_ -]?(?:ids?|no|number)?"
)


_IDENTIFIER_KEY = re.compile(rf"(?:^|_){IDENTIFIER_NAME}$", re.IGNORECASE)


_NAMED_NUMBERS = re.compile(
    rf"\b{IDENTIFIER_NAME}\b[\"']?\s*[:=]?\s*[\[(]?((?:\s*[\"']?\d+[\"']?\s*,?)+)".encode(), re.IGNORECASE
)


_DATETIME = re.compile(rb"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2})")


_LONG_NUMBER = re.compile(rb"(?<![\w.])\d{6,}(?![\w])")


_CODE_CHARS = re.compile(rb"[\w/.\-+]")


FREE_ID_DIGITS = 6


@dataclass(frozen=True)
class LeakFinding:
    """One place where private training data was found: file, kind (subject_id, timestamp, rare_code),
    the value (as text) and where in the file (byte offset, or a JSON key path)."""

    file: str
    kind: str
    value: str
    where: str


def _minute_keys(timestamps: Iterable[Any]) -> tuple[set[str], set[int]]:
    minutes, epochs = set(), set()
    for value in timestamps:
        if value is None:
            continue
        if isinstance(value, str):
            value = _dt.datetime.fromisoformat(value)
        if isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
            value = _dt.datetime(value.year, value.month, value.day)
        minutes.add(value.strftime("%Y-%m-%d %H:%M"))
        seconds = (value.replace(tzinfo=None) - _dt.datetime(1970, 1, 1)) // _dt.timedelta(microseconds=1)
        if (
            abs(seconds) >= 10**14
        ):  # epoch microseconds, milliseconds and seconds, where they have >= 9 digits
            for divisor in (1, 1_000, 1_000_000):
                if abs(seconds // divisor) >= 10**8:
                    epochs.add(seconds // divisor)
    return minutes, epochs


def _find_code(data: bytes, code: bytes) -> Iterable[int]:
    start = 0
    while (index := data.find(code, start)) >= 0:
        start = index + 1
        before = data[index - 1 : index]
        after = data[index + len(code) : index + len(code) + 1]
        if (not before or not _CODE_CHARS.fullmatch(before)) and (
            not after or not _CODE_CHARS.fullmatch(after)
        ):
            yield index


def _walk_json(value: Any, path: str = "") -> Iterable[tuple[str, str, Any]]:
    """(key path, last key, value) of every leaf and every list in a parsed JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}"
            yield child, str(key), item
            yield from _walk_json(item, child)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk_json(item, f"{path}[{i}]")


def _as_ids(value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool):
            continue
        if isinstance(item, int):
            out.append(item)
        elif isinstance(item, str) and item.strip().isdigit():
            out.append(int(item))
    return out


def scan_folder_for_leaks(
    folder: str | os.PathLike,
    subject_ids: Iterable[int],
    rare_codes: Iterable[str],
    timestamps: Iterable[Any],
    max_file_bytes: int = 512 * 1024**2,
) -> list[LeakFinding]:
    """Every file under `folder` (recursively, binary files included) searched for the given subject
    identifiers, rare codes and real event timestamps (see the module docstring for how). Returns the findings
    (an empty list when nothing leaked). Files larger than `max_file_bytes` are reported as a finding of kind
    `unscanned` rather than silently skipped."""
    ids = {int(i) for i in subject_ids}
    free_ids = {i for i in ids if len(str(abs(i))) >= FREE_ID_DIGITS}
    codes = sorted({c.encode("utf-8", "surrogateescape") for c in rare_codes if c})
    minutes, epochs = _minute_keys(timestamps)
    findings: list[LeakFinding] = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = str(path)
        if path.stat().st_size > max_file_bytes:
            findings.append(
                LeakFinding(name, "unscanned", str(path.stat().st_size), "file too large to scan")
            )
            continue
        data = path.read_bytes()
        for code in codes:
            for index in _find_code(data, code):
                findings.append(
                    LeakFinding(name, "rare_code", code.decode("utf-8", "replace"), f"byte {index}")
                )
        for match in _DATETIME.finditer(data):
            text = f"{match.group(1).decode()} {match.group(2).decode()}"
            if text in minutes:
                findings.append(LeakFinding(name, "timestamp", text, f"byte {match.start()}"))
        for match in _LONG_NUMBER.finditer(data):
            number = int(match.group())
            if number in epochs:
                findings.append(LeakFinding(name, "timestamp", str(number), f"byte {match.start()} (epoch)"))
            if number in free_ids:
                findings.append(LeakFinding(name, "subject_id", str(number), f"byte {match.start()}"))
        for match in _NAMED_NUMBERS.finditer(data):
            for number in re.findall(rb"\d+", match.group(1)):
                if int(number) in ids and int(number) not in free_ids:
                    findings.append(LeakFinding(name, "subject_id", number.decode(), f"byte {match.start()}"))
        if path.suffix == ".json" or path.name.endswith(".index.json"):
            findings.extend(_scan_json_fields(name, data, ids - free_ids))
        elif path.suffix == SAFE_WEIGHT_SUFFIX:
            try:
                header = read_safetensors_header(path)
            except UnsafeCheckpointError:
                header = {}
            findings.extend(_scan_parsed(name, header, ids - free_ids))
    return sorted(set(findings), key=lambda f: (f.file, f.kind, f.value, f.where))


def _scan_json_fields(name: str, data: bytes, ids: set[int]) -> list[LeakFinding]:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return []
    return _scan_parsed(name, parsed, ids)


def _scan_parsed(name: str, parsed: Any, ids: set[int]) -> list[LeakFinding]:
    out = []
    for where, key, value in _walk_json(parsed):
        if _IDENTIFIER_KEY.search(key):
            out.extend(LeakFinding(name, "subject_id", str(i), where) for i in _as_ids(value) if i in ids)
    return out


__all__ = ["LeakFinding", "scan_folder_for_leaks"]
