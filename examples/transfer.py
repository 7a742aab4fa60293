"""Transfer to a new hospital: fine-tune on synthetic hospital A, then adapt the checkpoint to hospital B, whose
patients are older and sicker and whose labs and vitals are reported in other units (every value 1.8 x + 3).

    python examples/transfer.py --output_dir transfer_output [--num_subjects 2000]

Three adaptations of the same checkpoint are compared on B's held_out split (never used for fitting):
temperature scaling alone, value statistics refitted on B's unlabeled data + temperature, and the same plus one
epoch of continued pretraining on B. Writes `transfer_output/results.json`.
"""

import argparse
import datetime
import time
from pathlib import Path

import polars as pl
import torch
from transformers import TrainingArguments

from ehr_transformer.adaptation import adapt_checkpoint, format_adaptation
from ehr_transformer.data.synthetic import HospitalProfile, write_synthetic_meds
from ehr_transformer.training.arguments import DataArguments, FinetuningArguments, ModelArguments
from ehr_transformer.training.finetune import finetune
from ehr_transformer.utils import write_json

parser = argparse.ArgumentParser()
parser.add_argument("--output_dir", default="transfer_output")
parser.add_argument("--num_subjects", type=int, default=2000, help="subjects per hospital")
args = parser.parse_args()
torch.set_num_threads(1)
root = Path(args.output_dir)
hospital_a, hospital_b, cache = root / "hospital_a", root / "hospital_b", root / "cache"
task = "in_hospital_mortality"

if not hospital_a.exists():
    write_synthetic_meds(hospital_a, n_subjects=args.num_subjects, seed=0)
if not hospital_b.exists():
    profile = HospitalProfile(name="hospital_b", age_shift=8.0, severity_scale=1.3, emergency_share=0.8)
    write_synthetic_meds(hospital_b, n_subjects=args.num_subjects, seed=1, profile=profile)
    for shard in sorted((hospital_b / "data").glob("**/*.parquet")):  # other units at hospital B
        pl.read_parquet(shard).with_columns(pl.col("numeric_value") * 1.8 + 3).write_parquet(shard)

start = time.perf_counter()
finetuned = root / "finetuned"
finetune(
    DataArguments(
        data_dir=str(hospital_a),
        labels=str(hospital_a / "labels" / f"{task}.parquet"),
        cache_dir=str(cache),
        max_length=128,
    ),
    ModelArguments(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    FinetuningArguments(),
    TrainingArguments(
        str(finetuned),
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        num_train_epochs=3,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",
    ),
)
results = {
    "date": datetime.date.today().isoformat(),
    "finetune_seconds": round(time.perf_counter() - start, 1),
    "variants": {},
}
variants = {
    "temperature_only": {"refit_values": False},
    "refit_values+temperature": {},
    "refit_values+continued_pretraining+temperature": {"continued_pretraining_epochs": 1.0},
}
for name, options in variants.items():
    start = time.perf_counter()
    result = adapt_checkpoint(
        finetuned,
        hospital_b,
        hospital_b / "labels" / f"{task}.parquet",
        root / name,
        overwrite=True,
        cache_dir=cache,
        **options,
    )
    results["variants"][name] = {"seconds": round(time.perf_counter() - start, 1), **result.to_dict()}
    print(f"== {name}\n{format_adaptation(result)}")
write_json(root / "results.json", results)
print(f"wrote {root / 'results.json'}")
