"""Do pretrained features beat a random network's when the pretraining corpus is larger? (issue 4, synthetic)

    python benchmarks/synthetic_pretraining.py --output benchmarks/results/synthetic_pretraining.json

On the real eICU demo (~3,000 pretraining windows, `pretraining_ablation.py`) a linear probe on pretrained
features did no better than one on a randomly initialised backbone. This asks the same question where the corpus
can be made larger: synthetic hospitals (`ehr_transformer.data.synthetic`, default profile), whose outcome
depends on lab values, vital-sign trends and coded chronic diagnoses.

Per seed:
- the user: a cohort of `--user_subjects` (seed 900 + s); probes are fitted on a share of its training split's
  in-hospital-mortality rows and scored on its tuning + held_out rows (never seen by pretraining or the probe);
- for each corpus size in `--corpus_subjects`: another cohort of the same hospital (seed 910 + s), pretrained
  with the package's `training.pretrain` (default objectives, tiny model as in `selection.py`, `--epochs`);
- the control: the same tokenizer with an untrained backbone of the same configuration (torch seed s);
- at each label share in `--fractions`: the frozen-feature probe (`selection.probe_predictions`, i.e.
  `training.fit_linear_probe` on mean-pooled embeddings, `--probe_draws` draws of the rows, the same rows for
  every backbone), mean AUROC over draws; reported per corpus size and share: pretrained, random and their
  paired difference over seeds;
- fine-tuned instead (every weight; `selection.finetuned_predictions`, the selection benchmark's protocol: 4
  epochs / share at learning rate 1e-3, `--finetune_seeds` seeds, no early stopping): the pretrained backbone
  against the random one, i.e. against training from scratch (added after the probe-only run of 2026-12-01).

Settings were fixed before the first run; nothing was tuned on these cohorts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(name, "1")


def random_backbone(pretrained: Path, output: Path, seed: int) -> Path:
    """A checkpoint with `pretrained`'s tokenizer and configuration and freshly initialised weights."""
    import torch

    from ehr_transformer import EHREventTokenizer, EHRTransformerConfig, EHRTransformerForMaskedEventModeling
    from ehr_transformer.training import save_checkpoint

    torch.manual_seed(seed)
    model = EHRTransformerForMaskedEventModeling._from_config(EHRTransformerConfig.from_pretrained(pretrained))
    return save_checkpoint(model, EHREventTokenizer.from_pretrained(pretrained), output)


def paired(rows: list[dict], first: str, second: str, names: tuple[str, str, str]) -> dict:
    """`names` (first's, second's, the difference's key): the mean, sd and n of the records' `first` and `second`
    values, and of their difference paired per record with how many are above zero."""
    from pretraining_ablation import summarize

    diff = [r[first] - r[second] for r in rows]
    return {
        names[0]: summarize([r[first] for r in rows]), names[1]: summarize([r[second] for r in rows]),
        names[2]: {**summarize(diff), "n_above_zero": sum(d > 0 for d in diff)},
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from selection import finetuned_predictions, probe_predictions
    from sklearn.metrics import roc_auc_score
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    from ehr_transformer.data.synthetic import write_synthetic_meds
    from ehr_transformer.training import DataArguments, ModelArguments, pretrain

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="synthetic_pretraining_"))
    model_args = ModelArguments(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_length=128,
        min_code_count=5,
    )  # fmt: skip
    finetuning = argparse.Namespace(finetune_epochs=4.0, finetune_lr=1e-3, max_length=128)
    records = []
    for seed in range(args.seeds):
        user = write_synthetic_meds(work / f"user{seed}", args.user_subjects, seed=900 + seed)
        evaluation = [(user, "tuning"), (user, "held_out")]
        for n in args.corpus_subjects:
            corpus = write_synthetic_meds(work / f"corpus{seed}_{n}", n, seed=910 + seed)
            pretrained, started = work / f"pretrained{seed}_{n}", time.perf_counter()
            pretrain(
                DataArguments(data_dir=str(corpus), cache_dir=str(work / "cache")), model_args,
                TrainingArguments(str(pretrained), num_train_epochs=args.epochs, per_device_train_batch_size=32,
                                  learning_rate=1e-3, weight_decay=0.01, warmup_steps=10, save_strategy="no",
                                  report_to=[], use_cpu=True, seed=seed, disable_tqdm=True, logging_strategy="no"),
            )  # fmt: skip
            pretrain_s = time.perf_counter() - started
            control = random_backbone(pretrained, work / f"random{seed}_{n}", seed)
            for fraction in args.fractions:
                aurocs = {}
                for name, checkpoint in (("pretrained", pretrained), ("random", control)):
                    probabilities, labels, _ = probe_predictions(checkpoint, user, evaluation, fraction, args.probe_draws)
                    aurocs[name] = float(np.mean([roc_auc_score(labels, p) for p in probabilities]))
                    if args.finetune_seeds:
                        probabilities, labels, _ = finetuned_predictions(
                            checkpoint, user, evaluation, work, finetuning, fraction, args.finetune_seeds
                        )
                        aurocs[f"{name}_finetuned"] = float(np.mean([roc_auc_score(labels, p) for p in probabilities]))
                records.append({"seed": seed, "corpus_subjects": n, "fraction": fraction, **aurocs,
                                "pretrain_s": round(pretrain_s, 1)})  # fmt: skip
                print(f"seed {seed} corpus {n} labels {fraction:.0%}: {aurocs}", flush=True)
    table = {}
    for n in args.corpus_subjects:
        for fraction in args.fractions:
            rows = [r for r in records if r["corpus_subjects"] == n and r["fraction"] == fraction]
            cell = paired(rows, "pretrained", "random", ("pretrained", "random", "pretrained_minus_random"))
            if args.finetune_seeds:
                names = ("pretrained_finetuned", "scratch_finetuned", "pretrained_minus_scratch_finetuned")
                cell |= paired(rows, "pretrained_finetuned", "random_finetuned", names)
            table.setdefault(str(n), {})[str(fraction)] = cell
    shutil.rmtree(work, ignore_errors=True)
    return {"by_corpus_subjects": table, "records": records}


def main(argv: list[str] | None = None) -> None:
    from ehr_transformer.utils import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="synthetic_pretraining.json")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--user_subjects", type=int, default=1500)
    parser.add_argument("--corpus_subjects", type=int, nargs="+", default=[1500, 6000])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2, 1.0])
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--probe_draws", type=int, default=10)
    parser.add_argument("--finetune_seeds", type=int, default=2, help="0: probes only")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/synthetic_pretraining.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    result = run(args)
    result["meta"] = {
        "command": command, "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "wall_s": round(time.perf_counter() - started, 1), "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s)",
    }  # fmt: skip
    write_json(args.output, result)
    print(json.dumps(result["by_corpus_subjects"], indent=1))


if __name__ == "__main__":
    main()
