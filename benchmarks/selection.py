"""Does `ehr-transformer select` pick the checkpoint that fine-tunes best on a user's data?

    python benchmarks/selection.py --output benchmarks/results/selection.json

A zoo of tiny checkpoints is pretrained, one per synthetic hospital (`HospitalProfile`: hospitals that rename a
code system, treat older or sicker subjects, or die of their history rather than their first-day physiology).
Each hospital then plays the user once: a new cohort of it (another seed) is the user's data. For every case

- the selector ranks all checkpoints on the user's training split (coverage, prototype fit, LogME on the user's
  training labels of in-hospital mortality); it sees nothing of the held-out split;
- the truth: every checkpoint is fine-tuned on the user's training split and its AUROC measured on the user's
  evaluation subjects: the tuning and held_out splits together (30% of the subjects; neither the fine-tuning nor
  the selector sees them), pooled so that the AUROC differences between checkpoints are not drowned by the
  sampling error of a small test split.

Reported per case: whether the selector's top choice has the highest fine-tuned AUROC (`top1_correct`), the
Spearman correlation of the selector's combined score with the fine-tuned AUROCs, the AUROC lost by taking the
selector's choice (`regret_auroc`), and the same for each component alone. The goal: top-1 right in >= 4 of 5
cases, Spearman >= 0.7.

Tuning: none of the selector's formula was tuned on these hospitals or seeds. `--zoo dev` runs the same
protocol on separate development hospitals and seeds (the only ones looked at while designing the selector: they
made the combined score use coverage of (subject, code) pairs rather than of events, see
`ehr_transformer.selection`); `--zoo benchmark` (default) is the held-out zoo whose figures the README reports.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(name, "1")

TASK = "in_hospital_mortality"


def hospitals(zoo: str):
    """The hospitals of a zoo: (name, profile, pretraining seed, user seed)."""
    from ehr_transformer.data.synthetic import HospitalProfile as H

    if zoo == "dev":  # used while designing the selector; never the reported figures
        return [
            ("dev_default", H(name="dev_default"), 101, 201),
            ("dev_two_local_systems", H(name="dev_two_local_systems", code_systems={"ICD10CM": "ICDX", "LOINC": "LOC"}), 102, 202),
            ("dev_young_mild", H(name="dev_young_mild", age_shift=-15.0, severity_scale=0.7), 103, 203),
            ("dev_local_rx_history", H(name="dev_local_rx_history", code_systems={"RXNORM": "RX"}, mortality_mechanism="history"), 104, 204),
        ]  # fmt: skip
    return [
        ("general", H(name="general"), 1001, 2001),
        ("local_labs", H(name="local_labs", code_systems={"LOINC": "LAB"}), 1002, 2002),
        ("local_diagnoses_older", H(name="local_diagnoses_older", code_systems={"ICD10CM": "DX", "ICD10PCS": "PX"}, age_shift=8.0, mortality_mechanism="history"), 1003, 2003),
        ("local_meds_sicker", H(name="local_meds_sicker", code_systems={"RXNORM": "MED"}, severity_scale=1.4, frailty_shift=0.5), 1004, 2004),
        ("elderly_emergency", H(name="elderly_emergency", age_shift=15.0, severity_scale=1.5, emergency_share=0.85, mortality_mechanism="history"), 1005, 2005),
    ]  # fmt: skip


def training_args(output_dir: Path, epochs: float, seed: int, batch_size: int, learning_rate: float):
    from transformers import TrainingArguments

    return TrainingArguments(
        str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=0.01, warmup_steps=10, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        seed=seed, disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip


def finetuned_auroc(checkpoint: Path, user: Path, work: Path, args, seed: int) -> float:
    """Fine-tune `checkpoint` on the user's training split, AUROC on the user's tuning + held_out subjects."""
    from sklearn.metrics import roc_auc_score

    from ehr_transformer.training import DataArguments, ModelArguments, finetune, predict

    labels = user / "labels" / f"{TASK}.parquet"
    out = work / "finetuned"
    finetune(
        DataArguments(data_dir=str(user), labels=str(labels), cache_dir=str(work / "cache")),
        ModelArguments(model_name_or_path=str(checkpoint), max_length=args.max_length),
        training_args(out, args.finetune_epochs, seed, 32, args.finetune_lr),
    )
    import polars as pl

    predictions = pl.concat([predict(out, user, labels, split=split) for split in ("tuning", "held_out")])
    shutil.rmtree(out)
    return float(roc_auc_score(predictions["label"].to_numpy(), predictions["probability"].to_numpy()))


def spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def evaluate_ranking(scores: list[float], truth: list[float], names: list[str]) -> dict:
    best = max(range(len(truth)), key=lambda i: truth[i])
    chosen = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return {
        "selected": names[chosen],
        "top1_correct": chosen == best,
        "spearman": spearman(scores, truth),
        "regret_auroc": truth[best] - truth[chosen],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="selection.json")
    parser.add_argument("--zoo", choices=["benchmark", "dev"], default="benchmark")
    parser.add_argument(
        "--hospitals", type=int, default=None, help="use only the first N hospitals (smoke tests)"
    )
    parser.add_argument("--pretrain_subjects", type=int, default=1500)
    parser.add_argument("--user_subjects", type=int, default=2000)
    parser.add_argument("--hidden_size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--pretrain_epochs", type=float, default=4)
    parser.add_argument("--pretrain_lr", type=float, default=1e-3)
    parser.add_argument("--finetune_epochs", type=float, default=8)
    parser.add_argument("--finetune_lr", type=float, default=1e-3)
    parser.add_argument(
        "--finetune_seeds", type=int, default=1, help="fine-tunes per (case, candidate), averaged"
    )
    parser.add_argument("--max_labels", type=int, default=1000, help="user training labels given to LogME")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()

    from ehr_transformer.data.synthetic import write_synthetic_meds
    from ehr_transformer.selection import select_checkpoints
    from ehr_transformer.training import DataArguments, ModelArguments, pretrain
    from ehr_transformer.utils import write_json

    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="selection_benchmark_"))
    work.mkdir(parents=True, exist_ok=True)
    zoo = hospitals(args.zoo)[: args.hospitals]
    model_args = ModelArguments(
        hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=4,
        intermediate_size=2 * args.hidden_size, max_length=args.max_length, min_code_count=5,
    )  # fmt: skip
    checkpoints = {}
    timings = {"pretraining_s": 0.0, "selection_s": 0.0, "finetuning_s": 0.0}
    for name, profile, pretrain_seed, _ in zoo:
        t0 = time.perf_counter()
        data = write_synthetic_meds(
            work / "data" / name, args.pretrain_subjects, seed=pretrain_seed, profile=profile, overwrite=True
        )
        checkpoints[name] = work / "zoo" / name
        pretrain(
            DataArguments(data_dir=str(data), cache_dir=str(work / "cache")), model_args,
            training_args(checkpoints[name], args.pretrain_epochs, 0, 32, args.pretrain_lr),
        )  # fmt: skip
        timings["pretraining_s"] += time.perf_counter() - t0
        print(f"pretrained {name} in {time.perf_counter() - t0:.0f} s", flush=True)

    names = list(checkpoints)
    cases = []
    for source, profile, _, user_seed in zoo:
        user = write_synthetic_meds(
            work / "users" / source, args.user_subjects, seed=user_seed, profile=profile, overwrite=True
        )
        t0 = time.perf_counter()
        result = select_checkpoints(
            user, [str(checkpoints[n]) for n in names], labels=user / "labels" / f"{TASK}.parquet", split="train",
            max_labels=args.max_labels, seed=0,
        )  # fmt: skip
        timings["selection_s"] += time.perf_counter() - t0
        by_path = {row["candidate"]: row for row in result["ranking"]}
        rows = [by_path[str(checkpoints[n])] for n in names]
        t0 = time.perf_counter()
        truth = [
            float(np.mean([finetuned_auroc(checkpoints[n], user, work, args, seed) for seed in range(args.finetune_seeds)]))
            for n in names
        ]  # fmt: skip
        timings["finetuning_s"] += time.perf_counter() - t0
        case = {"source": source, **evaluate_ranking([r["combined"] for r in rows], truth, names)}
        case["best_by_finetuning"] = names[int(np.argmax(truth))]
        case["components_alone"] = {
            component: evaluate_ranking([r[component] for r in rows], truth, names)
            for component in ("coverage", "code_coverage", "fit", "transferability")
        }
        case["candidates"] = [
            {
                "checkpoint": n,
                **{k: r[k] for k in ("coverage", "code_coverage", "distance_ratio", "occupancy_overlap", "fit", "transferability", "combined", "rank")},
                "finetuned_auroc": auc,
            }
            for n, r, auc in zip(names, rows, truth, strict=True)
        ]  # fmt: skip
        cases.append(case)
        print(
            f"user {source}: selected {case['selected']}, best fine-tuned {case['best_by_finetuning']}, "
            f"top1 {case['top1_correct']}, spearman {case['spearman']}",
            flush=True,
        )
        for c in case["candidates"]:
            print(
                f"    {c['checkpoint']:<24} cov {c['coverage']:.3f} codes {c['code_coverage']:.3f} ratio {c['distance_ratio']:.2f} "
                f"overlap {c['occupancy_overlap']:.3f} logme {c['transferability']:.4f} "
                f"combined {c['combined']:.3f} auroc {c['finetuned_auroc']:.3f}",
                flush=True,
            )

    rhos = [c["spearman"] for c in cases if c["spearman"] is not None]
    summary = {
        "cases": cases,
        "zoo": args.zoo,
        "n_cases": len(cases),
        "top1_correct_cases": sum(c["top1_correct"] for c in cases),
        "mean_spearman": float(np.mean(rhos)) if rhos else None,
        "min_spearman": float(np.min(rhos)) if rhos else None,
        "goal": "top-1 right in >= 4 of 5 cases and Spearman >= 0.7",
        "goal_met": len(cases) >= 5
        and sum(c["top1_correct"] for c in cases) >= 4
        and bool(rhos)
        and float(np.mean(rhos)) >= 0.7,
        "components_alone": {
            component: {
                "top1_correct_cases": sum(c["components_alone"][component]["top1_correct"] for c in cases),
                "mean_spearman": float(
                    np.mean(
                        [r for c in cases if (r := c["components_alone"][component]["spearman"]) is not None]
                        or [np.nan]
                    )
                ),
            }
            for component in ("coverage", "code_coverage", "fit", "transferability")
        },  # fmt: skip
        "tuning": "none on these hospitals or seeds; the formula was fixed on the --zoo dev hospitals and seeds",
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "work")},
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - started, 1),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s)",
    }
    write_json(args.output, summary)
    print(
        f"top-1 right in {summary['top1_correct_cases']} of {len(cases)} cases, mean Spearman "
        f"{summary['mean_spearman']}; wall {summary['wall_s']} s; written to {args.output}"
    )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
