"""Subgroups of prediction rows from the user's own codes: age band at prediction time (from `MEDS_BIRTH`), sex,
and any static attribute named by a code prefix or a code -> group table.

Sex is found from codes that start with `sex_code_prefix`, by default from codes with a part `GENDER` or `SEX`
(any case, anywhere: `GENDER//F`, `PHYSIONET//Gender//1`). The group is what follows (`GENDER//F` -> "F",
`PHYSIONET//Gender//1` -> "1"); where nothing follows (`P12//Gender` with a value), the event's `text_value`,
else its `numeric_value` (`1` -> "1"). A code -> group table (`group_codes`: a CSV or parquet file
with columns `code`, `attribute`, `group`) names groups of any attribute exactly, e.g. `P12//Gender//0, sex,
female`; for "sex" it replaces the prefix rule. A subject's group is that of its first matching event.
Rows whose subject has no matching event are in group "unknown", and `subgroups_for` says how many.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import polars as pl

from ..data.meds import iter_shards

logger = logging.getLogger(__name__)

AGE_BANDS = ("18-44", "45-64", "65-79", "80+")
# a code part GENDER or SEX (any case) anywhere in a code: GENDER//F, PHYSIONET//Gender//1, P12//SEX with a value
DEFAULT_SEX_PATTERN = r"(^|//)(GENDER|SEX)(//|$)"
GROUP_CODE_COLUMNS = ("code", "attribute", "group")


def age_band(ages) -> np.ndarray:
    """Age bands "18-44", "45-64", "65-79", "80+" (years, lower bound inclusive); "<18" below, "unknown" for NaN/None."""
    a = np.asarray(
        [np.nan if v is None else v for v in np.asarray(ages, dtype=object).reshape(-1)], dtype=np.float64
    )
    out = np.full(a.shape, "unknown", dtype=object)
    out[a < 18] = "<18"
    out[(a >= 18) & (a < 45)] = "18-44"
    out[(a >= 45) & (a < 65)] = "45-64"
    out[(a >= 65) & (a < 80)] = "65-79"
    out[a >= 80] = "80+"
    return out


def read_group_codes(path: str | os.PathLike) -> pl.DataFrame:
    """A code -> (attribute, group) table from a CSV or parquet file with columns `code`, `attribute`, `group`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: group code table not found")
    table = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema=False)
    for column in GROUP_CODE_COLUMNS:
        if column not in table.columns:
            raise ValueError(
                f"{path}: column {column!r} is missing (expected columns {list(GROUP_CODE_COLUMNS)})"
            )
    table = table.select(pl.col(c).cast(pl.String) for c in GROUP_CODE_COLUMNS)
    repeated = table.filter(pl.struct("code", "attribute").is_duplicated())
    if repeated.height:
        row = repeated.row(0, named=True)
        raise ValueError(f"{path}: code {row['code']!r} is given more than one group of {row['attribute']!r}")
    return table


def _value_text() -> pl.Expr:
    """What follows the prefix, else the text value, else the numeric value written without a trailing .0."""
    numeric = pl.col("numeric_value").cast(pl.Float64)
    number = pl.when(numeric == numeric.round(0)).then(numeric.cast(pl.Int64).cast(pl.String))
    number = number.otherwise(numeric.cast(pl.String))
    return pl.coalesce(pl.when(pl.col("_rest") != "").then(pl.col("_rest")), pl.col("text_value"), number)


def _first_group(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    # frames come sorted by subject and time, static events first: the first match is the earliest
    return frame.group_by("subject_id", maintain_order=True).agg(pl.col(name).drop_nulls().first())


def subgroups_for(
    data_dir: str | os.PathLike,
    predictions: pl.DataFrame,
    sex_code_prefix: str | None = None,
    group_codes: str | os.PathLike | pl.DataFrame | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """One group per prediction row for each attribute: `age_band`, `sex`, and every attribute of `group_codes`.

    Returns the groups (attribute -> (N,) array of group names, "unknown" where none is found) and notes: one
    sentence for each attribute that could not be formed for some or all subjects, also logged as warnings.
    """
    table = read_group_codes(group_codes) if isinstance(group_codes, (str, os.PathLike)) else group_codes
    attributes = [] if table is None else sorted(table["attribute"].unique().to_list())
    sex_from_table = "sex" in attributes
    subjects = pl.Series(predictions["subject_id"].unique().to_list(), dtype=pl.Int64)
    births, found = [], {name: [] for name in ["sex", *attributes]}
    for _, frame in iter_shards(data_dir):
        frame = frame.filter(pl.col("subject_id").is_in(subjects.implode()))
        births.append(
            frame.filter(pl.col("code") == "MEDS_BIRTH")
            .group_by("subject_id")
            .agg(birth=pl.col("time").min())
        )
        if not sex_from_table:
            if sex_code_prefix:
                match = pl.col("code").str.starts_with(sex_code_prefix)
                rest = pl.col("code").str.slice(len(sex_code_prefix)).str.strip_chars("/")
            else:  # a GENDER or SEX part anywhere in the code; the group is the code's last part after it
                match = pl.col("code").str.to_uppercase().str.contains(DEFAULT_SEX_PATTERN)
                last = pl.col("code").str.split("//").list.last()
                rest = (
                    pl.when(last.str.to_uppercase().is_in(["GENDER", "SEX"])).then(pl.lit("")).otherwise(last)
                )
            sex = frame.filter(match).with_columns(_rest=rest)
            found["sex"].append(_first_group(sex.with_columns(sex=_value_text()), "sex"))
        for attribute in attributes:
            mapping = table.filter(pl.col("attribute") == attribute).select(
                "code", pl.col("group").alias(attribute)
            )
            found[attribute].append(_first_group(frame.join(mapping, on="code", how="inner"), attribute))
    rows = predictions.select("subject_id", "prediction_time")
    rows = (
        rows.join(pl.concat(births), on="subject_id", how="left") if births else rows.with_columns(birth=None)
    )
    ages = ((rows["prediction_time"] - rows["birth"]).dt.total_hours() / (24 * 365.25)).to_numpy()
    groups = {"age_band": age_band(ages)}
    notes = []
    n_subjects = subjects.len()
    missing_birth = rows.filter(pl.col("birth").is_null())["subject_id"].n_unique()
    if missing_birth:
        notes.append(
            f"{missing_birth} of {n_subjects} evaluated subjects have no MEDS_BIRTH event: their rows are in age "
            "band 'unknown'"
        )
    for name, parts in found.items():
        if not parts:
            continue
        rows = rows.join(pl.concat(parts), on="subject_id", how="left")
        missing = rows.filter(pl.col(name).is_null())["subject_id"].n_unique()
        if missing:
            where = (
                "in the group code table"
                if name in attributes
                else f"with a code starting with {sex_code_prefix}"
                if sex_code_prefix
                else "with a code part GENDER or SEX"
            )
            hint = "" if name in attributes else "; name the codes with --sex_code_prefix or --group_codes"
            notes.append(
                f"{missing} of {n_subjects} evaluated subjects have no {name} event {where}: their rows are in "
                f"{name} group 'unknown'{hint}"
            )
        groups[name] = rows[name].fill_null("unknown").to_numpy()
    for note in notes:
        logger.warning(note)
    return groups, notes


__all__ = ["AGE_BANDS", "DEFAULT_SEX_PATTERN", "age_band", "read_group_codes", "subgroups_for"]
