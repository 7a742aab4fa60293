"""Choose a pretrained checkpoint for your data: a small zoo of checkpoints from different "hospitals", and the
selector picking the right one for held-out data of each.

    python examples/select_model.py --output_dir select_model_output [--yaib ../shared/data/yaib_demo]

The zoo: three synthetic hospitals that code differently and treat different populations (`HospitalProfile`):
`general` (the default coding), `local_labs` (laboratory and vital-sign codes written `LAB//...` instead of
`LOINC//...`) and `elderly_history` (the general coding, an older and sicker population whose deaths follow
their history more than their first-day physiology), plus a checkpoint pretrained on the real eICU demo cohort
(YAIB `mortality24/eicu_demo`, converted to MEDS with `ehr_transformer.data.wide`; skipped with a message when the
data are absent). Each checkpoint folder holds its model card, prototypes and code frequencies.

Then every source plays the user: new data of the same synthetic hospital (another seed), the eICU demo stays
held out from the eICU checkpoint's pretraining, and the MIMIC-III demo cohort (another hospital with the same
YAIB variables). The selector ranks the zoo for each with `ehr_transformer.selection.selector.select_checkpoints`,
using a few hundred of the user's training labels for LogME, and the script checks that the expected checkpoint
comes first.
The data of the real cohorts (PhysioNet demo databases, ODbL v1.0, processed by YAIB) are not shipped.
"""

import argparse
import shutil
from pathlib import Path

import polars as pl
import torch
from transformers import TrainingArguments

from ehr_transformer.data.labels import read_labels
from ehr_transformer.data.meds import read_events
from ehr_transformer.data.splits import read_subject_splits
from ehr_transformer.data.synthetic import HospitalProfile, write_synthetic_meds
from ehr_transformer.data.wide import convert_wide
from ehr_transformer.data.writer import write_meds
from ehr_transformer.selection.selector import format_ranking, select_checkpoints, write_ranking
from ehr_transformer.training.arguments import DataArguments, ModelArguments, PretrainingArguments
from ehr_transformer.training.pretrain import pretrain

parser = argparse.ArgumentParser()
parser.add_argument("--output_dir", default="select_model_output")
parser.add_argument("--yaib", default="../shared/data/yaib_demo")
parser.add_argument("--num_subjects", type=int, default=1500, help="subjects per synthetic hospital")
parser.add_argument("--epochs", type=float, default=4, help="pretraining epochs")
args = parser.parse_args()
torch.set_num_threads(1)
out = Path(args.output_dir)
MODEL = ModelArguments(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
HOSPITALS = {
    "general": (HospitalProfile(name="general"), 501, 601),
    "local_labs": (HospitalProfile(name="local_labs", code_systems={"LOINC": "LAB"}), 502, 602),
    "elderly_history": (
        HospitalProfile(
            name="elderly_history", age_shift=15.0, severity_scale=1.5, mortality_mechanism="history"
        ),
        503,
        603,
    ),
}


def pretrain_checkpoint(data: Path, name: str) -> Path:
    target = out / "zoo" / name
    pretrain(
        DataArguments(data_dir=str(data), cache_dir=str(out / "cache"), max_length=128, min_code_count=5),
        MODEL,
        PretrainingArguments(),
        TrainingArguments(
            str(target),
            num_train_epochs=args.epochs,
            per_device_train_batch_size=32,
            learning_rate=1e-3,
            weight_decay=0.01,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            logging_strategy="no",
            disable_tqdm=True,
        ),
    )
    return target


def held_out_as_user(meds: Path, target: Path) -> Path:
    """The held-out subjects of a MEDS folder as a dataset of their own (their 70/15/15 split redrawn), so a
    checkpoint pretrained on the folder's training split never saw them."""
    splits = read_subject_splits(meds)
    held_out = splits.filter(pl.col("split") == "held_out")["subject_id"]
    events = read_events(meds, subject_ids=held_out.to_list())
    labels = {path.stem: read_labels(path) for path in (meds / "labels").glob("*.parquet")}
    labels = {
        task: frame.filter(pl.col("subject_id").is_in(held_out.implode())) for task, frame in labels.items()
    }
    user_splits = held_out.to_frame().with_columns(pl.lit("train").alias("split"))
    return write_meds(target, events, user_splits, labels=labels, overwrite=True)


zoo, users = {}, {}
for name, (profile, pretrain_seed, user_seed) in HOSPITALS.items():
    data = write_synthetic_meds(
        out / "data" / name, args.num_subjects, seed=pretrain_seed, profile=profile, overwrite=True
    )
    zoo[name] = pretrain_checkpoint(data, name)
    user = write_synthetic_meds(out / "users" / name, 600, seed=user_seed, profile=profile, overwrite=True)
    users[name] = (user, user / "labels" / "in_hospital_mortality.parquet", name)

yaib = Path(args.yaib) / "mortality24"
if (yaib / "eicu_demo" / "dyn.parquet").is_file():
    eicu = yaib / "eicu_demo"
    convert_wide(
        eicu / "dyn.parquet",
        eicu / "sta.parquet",
        eicu / "outc.parquet",
        out / "data" / "eicu_demo",
        task="mortality24",
        overwrite=True,
    )
    zoo["eicu_demo"] = pretrain_checkpoint(out / "data" / "eicu_demo", "eicu_demo")
    user = held_out_as_user(out / "data" / "eicu_demo", out / "users" / "eicu_demo")
    users["eicu_demo"] = (user, user / "labels" / "mortality24.parquet", "eicu_demo")
    mimic = yaib / "mimic_demo"
    if (mimic / "dyn.parquet").is_file():
        convert_wide(
            mimic / "dyn.parquet",
            mimic / "sta.parquet",
            mimic / "outc.parquet",
            out / "users" / "mimic_demo",
            task="mortality24",
            overwrite=True,
        )
        users["mimic_demo"] = (
            out / "users" / "mimic_demo",
            out / "users" / "mimic_demo" / "labels" / "mortality24.parquet",
            "eicu_demo",
        )
else:
    print(f"{yaib / 'eicu_demo'} not found: the real-data member of the zoo is skipped (pass --yaib)")

right = 0
for source, (user, labels, expected) in users.items():
    result = select_checkpoints(user, [str(path) for path in zoo.values()], labels=labels, max_labels=300)
    write_ranking(result, out / "rankings" / f"{source}.json")
    chosen = Path(result["ranking"][0]["candidate"]).name
    right += chosen == expected
    print(f"\nuser data from {source}: selected {chosen} (expected {expected})")
    print(format_ranking(result))
print(f"\nthe expected checkpoint came first for {right} of {len(users)} users")
for name, path in zoo.items():  # the cards of the zoo, as model_cards/ keeps them
    shutil.copy(path / "README.md", out / f"card_{name}.md")
