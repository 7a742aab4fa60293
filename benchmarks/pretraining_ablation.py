"""What each part of the pretraining concept buys, measured on the real ICU demo cohorts.

    python benchmarks/pretraining_ablation.py --data ../shared/data/yaib_demo --output ablation.json [--seeds 3]
    python benchmarks/pretraining_ablation.py ... --seed 1 --seeds 1 --output part1.json   # one seed per process
    python benchmarks/pretraining_ablation.py --merge part0.json part1.json part2.json --output ablation.json

Protocol (every model on exactly the same rows; nothing is ever chosen on a test split):

- Per seed, eICU mortality24 stays (1,367, 70 deaths) are split stratified into training (75%) and test (25%);
  training into fitting (85%) and validation (15%). The tokenizer is fitted on the training stays' events.
- Pretraining corpus: the training stays' mortality24 sequences plus windows of every eICU `los` stay that is
  not a test stay (the two cohorts share stay_ids; test stays are excluded by id). One backbone per
  (configuration, seed), pretrained with `ehr_transformer.pretraining.PretrainingTrainer` (the package's
  Trainer), then fine-tuned on each label budget.
- Configurations: each objective alone (`code`, `value`, `time`, `feature`), all four combined under each loss
  balancing strategy (`all_static`, `all_uncertainty`, `all_gradnorm`, `all_pcgrad`), `scratch` (random
  initialisation) and `gbm_baseline` (gradient boosting on per-variable aggregates, `TabularBaseline("gbm")`).
  Every pretrained configuration sees the same corrupted inputs (15% of codes masked, 30% of values and 15% of
  times hidden); they differ only in which losses are trained and how they are weighed. A follow-up,
  `value_future` (run only when named in `--configs`), trains the value objective on each sequence's latest ~30%
  of values instead of a random 30% (`value_mask_strategy="future"`): forecasting the last hours.
- Low-label fine-tuning: a stratified share of the fitting stays' labels (at least 2 deaths), the same rows for
  every configuration. Two ways to use a backbone on those labels:
    fine-tuned (the configuration's own name)  every weight trained for a fixed number of optimiser steps (no
        early stopping: a 5% budget has no labels to spare for it), the classifier bias starting at the prevalence;
    linear probe (`<configuration>+probe`)  the backbone frozen; an L2 logistic regression on its standardised
        pooled embeddings (`ehr_transformer.selection.embed_sequences`), the penalty chosen by stratified
        cross-validation on the fitting labels alone (the CLMBR / femr evaluation protocol).
  `scratch` is the fine-tuned randomly initialised model (training from scratch); `scratch+probe`, the probe on
  a random frozen backbone, is the control that shows what the probe alone buys. `pretrained_best` is chosen per
  seed on the validation split only: the objective combination with the highest validation AUROC (over both
  heads) at 100% of the labels, and at each budget the head (fine-tuned or probe) with the higher validation
  AUROC. Every configuration runs at `--ablation-fractions` (default 10% and 100%); scratch, gbm_baseline and
  pretrained_best at every fraction.
- Transfer eICU -> MIMIC (99 stays, 21 deaths): the 100%-label models scored on MIMIC as they are
  (`uncalibrated`), and after distribution calibration (`calibrated`): value statistics refitted on MIMIC's
  unlabeled events (vocabulary ids unchanged), then a temperature fitted on labelled MIMIC stays. The temperature
  is cross-fitted in two stratified halves (fitted on one half, applied to the other), so every MIMIC stay is
  scored by a model whose temperature never saw its label. `values_refit` and `temperature_only` show each step
  alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from yaib_demo import (  # noqa: E402  (the real-data pieces shared with the main ICU benchmark)
    HParams,
    binary_metrics,
    configure_logging,
    load_cohort,
    model_config,
    optimizer_for,
    predict,
    quick_subset,
    require_data,
    restrict,
    sigmoid,
    to_features,
    window_labels,
)

from ehr_transformer.baselines import TabularBaseline  # noqa: E402
from ehr_transformer.calibration import fit_temperature  # noqa: E402
from ehr_transformer.data.collators import (  # noqa: E402
    DataCollatorForEventClassification,
    DataCollatorForMaskedEventModeling,
)
from ehr_transformer.modeling_ehr import (  # noqa: E402
    EHRTransformerForMaskedEventModeling,
    EHRTransformerForSequenceClassification,
)
from ehr_transformer.pretraining import PretrainingTrainer  # noqa: E402
from ehr_transformer.selection import embed_sequences  # noqa: E402
from ehr_transformer.tokenization_ehr import EHREventTokenizer  # noqa: E402
from ehr_transformer.training import PROBE_PENALTIES, fit_linear_probe, init_bias_to_prevalence  # noqa: E402
from ehr_transformer.utils import write_json  # noqa: E402

logger = logging.getLogger("pretraining_ablation")
OBJECTIVES = ("code", "value", "time", "feature")
PRETRAINED = {  # name -> (objectives, loss balancing, which values the value objective hides)
    "code": (("code",), "static", "random"),
    "value": (("value",), "static", "random"),
    "time": (("time",), "static", "random"),
    "feature": (("feature",), "static", "random"),
    "all_static": (OBJECTIVES, "static", "random"),
    "all_uncertainty": (OBJECTIVES, "uncertainty", "random"),
    "all_gradnorm": (OBJECTIVES, "gradnorm", "random"),
    "all_pcgrad": (OBJECTIVES, "pcgrad", "random"),
}
FOLLOW_UPS = {  # asked after the main run: run only when named in --configs, reported apart
    "value_future": (("value",), "static", "future"),  # forecast the latest hours' values from the earlier ones
}
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
METRICS = ("auroc", "auprc", "ece", "brier")


@dataclass(frozen=True)
class AblationParams:
    """Fixed before any run. Model size and pretraining follow `yaib_demo.HParams` (the main ICU benchmark)."""

    finetune_steps: int = 200  # optimiser steps at every label budget (~7 epochs at 100%, many more at 5%)
    finetune_learning_rate: float = 3e-3
    pretrain_epochs: int = 2
    time_mask_probability: float = 0.15
    min_positives: int = 2
    test_share: float = 0.25
    validation_share: float = 0.15
    logging_steps: int = 20  # per-objective losses and weights logged every this many pretraining steps
    probe_penalties: tuple[float, ...] = PROBE_PENALTIES  # C grid of the linear probe
    probe_folds: int = 5  # cross-validation folds for the probe's C (fewer where there are fewer positives)
    # (the probe is `ehr_transformer.training.fit_linear_probe`)


def fraction_key(fraction: float) -> str:
    return str(float(fraction))  # "0.05", ..., "1.0"


def stratified_subset(ids: np.ndarray, y: np.ndarray, fraction: float, minimum_positives: int, seed: int):
    """A `fraction` of `ids`, stratified by `y`, with at least `minimum_positives` positives (seeded)."""
    if fraction >= 1.0:
        return np.sort(ids)
    rng = np.random.default_rng(seed)
    pos, neg = ids[y == 1], ids[y == 0]
    n_pos = min(len(pos), max(minimum_positives, round(fraction * len(pos))))
    n_neg = max(1, round(fraction * len(neg)))
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]))


def pretrain_backbone(hp: HParams, ap: AblationParams, tokenizer, corpus, objectives, balancing: str,
                      value_mask_strategy: str, seed: int, device: str = "cpu"):
    """Pretrain with the package's `PretrainingTrainer`; returns (backbone state dict, last logged losses/weights)."""
    from datasets import Dataset
    from transformers import TrainingArguments

    torch.manual_seed(seed)
    config = model_config(hp, tokenizer, pretraining_objectives=list(objectives))
    model = EHRTransformerForMaskedEventModeling._from_config(config, attn_implementation="sdpa")
    collator = DataCollatorForMaskedEventModeling(
        tokenizer, mlm_probability=hp.mlm_probability, value_mask_probability=hp.value_mask_probability,
        time_mask_probability=ap.time_mask_probability, return_teacher_inputs="feature" in objectives,
        value_mask_strategy=value_mask_strategy,
    )
    dataset = Dataset.from_list(
        [{k: v.tolist() for k, v in f.items()} | {"length": len(f["input_ids"])} for f in corpus]
    )
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir, num_train_epochs=ap.pretrain_epochs, per_device_train_batch_size=hp.batch_size,
            learning_rate=hp.pretrain_learning_rate, weight_decay=0.01, warmup_steps=0.1, max_grad_norm=1.0,
            lr_scheduler_type="linear", logging_steps=ap.logging_steps, save_strategy="no", report_to=[],
            use_cpu=device == "cpu",
            seed=seed, data_seed=seed, dataloader_num_workers=0, train_sampling_strategy="group_by_length",
            disable_tqdm=True,
        )  # fmt: skip
        trainer = PretrainingTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=collator, loss_balancing=balancing
        )
        trainer.train()
    logs = [row for row in trainer.state.log_history if any(k.endswith("_weight") for k in row)]
    state = {k: v.cpu() for k, v in model.model.state_dict().items()}
    return copy.deepcopy(state), (logs[-1] if logs else {})


def classifier(hp: HParams, tokenizer, seed: int, backbone=None, device: str = "cpu"):
    """The classification model, its backbone random (seeded) or loaded from `backbone`."""
    torch.manual_seed(seed)
    config = model_config(hp, tokenizer, num_labels=1, problem_type="multi_label_classification")
    model = EHRTransformerForSequenceClassification._from_config(config, attn_implementation="sdpa")
    if backbone is not None:
        model.model.load_state_dict(backbone)
    return model.to(device)


def finetune(hp: HParams, ap: AblationParams, tokenizer, fit, seed: int, backbone=None, device: str = "cpu"):
    """A fixed number of steps on `fit` (no early stopping), bias at the prevalence; returns the model."""
    model = classifier(hp, tokenizer, seed, backbone, device)
    init_bias_to_prevalence(model, [f["labels"] for f in fit])
    collator = DataCollatorForEventClassification(tokenizer)
    optimizer, scheduler = optimizer_for(model, ap.finetune_learning_rate, hp.weight_decay, ap.finetune_steps)
    rng = np.random.default_rng(seed)
    model.train()
    step = 0
    while step < ap.finetune_steps:
        order = rng.permutation(len(fit))
        for start in range(0, len(order), hp.batch_size):
            idx = order[start : start + hp.batch_size]
            if len(idx) < 2 and len(order) > 1:  # a lone last row makes a noisy step
                continue
            loss = model(**{k: v.to(device) for k, v in collator([fit[i] for i in idx]).items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= ap.finetune_steps:
                break
    return model


class Ablation:
    def __init__(self, args, hp: HParams, ap: AblationParams):
        self.args, self.hp, self.ap = args, hp, ap
        self.records: list[dict] = []
        self.pretraining_logs: list[dict] = []
        self.choices: list[dict] = []

    def load(self) -> None:
        root = Path(self.args.data)
        mortality_ids = los_ids = mimic_ids = None
        if self.args.quick:
            mortality_ids, los_ids, mimic_ids = quick_subset(root, 0)
        self.mortality = load_cohort(root, "mortality24", "eicu_demo", mortality_ids)
        self.los = load_cohort(root, "los", "eicu_demo", los_ids)
        self.mimic = load_cohort(root, "mortality24", "mimic_demo", mimic_ids)

    def features(self, tokenizer, events, labels) -> tuple[list, np.ndarray, pl.DataFrame]:
        """(per-row tensors for the fine-tuned models, labels, the encoded rows for the probe's embeddings)."""
        labels = labels.sort("subject_id")
        encoded = tokenizer.encode_events(restrict(events, labels["subject_id"]), labels=labels)
        if not encoded["subject_id"].equals(labels["subject_id"]):
            raise RuntimeError("encoded rows do not match the label rows one to one")
        y = encoded["boolean_value"].cast(pl.Int64).to_numpy()
        return to_features(encoded, y), y, encoded

    def record(self, **row) -> None:
        row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
        self.records.append(row)
        logger.info("  %s", json.dumps(row))

    def run_seed(self, seed: int) -> None:
        from sklearn.model_selection import train_test_split

        args, hp, ap, device = self.args, self.hp, self.ap, self.args.device
        labels = self.mortality.labels.sort("subject_id")
        ids, y_all = labels["subject_id"].to_numpy(), labels["boolean_value"].cast(pl.Int64).to_numpy()
        train, test = train_test_split(ids, test_size=ap.test_share, random_state=seed, stratify=y_all)
        y_train = y_all[np.searchsorted(ids, train)]
        fit, val = train_test_split(train, test_size=ap.validation_share, random_state=seed, stratify=y_train)
        y_fit = y_all[np.searchsorted(ids, fit)]
        logger.info("seed %d: %d fitting / %d validation / %d test stays", seed, len(fit), len(val), len(test))

        tokenizer = EHREventTokenizer.fit(
            restrict(self.mortality.events, train), min_code_count=hp.min_code_count, max_length=hp.max_length
        )
        los_stays = sorted(set(self.los.labels["subject_id"].to_list()) - set(test.tolist()))
        los_events = restrict(self.los.events, los_stays)
        corpus = to_features(tokenizer.encode_events(restrict(self.mortality.events, train))) + to_features(
            tokenizer.encode_events(los_events, labels=window_labels(los_events, hp.pretrain_cut_hours, set(train)))
        )
        assert not set(test.tolist()) & set(los_stays), "a test stay would be pretrained on"

        refit = tokenizer.refit_value_statistics(self.mimic.events)  # a copy: same ids, MIMIC's statistics
        splits = {  # name -> (tensors, encoded rows, the tokenizer that encoded them); y per split beside
            "val": (*self.features(tokenizer, self.mortality.events, restrict(labels, val)), tokenizer),
            "test": (*self.features(tokenizer, self.mortality.events, restrict(labels, test)), tokenizer),
            "mimic": (*self.features(tokenizer, self.mimic.events, self.mimic.labels), tokenizer),
            "mimic_refit": (*self.features(refit, self.mimic.events, self.mimic.labels), refit),
        }
        y_val, y_test, y_mimic = splits["val"][1], splits["test"][1], splits["mimic"][1]
        halves = self.mimic_halves(y_mimic, seed)
        collator = DataCollatorForEventClassification(tokenizer)

        backbones = {"scratch": None}
        for name in args.configs:
            start = time.perf_counter()
            objectives, balancing, value_mask_strategy = (PRETRAINED | FOLLOW_UPS)[name]
            backbones[name], last = pretrain_backbone(hp, ap, tokenizer, corpus, objectives, balancing,
                                                      value_mask_strategy, seed, device)
            self.pretraining_logs.append({"seed": seed, "config": name, "seconds": round(time.perf_counter() - start, 1),
                                          "corpus": len(corpus), "last_log": last})
            logger.info("  pretrained %s on %d sequences in %.0f s: %s", name, len(corpus),
                        time.perf_counter() - start, json.dumps(last))

        def run(config: str, fraction: float, fit_split: tuple, fit_ids, transfer: bool, ablation: bool) -> dict:
            """Scores `config` (the GBM, or a backbone both fine-tuned and probed); returns {head: validation AUROC}."""
            n_labels = {"n_labels": len(fit_ids), "n_positive": int(fit_split[1].sum())}
            if config == "gbm_baseline":
                start = time.perf_counter()
                baseline = TabularBaseline(kind="gbm", seed=seed).fit(
                    restrict(self.mortality.events, fit_ids), restrict(labels, fit_ids))
                p = {split: baseline.predict_proba(restrict(self.mortality.events, rows), restrict(labels, rows))
                     for split, rows in (("val", val), ("test", test))}
                p["mimic"] = baseline.predict_proba(self.mimic.events, self.mimic.labels)
                self.record(part="low_label", seed=seed, fraction=fraction_key(fraction), config=config, head=None,
                            ablation=ablation, **binary_metrics(y_test, p["test"]),
                            validation_auroc=float(binary_metrics(y_val, p["val"])["auroc"]), **n_labels,
                            seconds=time.perf_counter() - start)
                if transfer:
                    self.transfer(seed, config, None, y_mimic, halves, p_baseline=p["mimic"])
                return {}
            validation = {}
            for head in ("finetune", "probe"):
                start = time.perf_counter()
                if head == "finetune":
                    model = finetune(hp, ap, tokenizer, fit_split[0], seed, backbones[config], device)
                    logits = {split: predict(model, collator, splits[split][0], hp.batch_size) for split in splits}
                else:  # frozen backbone, logistic regression on its pooled embeddings
                    model = classifier(hp, tokenizer, seed, backbones[config], device)
                    probe = fit_linear_probe(embed_sequences(model, tokenizer, fit_split[2]), fit_split[1], seed,
                                             ap.probe_penalties, ap.probe_folds)
                    logits = {split: probe.decision_function(embed_sequences(model, splits[split][3], splits[split][2]))
                              for split in splits}
                validation[head] = binary_metrics(y_val, sigmoid(logits["val"]))["auroc"]
                self.record(part="low_label", seed=seed, fraction=fraction_key(fraction), config=config, head=head,
                            ablation=ablation, **binary_metrics(y_test, sigmoid(logits["test"])),
                            validation_auroc=float(validation[head]), **n_labels, seconds=time.perf_counter() - start)
                if transfer:
                    self.transfer(seed, config, head, y_mimic, halves,
                                  logits={"as_is": logits["mimic"], "refit": logits["mimic_refit"]})
            return validation

        for fraction in sorted(args.fractions, reverse=True):
            fit_ids = stratified_subset(fit, y_fit, fraction, ap.min_positives, seed)
            fit_split = self.features(tokenizer, self.mortality.events, restrict(labels, fit_ids))
            everyone = fraction in args.ablation_fractions or fraction >= 1.0
            configs = ["gbm_baseline", "scratch", *args.configs] if everyone else ["gbm_baseline", "scratch"]
            if not everyone:
                configs.append(self.choice["pretrained_best"])
            validation = {c: run(c, fraction, fit_split, fit_ids, fraction >= 1.0, everyone) for c in configs}
            if fraction >= 1.0:  # runs first: the objective combination is chosen on validation at 100% of labels
                best = max(args.configs, key=lambda c: max(validation[c].values()))
                self.choice = {"seed": seed, "pretrained_best": best, "heads": {},
                               "validation_auroc": {c: {h: round(float(v), 4) for h, v in validation[c].items()}
                                                    for c in args.configs}}
                self.choices.append(self.choice)
            best = self.choice["pretrained_best"]
            head = max(validation[best], key=validation[best].get)  # at every budget, on validation
            self.choice["heads"][fraction_key(fraction)] = head
            logger.info("  seed %d, %s labels: pretrained_best = %s, %s (validation AUROC %.3f)", seed,
                        fraction_key(fraction), best, head, validation[best][head])

    @staticmethod
    def mimic_halves(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        from sklearn.model_selection import StratifiedKFold

        return list(StratifiedKFold(2, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))

    def transfer(self, seed, config, head, y, halves, p_baseline=None, logits=None) -> None:
        """MIMIC scores of a 100%-label model: the GBM's probabilities as they are; a transformer's logits as they
        are and after each distribution-calibration step."""
        tag = {"part": "transfer", "seed": seed, "config": config, "head": head}
        if logits is None:
            self.record(**tag, variant="uncalibrated", **binary_metrics(y, p_baseline))
            return

        def cross_fitted(z: np.ndarray) -> np.ndarray:
            out = np.zeros_like(z)
            for fit_rows, apply_rows in halves:
                temperature = fit_temperature(z[fit_rows], y[fit_rows])
                out[apply_rows] = z[apply_rows] / temperature
            return out

        variants = {
            "uncalibrated": logits["as_is"],
            "values_refit": logits["refit"],
            "temperature_only": cross_fitted(logits["as_is"]),
            "calibrated": cross_fitted(logits["refit"]),
        }
        for variant, z in variants.items():
            self.record(**tag, variant=variant, **binary_metrics(y, sigmoid(z)))


def summarize(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr, ddof=1)) if np.isfinite(arr).sum() > 1 else 0.0,
            "n": int(np.isfinite(arr).sum())}


def row_name(record: dict) -> str:
    """A record's column in the tables: the configuration, `+probe` for its linear probe."""
    return f"{record['config']}+probe" if record.get("head") == "probe" else record["config"]


def tables(records: list[dict], choices: list[dict]) -> dict:
    """The issue's shape: {"low_label": {FRACTION: {CONFIG: {metric: {mean, std}}}}, "transfer": {CONFIG: ...}}.
    `pretrained_best` gathers, per seed and budget, the configuration and head chosen on that seed's validation
    split (`uncalibrated` / `calibrated` in the transfer are pretrained_best at 100% of labels)."""
    choice = {c["seed"]: c for c in choices}

    def chosen(r: dict, fraction: str) -> bool:
        c = choice.get(r["seed"])
        return c is not None and r["config"] == c["pretrained_best"] and r["head"] == c["heads"][fraction]

    low, transfer = {}, {}
    for r in records:
        if r["part"] == "low_label":
            # every configuration under its own name where all ran; the chosen one also as pretrained_best
            own = [row_name(r)] if r["ablation"] or r["config"] in ("scratch", "gbm_baseline") else []
            keys = own + (["pretrained_best"] if chosen(r, r["fraction"]) else [])
            for key in keys:
                cell = low.setdefault(r["fraction"], {}).setdefault(key, {m: [] for m in METRICS})
                for m in METRICS:
                    cell[m].append(r[m])
        else:
            name = row_name(r)
            names = [name if r["variant"] == "uncalibrated" else f"{name}+{r['variant']}"]
            if chosen(r, fraction_key(1.0)):
                names.append(r["variant"] if r["variant"] in ("uncalibrated", "calibrated") else f"pretrained_best+{r['variant']}")
                if r["variant"] == "uncalibrated":
                    names.append("pretrained_best")
            for key in names:
                cell = transfer.setdefault(key, {m: [] for m in METRICS})
                for m in METRICS:
                    cell[m].append(r[m])
    fold = lambda block: {c: {m: summarize(v) for m, v in cell.items()} for c, cell in block.items()}  # noqa: E731
    return {"low_label": {f: fold(block) for f, block in sorted(low.items(), key=lambda kv: float(kv[0]))},
            "transfer": fold(transfer)}


def paired_differences(records: list[dict], choices: list[dict]) -> dict:
    """Per seed, on the same test stays: `pretrained_best` minus each reference at every label budget (AUROC), and
    on the transfer each calibration step minus `uncalibrated` (ECE, AUROC). Each entry: mean, sd, the per-seed
    differences and how many seeds are above zero."""

    def summary(diffs: list[float]) -> dict:
        return summarize(diffs) | {"n_above_zero": int(sum(d > 0 for d in diffs)),
                                   "per_seed": [round(float(d), 5) for d in diffs]}

    ordered = sorted(choices, key=lambda c: c["seed"])
    out = {}
    for fraction in sorted({r["fraction"] for r in records if r["part"] == "low_label"}, key=float):
        diffs = {reference: [] for reference in ("scratch", "scratch+probe", "gbm_baseline")}
        for c in ordered:
            rows = {row_name(r): r for r in records
                    if r["part"] == "low_label" and r["seed"] == c["seed"] and r["fraction"] == fraction}
            best = rows[f"{c['pretrained_best']}+probe" if c["heads"][fraction] == "probe" else c["pretrained_best"]]
            for reference, values in diffs.items():
                values.append(best["auroc"] - rows[reference]["auroc"])
        for reference, values in diffs.items():
            out[f"low_label/{fraction}/auroc/pretrained_best_minus_{reference}"] = summary(values)
    transfer = {}
    for c in ordered:
        head = c["heads"][fraction_key(1.0)]
        rows = {r["variant"]: r for r in records if r["part"] == "transfer" and r["seed"] == c["seed"]
                and r["config"] == c["pretrained_best"] and r["head"] == head}
        for variant in ("values_refit", "temperature_only", "calibrated"):
            for metric in ("ece", "auroc"):
                key = f"transfer/{metric}/pretrained_best_{variant}_minus_uncalibrated"
                transfer.setdefault(key, []).append(rows[variant][metric] - rows["uncalibrated"][metric])
    return out | {key: summary(values) for key, values in transfer.items()}


def markdown_tables(results: dict) -> str:
    """The README's tables: AUROC by label budget, and the transfer with and without calibration."""
    cell = lambda c, m: f"{c[m]['mean']:.3f} ± {c[m]['std']:.3f}"  # noqa: E731
    fractions = list(results["low_label"])
    configs = ["gbm_baseline", "scratch", "scratch+probe", "pretrained_best",
               *(f"{c}{head}" for c in PRETRAINED for head in ("", "+probe"))]
    lines = ["| configuration | " + " | ".join(f"{float(f):.0%} labels" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for config in configs:
        row = [cell(results["low_label"][f][config], "auroc") if config in results["low_label"][f] else ""
               for f in fractions]
        if not any(row):  # a configuration this run did not train
            continue
        lines.append(f"| {config} | " + " | ".join(row) + " |")
    lines += ["", "| eICU → MIMIC | AUROC | AUPRC | Brier | ECE |", "|---|---|---|---|---|"]
    for key in ["gbm_baseline", "scratch", "scratch+calibrated", "scratch+probe", "scratch+probe+calibrated",
                "uncalibrated", "pretrained_best+values_refit", "pretrained_best+temperature_only", "calibrated",
                *(f"{c}{head}{v}" for c in PRETRAINED for head in ("", "+probe") for v in ("", "+calibrated"))]:
        if key in results["transfer"]:
            c = results["transfer"][key]
            lines.append(f"| {key} | " + " | ".join(cell(c, m) for m in ("auroc", "auprc", "brier", "ece")) + " |")
    return "\n".join(lines)


def plot_learning_curve(results: dict, path: Path) -> None:
    from ehr_transformer.evaluation import _new_figure, _save_figure_atomic

    fig = _new_figure((6.0, 4.2))
    ax = fig.subplots()
    fractions = list(results["low_label"])
    for config, style in (("gbm_baseline", "s--"), ("scratch", "o:"), ("scratch+probe", "v:"),
                          ("pretrained_best", "D-")):
        xs = [float(f) for f in fractions if config in results["low_label"][f]]
        cells = [results["low_label"][f][config]["auroc"] for f in fractions if config in results["low_label"][f]]
        if not xs:
            continue
        means, stds = np.array([c["mean"] for c in cells]), np.array([c["std"] for c in cells])
        ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=config)
    ax.set_xscale("log")
    ax.set_xticks([float(f) for f in fractions], [f"{float(f):.0%}" for f in fractions])
    ax.set_xlabel("share of eICU training labels")
    ax.set_ylabel("test AUROC (mean ± sd over seeds)")
    ax.set_title("mortality24, eICU demo: learning curve")
    ax.legend()
    _save_figure_atomic(fig, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/yaib_demo", help="the yaib_demo folder")
    parser.add_argument("--output", default="ablation.json")
    parser.add_argument("--plot", default=None, help="learning-curve PNG (default: next to --output)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                        help="label budgets; 1.0 is always run (it chooses pretrained_best and gives the transfer)")
    parser.add_argument("--ablation-fractions", type=float, nargs="+", default=[0.1, 1.0],
                        help="label budgets at which every configuration runs (the others: scratch, gbm, best)")
    parser.add_argument("--configs", nargs="+", default=list(PRETRAINED), choices=[*PRETRAINED, *FOLLOW_UPS])
    parser.add_argument("--pretrain-epochs", type=float, default=None,
                        help=f"pretraining epochs of every backbone (default {AblationParams.pretrain_epochs})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the transformers train and predict (cpu, cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny subset and model, one seed (smoke test)")
    parser.add_argument("--merge", nargs="+", default=None, help="combine the JSON outputs of one-seed runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1
    args.fractions = sorted(set(args.fractions) | {1.0})
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_logging()
    output = Path(args.output)
    plot = Path(args.plot) if args.plot else output.with_name(output.stem + "_learning_curve.png")
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        records = [r for p in parts for r in p["meta"]["records"]]
        choices = [c for p in parts for c in p["meta"]["choices"]]
        seeds = [c["seed"] for c in choices]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"--merge: a seed appears in more than one of {args.merge}; it would count twice")
        results = tables(records, choices)
        meta = copy.deepcopy(parts[0]["meta"])
        meta.update(records=records, choices=choices, seeds=sorted({s for p in parts for s in p["meta"]["seeds"]}),
                    pretraining_logs=[x for p in parts for x in p["meta"]["pretraining_logs"]],
                    seconds=round(sum(p["meta"]["seconds"] for p in parts), 1),
                    parts=[{"command": p["meta"]["command"], "seconds": p["meta"]["seconds"],
                            "machine": p["meta"]["machine"]} for p in parts],
                    command=" ".join(["python", "benchmarks/pretraining_ablation.py", *(sys.argv[1:] if argv is None else argv)]),
                    paired_differences=paired_differences(records, choices))
        results["meta"] = meta
        write_json(output, results)
        plot_learning_curve(results, plot)
        print(markdown_tables(results))
        for key, d in meta["paired_differences"].items():
            print(f"{key}: {d['mean']:+.3f} ± {d['std']:.3f} (above zero in {d['n_above_zero']} of {d['n']})")
        return results

    require_data(args.data)
    from threadpoolctl import threadpool_limits
    from yaib_demo import QUICK

    torch.set_num_threads(args.threads)
    hp = replace(HParams(), **QUICK) if args.quick else HParams()
    ap = replace(AblationParams(), finetune_steps=4, pretrain_epochs=1, logging_steps=4) if args.quick else AblationParams()
    if args.pretrain_epochs is not None:
        ap = replace(ap, pretrain_epochs=args.pretrain_epochs)
    load_start = os.getloadavg()
    start = time.perf_counter()
    bench = Ablation(args, hp, ap)
    with threadpool_limits(limits=args.threads):
        bench.load()
        for s in range(args.seeds):
            bench.run_seed(args.seed + s)
    results = tables(bench.records, bench.choices)
    results["meta"] = {
        "command": " ".join(["python", "benchmarks/pretraining_ablation.py", *(sys.argv[1:] if argv is None else argv)]),
        "seconds": round(time.perf_counter() - start, 1),
        "seeds": list(range(args.seed, args.seed + args.seeds)),
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "load_average_at_start": [round(x, 2) for x in load_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "protocol": __doc__.split("Protocol (")[1].strip(),
        "hyperparameters": {"model": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(hp).items()},
                            "ablation": asdict(ap)},
        "choices": bench.choices,
        "paired_differences": paired_differences(bench.records, bench.choices),
        "pretraining_logs": bench.pretraining_logs,
        "records": bench.records,
    }
    write_json(output, results)
    plot_learning_curve(results, plot)
    logger.info("wrote %s in %.0f s", output, results["meta"]["seconds"])
    return results


if __name__ == "__main__":
    main()
