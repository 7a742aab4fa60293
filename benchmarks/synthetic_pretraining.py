"""Do pretrained features beat a random network's when the pretraining corpus is larger? (synthetic hospitals)

    python -m benchmarks.synthetic_pretraining --output benchmarks/results/synthetic_pretraining.json

On the real eICU demo (~3,000 pretraining windows) a linear probe on pretrained features did no better than one
on a randomly initialised backbone. This asks the same question where the corpus can be made larger: synthetic
hospitals (`ehr_transformer.data.synthetic`, default profile), whose outcome depends on lab values, vital-sign
trends and coded chronic diagnoses.

Per seed:
- the user: a cohort of `--user_subjects` (seed 900 + s); probes are fitted on a share of its training split's
  in-hospital-mortality rows and scored on its tuning + held_out rows (never seen by pretraining or the probe);
- for each corpus size in `--corpus_subjects`: another cohort of the same hospital (seed 910 + s), pretrained
  with the package's `pretrain` (default objectives, the tiny model of `benchmarks.selection`, `--epochs`);
- the control: the same tokenizer with an untrained backbone of the same configuration (torch seed s);
- at each label share in `--fractions`: the frozen-feature probe (`common.probe_predictions`, i.e. the package's
  `fit_linear_probe` on mean-pooled embeddings, `--probe_draws` draws of the rows, the same rows for every
  backbone), mean AUROC over draws; reported per corpus size and share: pretrained, random and their paired
  difference over seeds;
- fine-tuned instead (every weight; `common.finetuned_predictions`, the package's `finetune` with the selection
  benchmark's settings: 4 epochs / share at learning rate 1e-3, `--finetune_seeds` seeds): the pretrained
  backbone against the random one, i.e. against training from scratch.

Settings were fixed before the first run; nothing was tuned on these cohorts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import common


def random_backbone(pretrained: Path, output: Path, seed: int) -> Path:
    """A checkpoint with `pretrained`'s tokenizer and configuration and freshly initialised weights."""
    import torch

    from ehr_transformer import EHREventTokenizer, EHRTransformerConfig, EHRTransformerForMaskedEventModeling
    from ehr_transformer.training.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = EHRTransformerForMaskedEventModeling._from_config(
        EHRTransformerConfig.from_pretrained(pretrained)
    )
    return save_checkpoint(model, EHREventTokenizer.from_pretrained(pretrained), output)


def paired(rows: list[dict], first: str, second: str, names: tuple[str, str, str]) -> dict:
    """`names` (first's, second's, the difference's key): the mean, sd and n of the records' `first` and `second`
    values, and of their difference paired per record with how many are above zero."""
    diff = [r[first] - r[second] for r in rows]
    return {
        names[0]: common.mean_sd([r[first] for r in rows]),
        names[1]: common.mean_sd([r[second] for r in rows]),
        names[2]: {**common.mean_sd(diff), "n_above_zero": sum(d > 0 for d in diff)},
    }


def mean_auroc(probabilities, labels) -> float:
    """Mean AUROC over the rows of `probabilities` `(draws, N)` against `labels` `(N,)`."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(labels, p) for p in probabilities]))


def run(args: argparse.Namespace) -> dict:
    from ehr_transformer.data.synthetic import write_synthetic_meds
    from ehr_transformer.training.arguments import DataArguments, ModelArguments, PretrainingArguments
    from ehr_transformer.training.pretrain import pretrain

    common.quiet(args.threads)
    work = Path(tempfile.mkdtemp(prefix="synthetic_pretraining_"))
    model_args = ModelArguments(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    records = []
    for seed in range(args.seeds):
        user = write_synthetic_meds(work / f"user{seed}", args.user_subjects, seed=900 + seed)
        evaluation = [(user, "tuning"), (user, "held_out")]
        for n in args.corpus_subjects:
            corpus = write_synthetic_meds(work / f"corpus{seed}_{n}", n, seed=910 + seed)
            pretrained, started = work / f"pretrained{seed}_{n}", time.perf_counter()
            pretrain(
                DataArguments(
                    data_dir=str(corpus), cache_dir=str(work / "cache"), max_length=128, min_code_count=5
                ),
                model_args,
                PretrainingArguments(),
                common.training_args(pretrained, args.epochs, seed, 32, 1e-3),
            )
            pretrain_s = time.perf_counter() - started
            control = random_backbone(pretrained, work / f"random{seed}_{n}", seed)
            for fraction in args.fractions:
                aurocs = {}
                for name, checkpoint in (("pretrained", pretrained), ("random", control)):
                    probabilities, labels, _ = common.probe_predictions(
                        checkpoint, user, evaluation, fraction, args.probe_draws
                    )
                    aurocs[name] = mean_auroc(probabilities, labels)
                    if args.finetune_seeds:
                        probabilities, labels, _ = common.finetuned_predictions(
                            checkpoint,
                            user,
                            evaluation,
                            work,
                            fraction=fraction,
                            seeds=args.finetune_seeds,
                            epochs=4.0,
                            learning_rate=1e-3,
                        )
                        aurocs[f"{name}_finetuned"] = mean_auroc(probabilities, labels)
                records.append(
                    {
                        "seed": seed,
                        "corpus_subjects": n,
                        "fraction": fraction,
                        **aurocs,
                        "pretrain_s": round(pretrain_s, 1),
                    }
                )
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
    command = common.command_line("synthetic_pretraining", argv)
    started = time.perf_counter()
    result = run(args)
    result["meta"] = {
        **common.metadata(command, started, args.threads),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
    }
    write_json(args.output, result)
    print(json.dumps(result["by_corpus_subjects"], indent=1))


if __name__ == "__main__":
    main()
