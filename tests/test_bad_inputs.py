"""Bad input, tried systematically with hypothesis: every generated case over the MEDS reader and writer, the wide-table
adapter and the tokenizer ends in a correct result or an error of the package's own types naming file, column and
subject; never another exception, never a partial output folder. `benchmarks/faults.py` runs the same generators
(`bad_input_cases`) at >= 10,000 cases and counts the outcomes."""

from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings

from benchmarks import faults
from ehr_transformer.data.meds import MEDSValidationError, iter_shards, validate_events
from ehr_transformer.data.writer import write_meds
from ehr_transformer.tokenization_ehr import EHREventTokenizer

FAST = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@FAST
@given(case=faults.bad_input_cases())
def test_every_generated_case_ends_in_a_result_or_a_clear_error(case, tmp_path_factory):
    assert faults.run_case(case, tmp_path_factory.getbasetemp() / "cases") in ("correct", "clear_error")


def test_the_benchmark_counts_outcomes(tmp_path):
    counts = faults.bad_inputs(60, tmp_path)
    assert counts["tried"] == 60 == counts["clear_errors"] + counts["correct_results"] + counts["crashes"]
    assert counts["crashes"] == 0 and counts["partial_outputs"] == 0, counts["first_crashes"]


# ---- the crashes the generators found, kept as plain regression tests
@pytest.mark.parametrize("content", [b"", b"\xff\xfenot parquet", b"PAR1"])
def test_unreadable_shard_is_a_meds_error_naming_the_file(tmp_path, content):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "0.parquet").write_bytes(content)
    with pytest.raises(MEDSValidationError, match=r"0\.parquet: not a readable parquet file"):
        list(iter_shards(tmp_path))


@pytest.mark.parametrize(
    "column, values",
    [("code", [1, 2]), ("subject_id", ["a", "b"]), ("code", pl.Series(["A", "B"], dtype=pl.Categorical))],
)
def test_tokenizer_refuses_non_meds_dtypes_with_a_value_error(column, values):
    frame = pl.DataFrame(
        {"subject_id": [1, 2], "time": [None, None], "code": ["A", "B"], "numeric_value": [1.0, None]}
    )
    frame = frame.with_columns(pl.Series(column, values))
    with pytest.raises(ValueError, match=f"column '{column}' has dtype"):
        EHREventTokenizer.fit(frame, min_code_count=1)


def test_failed_write_leaves_no_partial_folder(tmp_path):
    events = pl.DataFrame({"subject_id": [1, 2], "time": [None, None], "code": ["A", None]})
    splits = pl.DataFrame({"subject_id": [1, 2], "split": ["train", "held_out"]})
    with pytest.raises(MEDSValidationError, match="subject_id 2"):
        write_meds(tmp_path / "meds", events, splits)
    assert list(tmp_path.iterdir()) == []


def test_enormous_timeline_is_encoded_within_max_length():
    frame = validate_events(faults._enormous_timeline(50_000))
    tokenizer = EHREventTokenizer.fit(frame, min_code_count=1, max_length=64)
    rows = tokenizer.encode_events(frame)
    assert rows.height == 1 and rows["length"][0] == 64


def test_labels_of_absent_subjects_and_before_the_first_event():
    import datetime as dt

    frame = validate_events(
        pl.DataFrame(
            {
                "subject_id": [1, 1, 2],
                "time": [None, dt.datetime(2020, 1, 2), dt.datetime(2020, 1, 1)],
                "code": ["S", "A", "A"],
            }
        )
    )
    labels = pl.DataFrame(
        {
            "subject_id": [1, 2, 3],
            "prediction_time": [dt.datetime(2019, 1, 1), dt.datetime(2019, 1, 1), dt.datetime(2021, 1, 1)],
            "boolean_value": [True, False, True],
        }
    )
    rows = EHREventTokenizer.fit(frame, min_code_count=1).encode_events(frame, labels=labels)
    # subject 3 has no events: no sample; subject 2 has nothing visible before its prediction time: no sample;
    # subject 1 keeps only its static event (CLS + S)
    assert rows["subject_id"].to_list() == [1] and rows["length"].to_list() == [2]
    assert Path(faults.__file__).name == "faults.py"
