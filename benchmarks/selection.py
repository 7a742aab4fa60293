"""Choosing a checkpoint: what does `ehr-transformer select`'s first choice cost a user, on a zoo like a hub's?

    python -m benchmarks.selection --part zoo --work W        # pretrain the zoo's candidates into W/zoo
    python -m benchmarks.selection --part synthetic_a --work W  # three synthetic users
    python -m benchmarks.selection --part synthetic_b --work W  # three more
    python -m benchmarks.selection --part real --work W       # eICU demo and PhysioNet 2012 set A
    python -m benchmarks.selection --merge                    # benchmarks/results/selection.json

A user part builds the candidates it is missing, so any part runs alone; sharing `--work` builds them once. Each
part writes `benchmarks/results/selection/<part>.json`; `--merge` joins the user parts into
`benchmarks/results/selection.json` and recomputes every summary figure from the users.

Protocol (written before any user was scored; the zoo and the users below are not changed after):

- The zoo (`ZOO`, eleven candidates) differs the way checkpoints on a hub differ. Code systems: synthetic
  hospitals that write diagnoses and procedures in another system (`ICD9CM`/`ICD9PCS` instead of
  `ICD10CM`/`ICD10PCS`), labs under local codes (`LAB` instead of `LOINC`), medications in another vocabulary
  (`NDC` instead of `RXNORM`), and the real sources' own codes (`YAIB//` for the eICU and MIMIC demo cohorts,
  `PHYSIONET//` for PhysioNet 2012). Populations: an elderly emergency population dying of its history, a young
  elective one. Corpus size: the general hospital at 300 and 3,000 subjects (others 1,500). Model size: the
  general hospital with a 128-wide, 4-layer model (others the package default, 64 wide and 2 layers). Real
  sources: the eICU demo, the MIMIC demo (99 stays) and PhysioNet 2012 set A. Every candidate is pretrained
  with the package's `pretrain` and its recipe (`recipe_training_arguments(stage="pretrain")`) on its cohort's
  training split; a real source's held-out and tuning stays are never in a checkpoint.
- The users (`USERS`, eight), each a MEDS dataset of which the user labels 20% of the training subjects. Six
  synthetic hospitals (1,000 subjects, plus a second cohort of 1,000 from the same hospital for evaluation) with
  seeds no candidate and no test of the selector used; two real: the eICU demo (mortality after 24 h) and
  PhysioNet 2012 set A (in-hospital death). None was used to design the selector; its formula is the package's.
- The selector sees the user's training split and its labelled share (the subjects the package's
  `label_fraction` draw picks at seed 0), exactly what `ehr-transformer select --labels` gets.
- The truth per (user, candidate): the package's recommended few-label recipe (docs/fine-tuning.md: the linear
  probe, `finetune --linear_probe --label_fraction 0.2`) at seeds 0, 1 and 2 (each seed draws its own 20% of
  the training subjects), AUROC of `predict_dataset` on the evaluation subjects (the user's tuning and
  held-out splits, and the second cohort for synthetic users), mean over seeds. Its standard error and the paired
  errors of differences combine a subject bootstrap (the same resamples for every candidate) with the seeds'
  variance / 3.
- Strategies, each picking one candidate per user: the selector's first choice; `random` (its regret is the
  mean over candidates); `largest_corpus` (most pretraining events); `same_code_system` (the candidate whose
  code systems, the part of a code before `//`, overlap most with the user's by Jaccard index, ties to the
  larger corpus). Regret = best candidate's AUROC minus the chosen one's.
- Within noise: the choice's AUROC is within two standard errors of its paired difference from the best.
- Codes the outcome depends on: `outcome_codes` of the package's selector computed on *all* the user's labelled
  rows (training, tuning and held-out; the selector itself sees only its 20%); a candidate lacks them when it
  knows less than half of their association weight. Counted: users whose first choice lacks them while another
  candidate has them.
- Goal (issue 23): mean regret of the first choice at most 0.01 AUROC and at most a third of random's; no user
  whose first choice lacks the outcome's codes while another candidate has them.

Model sizes and cohorts are small so that the whole benchmark fits about an hour and a half of the 2-core
development machine; the JSON records each part's wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import common

NAME = "selection"
RESULTS = common.REPO_ROOT / "benchmarks" / "results"
PART_DIR = RESULTS / NAME
LABEL_FRACTION = 0.2
SEEDS = (0, 1, 2)
BOOTSTRAP = 500
MAX_LENGTH = 256
USER_SUBJECTS = 1000
LACKS_BELOW = 0.5  # a candidate lacks the outcome's codes when it knows less than this share of their weight
STRATEGIES = ("selector", "random", "largest_corpus", "same_code_system")


@dataclass(frozen=True)
class Candidate:
    """One checkpoint of the zoo: its cohort (a synthetic hospital or a real source) and model size."""

    name: str
    source: str = "synthetic"  # or a real cohort: eicu_demo, mimic_demo, physionet2012
    profile: dict = field(default_factory=dict)  # HospitalProfile fields (synthetic)
    subjects: int = 1500  # synthetic cohort size (a real source brings its own)
    seed: int = 0
    hidden_size: int = 64
    layers: int = 2


@dataclass(frozen=True)
class User:
    """One test user: a synthetic hospital or a real cohort, with the outcome it predicts."""

    name: str
    source: str = "synthetic"
    profile: dict = field(default_factory=dict)
    seed: int = 0


ICD9 = {"ICD10CM": "ICD9CM", "ICD10PCS": "ICD9PCS"}
ELDERLY = {
    "age_shift": 15.0,
    "severity_scale": 1.5,
    "emergency_share": 0.85,
    "mortality_mechanism": "history",
}
ZOO = (
    Candidate("general_3000", subjects=3000, seed=70100),
    Candidate("general_300", subjects=300, seed=70200),
    Candidate("general_wide", seed=70300, hidden_size=128, layers=4),
    Candidate("icd9", profile={"code_systems": ICD9}, seed=70400),
    Candidate("local_labs", profile={"code_systems": {"LOINC": "LAB"}}, seed=70500),
    Candidate("ndc_medications", profile={"code_systems": {"RXNORM": "NDC"}}, seed=70600),
    Candidate("elderly_emergency", profile=ELDERLY, seed=70700),
    Candidate(
        "young_elective",
        profile={"age_shift": -20.0, "severity_scale": 0.7, "emergency_share": 0.3},
        seed=70800,
    ),
    Candidate("eicu_demo", source="eicu_demo"),
    Candidate("mimic_demo", source="mimic_demo"),
    Candidate("physionet2012", source="physionet2012"),
)
USERS = (
    User("general", seed=80100),
    User("icd9_older", profile={"code_systems": ICD9, "age_shift": 8.0}, seed=80200),
    User("local_labs_sicker", profile={"code_systems": {"LOINC": "LAB"}, "severity_scale": 1.3}, seed=80300),
    User(
        "ndc_history",
        profile={"code_systems": {"RXNORM": "NDC"}, "mortality_mechanism": "history"},
        seed=80400,
    ),
    User(
        "elderly_emergency",
        profile={
            "age_shift": 12.0,
            "severity_scale": 1.4,
            "emergency_share": 0.8,
            "mortality_mechanism": "history",
        },
        seed=80500,
    ),
    User("icd9_local_labs", profile={"code_systems": {**ICD9, "LOINC": "LAB"}}, seed=80600),
    User("eicu_demo", source="eicu_demo"),
    User("physionet2012", source="physionet2012"),
)
PARTS = {
    "zoo": (),
    "synthetic_a": ("general", "icd9_older", "local_labs_sicker"),
    "synthetic_b": ("ndc_history", "elderly_emergency", "icd9_local_labs"),
    "real": ("eicu_demo", "physionet2012"),
}
REAL_TASK = {"eicu_demo": "mortality24", "mimic_demo": "mortality24", "physionet2012": "in_hospital_death"}


# ---------------------------------------------------------------------------------------------------- data
def real_cohort(source: str, work: Path) -> Path:
    """The MEDS folder of a real source, converted once by the package's converters (70/15/15 by stay, seed 0)."""
    out = work / "real" / source
    if (out / "metadata" / "dataset.json").is_file():
        return out
    if source == "physionet2012":
        from ehr_transformer.data.long import convert_long, preset

        folder = common.SHARED_DATA / "physionet2012"
        tables = (folder / "set-a.parquet", folder / "outcomes-a.parquet")
        convert_long(*tables, out, **preset("physionet2012"), seed=0, overwrite=True)
    else:
        from ehr_transformer.data.wide import convert_wide

        folder = common.SHARED_DATA / "yaib_demo" / "mortality24" / source
        tables = [folder / f"{name}.parquet" for name in ("dyn", "sta", "outc")]
        convert_wide(*tables, out, task="mortality24", seed=0, overwrite=True)
    return out


def synthetic_cohort(path: Path, subjects: int, seed: int, profile: dict, name: str) -> Path:
    from ehr_transformer.data.synthetic import HospitalProfile, write_synthetic_meds

    if (path / "metadata" / "dataset.json").is_file():
        return path
    return write_synthetic_meds(
        path, subjects, seed=seed, profile=HospitalProfile(name=name, **profile), overwrite=True
    )


def corpus_events(data_dir: Path) -> tuple[int, int]:
    """(subjects, events but MEDS_BIRTH) of a MEDS folder's training split: what pretraining read."""
    import polars as pl

    frame = pl.scan_parquet(data_dir / "data" / "train" / "*.parquet").filter(pl.col("code") != "MEDS_BIRTH")
    counts = frame.select(pl.col("subject_id").n_unique(), pl.len()).collect().row(0)
    return int(counts[0]), int(counts[1])


def build_candidate(candidate: Candidate, work: Path) -> dict:
    """Pretrain `candidate` into work/zoo/<name> with the package's recipe (skipped when already there); returns
    its description: cohort, corpus size, model size, code systems and pretraining seconds."""
    import json

    out = work / "zoo" / candidate.name
    described = out / "zoo_candidate.json"
    if described.is_file():
        return json.loads(described.read_text())
    from ehr_transformer.training.arguments import (
        DataArguments,
        ModelArguments,
        PretrainingArguments,
        recipe_training_arguments,
    )
    from ehr_transformer.training.pretrain import pretrain

    started = time.perf_counter()
    if candidate.source == "synthetic":
        data = synthetic_cohort(
            work / "data" / candidate.name,
            candidate.subjects,
            candidate.seed,
            candidate.profile,
            candidate.name,
        )
    else:
        data = real_cohort(candidate.source, work)
    pretrain(
        DataArguments(data_dir=str(data), cache_dir=str(work / "cache"), max_length=MAX_LENGTH),
        ModelArguments(
            hidden_size=candidate.hidden_size,
            num_hidden_layers=candidate.layers,
            intermediate_size=4 * candidate.hidden_size,
        ),
        PretrainingArguments(),
        recipe_training_arguments(
            out, stage="pretrain", seed=0, use_cpu=True, disable_tqdm=True, save_strategy="no"
        ),
    )
    subjects, events = corpus_events(data)
    entry = {
        **dataclasses.asdict(candidate),
        "path": str(out),
        "corpus_subjects": subjects,
        "corpus_events": events,
        "code_systems": sorted(code_systems(vocabulary(out))),
        "pretraining_s": round(time.perf_counter() - started, 1),
    }
    from ehr_transformer.utils import write_json

    write_json(described, entry)
    print(f"pretrained {candidate.name} in {entry['pretraining_s']:.0f} s", flush=True)
    return entry


def vocabulary(checkpoint: Path) -> list[str]:
    from ehr_transformer.tokenization_ehr import EHREventTokenizer

    return list(EHREventTokenizer.from_pretrained(checkpoint).vocab)


def code_systems(codes) -> set[str]:
    """The code systems of a set of codes: the part before `//` (codes without one and MEDS codes aside)."""
    return {c.split("//")[0] for c in codes if "//" in c and not c.startswith("MEDS_")}


def user_cohort(user: User, work: Path) -> tuple[Path, Path, list[tuple[Path, str]]]:
    """(MEDS folder, label file, evaluation (folder, split) pairs) of a user."""
    if user.source != "synthetic":
        data = real_cohort(user.source, work)
        return (
            data,
            data / "labels" / f"{REAL_TASK[user.source]}.parquet",
            [(data, "tuning"), (data, "held_out")],
        )
    data = synthetic_cohort(work / "users" / user.name, USER_SUBJECTS, user.seed, user.profile, user.name)
    second = synthetic_cohort(
        work / "users" / f"{user.name}_second", USER_SUBJECTS, user.seed + 1, user.profile, user.name
    )
    evaluation = [(data, "tuning"), (data, "held_out")] + [
        (second, s) for s in ("train", "tuning", "held_out")
    ]
    return data, data / "labels" / f"{common.TASK}.parquet", evaluation


def labelled_share(labels: Path, data: Path, seed: int = 0):
    """The label rows of the user's labelled training subjects: `LABEL_FRACTION` of them, drawn by the package's
    `draw_subjects`, as `finetune --label_fraction` draws them."""
    import polars as pl

    from ehr_transformer.data.dataset import draw_subjects
    from ehr_transformer.data.labels import read_labels
    from ehr_transformer.data.splits import read_subject_splits

    train = read_subject_splits(data).filter(pl.col("split") == "train")["subject_id"]
    rows = read_labels(labels).filter(pl.col("subject_id").is_in(train.implode()))
    chosen = draw_subjects(rows["subject_id"].to_numpy(), LABEL_FRACTION, seed)
    return rows.filter(pl.col("subject_id").is_in(pl.Series(chosen).implode()))


# --------------------------------------------------------------------------------------------------- truth
def probe_predictions(checkpoint: Path, data: Path, labels: Path, evaluation, work: Path):
    """The package's few-label recipe (`finetune` with `linear_probe` and `label_fraction`) once per seed; the
    `(seeds, N)` `predict_dataset` probabilities on the evaluation rows, their `(N,)` labels and subject index."""
    import shutil

    import numpy as np

    from ehr_transformer.inference import predict_dataset
    from ehr_transformer.tokenization_ehr import EHREventTokenizer
    from ehr_transformer.training.arguments import (
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        recipe_training_arguments,
    )
    from ehr_transformer.training.finetune import finetune

    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    datasets_, y, clusters = common.evaluation_rows(evaluation, tokenizer, task=labels.stem)
    out = work / "probe"
    probabilities = []
    for seed in SEEDS:
        model = finetune(
            DataArguments(
                data_dir=str(data), labels=str(labels), cache_dir=str(work / "cache"), max_length=MAX_LENGTH
            ),
            ModelArguments(model_name_or_path=str(checkpoint)),
            FinetuningArguments(linear_probe=True, label_fraction=LABEL_FRACTION),
            recipe_training_arguments(out, stage="finetune", seed=seed, use_cpu=True, disable_tqdm=True),
        )
        probabilities.append(np.concatenate([predict_dataset(model, d, tokenizer) for d in datasets_]))
        shutil.rmtree(out, ignore_errors=True)
    return np.stack(probabilities), y, clusters


def truth_with_errors(probabilities, labels, clusters, n_boot: int, seed: int) -> dict:
    """Mean AUROC over seeds per candidate, its standard error and the paired standard errors of differences.

    probabilities: `(C, S, N)` for C candidates, S seeds, N evaluation rows; labels `(N,)`; clusters `(N,)` subject
    index. Variance = bootstrap over subjects (the same resamples for every candidate) + the seeds' variance / S."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    n_cand, n_seeds, _ = probabilities.shape
    auc = np.array([[roc_auc_score(labels, p) for p in cand] for cand in probabilities])  # (C, S)
    mean_probability = probabilities.mean(axis=1)  # (C, N): the bootstrap scores the seeds' mean ranking
    rng = np.random.default_rng(seed)
    n_clusters = int(clusters.max()) + 1
    boot = np.empty((n_boot, n_cand))
    for b in range(n_boot):
        weights = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)[clusters]
        boot[b] = [roc_auc_score(labels, p, sample_weight=weights) for p in mean_probability]
    seed_var = auc.var(axis=1, ddof=1) / n_seeds if n_seeds > 1 else np.zeros(n_cand)
    diff_var = np.array(
        [[np.var(boot[:, i] - boot[:, j], ddof=1) for j in range(n_cand)] for i in range(n_cand)]
    )
    diff_se = np.sqrt(diff_var + seed_var[:, None] + seed_var[None, :])
    np.fill_diagonal(diff_se, 0.0)
    return {
        "auroc": auc.mean(axis=1),
        "auroc_by_seed": auc,
        "se": np.sqrt(boot.var(axis=0, ddof=1) + seed_var),
        "diff_se": diff_se,
    }


# -------------------------------------------------------------------------------------------------- judging
def strategy_choices(candidates: list[dict], user_systems: set[str]) -> dict[str, int | None]:
    """Index of the candidate each strategy picks (`random` has none: its regret is the mean)."""

    def jaccard(c):
        systems = set(c["code_systems"])
        union = systems | user_systems
        return len(systems & user_systems) / len(union) if union else 0.0

    return {
        "selector": min(range(len(candidates)), key=lambda i: candidates[i]["rank"]),
        "random": None,
        "largest_corpus": max(range(len(candidates)), key=lambda i: (candidates[i]["corpus_events"], -i)),
        "same_code_system": max(
            range(len(candidates)), key=lambda i: (jaccard(candidates[i]), candidates[i]["corpus_events"], -i)
        ),
    }


def judge_user(candidates: list[dict], diff_se, user_systems: set[str]) -> dict:
    """Regret of every strategy, whether the selector's choice is within noise of the best, and whether it lacks
    the outcome's codes while another candidate has them. `candidates` carry `auroc` and `outcome_code_share`."""
    import numpy as np

    auroc = np.array([c["auroc"] for c in candidates])
    best = int(np.argmax(auroc))
    choices = strategy_choices(candidates, user_systems)
    regret = {
        name: float(auroc[best] - (auroc.mean() if i is None else auroc[i])) for name, i in choices.items()
    }
    chosen = choices["selector"]
    lacks = [
        c["outcome_code_share"] is not None and c["outcome_code_share"] < LACKS_BELOW for c in candidates
    ]
    return {
        "best": candidates[best]["name"],
        "chosen": {name: None if i is None else candidates[i]["name"] for name, i in choices.items()},
        "regret": regret,
        "within_noise": bool(auroc[best] - auroc[chosen] <= 2 * diff_se[best, chosen]),
        "chosen_lacks_outcome_codes": bool(lacks[chosen]),
        "lacks_while_another_has": bool(lacks[chosen] and not all(lacks)),
    }


def summarize(users: list[dict]) -> dict:
    """Every summary figure, from the users (a merge recomputes them all) and the goal."""
    import numpy as np

    mean_regret = {s: float(np.mean([u["verdict"]["regret"][s] for u in users])) for s in STRATEGIES}
    lacking = sum(u["verdict"]["lacks_while_another_has"] for u in users)
    return {
        "users": len(users),
        "mean_regret": mean_regret,
        "max_regret": {s: float(np.max([u["verdict"]["regret"][s] for u in users])) for s in STRATEGIES},
        "within_noise_of_best": sum(u["verdict"]["within_noise"] for u in users),
        "first_choice_best": sum(u["verdict"]["chosen"]["selector"] == u["verdict"]["best"] for u in users),
        "lacks_outcome_codes_while_another_has": lacking,
        "goal": "mean regret of the first choice <= 0.01 AUROC and <= 1/3 of random's; no user whose first choice "
        "lacks the outcome's codes while another candidate has them",
        "goal_met": bool(
            len(users) >= 8
            and mean_regret["selector"] <= 0.01
            and mean_regret["selector"] <= mean_regret["random"] / 3
            and lacking == 0
        ),
    }


# ----------------------------------------------------------------------------------------------------- run
def score_user(user: User, zoo: list[dict], work: Path) -> dict:
    """Select for `user`, then the truth of every candidate and the verdicts."""
    import numpy as np
    import polars as pl

    from ehr_transformer.data.labels import read_labels
    from ehr_transformer.data.meds import read_events
    from ehr_transformer.selection.outcome_codes import outcome_codes, outcome_coverage
    from ehr_transformer.selection.selector import select_checkpoints

    started = time.perf_counter()
    data, labels, evaluation = user_cohort(user, work)
    few = labelled_share(labels, data)
    selection = select_checkpoints(data, [c["path"] for c in zoo], labels=few, split="train", seed=0)
    selected_s = time.perf_counter() - started
    by_path = {row["candidate"]: row for row in selection["ranking"]}
    all_rows = read_labels(labels)
    events = read_events(data, subject_ids=all_rows["subject_id"].unique().to_list())
    needed = outcome_codes(events, all_rows)  # what the outcome depends on, from all of the user's labels
    weighted = [{"code": code, "association": w} for code, w in needed]
    user_systems = code_systems(events.filter(pl.col("code") != "MEDS_BIRTH")["code"].unique().to_list())
    runs = [probe_predictions(Path(c["path"]), data, labels, evaluation, work / "truth") for c in zoo]
    truth = truth_with_errors(np.stack([r[0] for r in runs]), runs[0][1], runs[0][2], BOOTSTRAP, user.seed)
    candidates = []
    for i, c in enumerate(zoo):
        row = by_path[c["path"]]
        known = set(vocabulary(Path(c["path"])))
        share = outcome_coverage(weighted, known)[0] if weighted else None
        candidates.append(
            {
                "name": c["name"],
                "corpus_events": c["corpus_events"],
                "code_systems": c["code_systems"],
                "auroc": float(truth["auroc"][i]),
                "auroc_se": float(truth["se"][i]),
                "auroc_by_seed": [float(a) for a in truth["auroc_by_seed"][i]],
                "outcome_code_share": share,
                **{k: row.get(k) for k in SELECTOR_FIELDS},
            }
        )
    labels_y, clusters = runs[0][1], runs[0][2]
    return {
        "user": user.name,
        "source": user.source,
        "profile": user.profile,
        "evaluation_rows": int(labels_y.size),
        "evaluation_positives": int(labels_y.sum()),
        "evaluation_subjects": int(clusters.max() + 1),
        "labelled_training_subjects": int(few["subject_id"].n_unique()),
        "outcome_codes": [[code, float(w)] for code, w in needed],
        "candidates": candidates,
        "verdict": judge_user(candidates, truth["diff_se"], user_systems),
        "selector_warning": selection.get("warning"),
        "selection_s": round(selected_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }


SELECTOR_FIELDS = (
    "rank",
    "combined",
    "coverage",
    "code_coverage",
    "outcome_code_coverage",
    "fit",
    "transferability",
    "combined_interval",
    "reasons",
)


def report(entry: dict) -> None:
    v = entry["verdict"]
    print(
        f"user {entry['user']}: best {v['best']}, selector {v['chosen']['selector']} (regret "
        f"{v['regret']['selector']:.3f}; random {v['regret']['random']:.3f}, largest corpus "
        f"{v['regret']['largest_corpus']:.3f}, same code system {v['regret']['same_code_system']:.3f}); "
        f"within noise {v['within_noise']}; {entry['wall_s']:.0f} s",
        flush=True,
    )
    for c in sorted(entry["candidates"], key=lambda c: c["rank"]):
        print(
            f"    {c['rank']:>2} {c['name']:<18} combined {c['combined']:.3f} auroc {c['auroc']:.3f} "
            f"± {c['auroc_se']:.3f} outcome codes {c['outcome_code_share']}",
            flush=True,
        )


def run_part(part: str, work: Path) -> Path:
    from ehr_transformer.utils import write_json

    logging.basicConfig(level=logging.WARNING)
    common.quiet(1)  # one thread: parts run side by side on the 2 cores
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    names = PARTS[part]
    users = [u for u in USERS if u.name in names]
    needed_sources = {u.source for u in users} | {c.source for c in ZOO}
    for source in sorted(needed_sources - {"synthetic"}):
        if common.shared_data("physionet2012" if source == "physionet2012" else "yaib_demo") is None:
            raise SystemExit(
                f"{NAME}: real source {source} not found under {common.SHARED_DATA}; cannot build the zoo"
            )
    zoo = [build_candidate(c, work) for c in ZOO]
    result = {"benchmark": NAME, "part": part, "zoo": zoo, "users": []}
    for user in users:
        result["users"].append(score_user(user, zoo, work))
        report(result["users"][-1])
    result.update(common.metadata(common.command_line(NAME), started, 1))
    return write_json(PART_DIR / f"{part}.json", result)


def merge() -> Path:
    """`selection.json`: the users of every user part found, the zoo, and every summary figure recomputed."""
    import json

    from ehr_transformer.utils import write_json

    parts = [json.loads(p.read_text()) for p in sorted(PART_DIR.glob("*.json"))]
    parts = [p for p in parts if p["users"]]
    if not parts:
        raise SystemExit(f"{NAME} --merge: no user part in {PART_DIR}")
    order = [u.name for u in USERS]
    users = sorted((u for p in parts for u in p["users"]), key=lambda u: order.index(u["user"]))
    names = [u["user"] for u in users]
    if len(set(names)) != len(names):
        raise SystemExit(f"{NAME} --merge: a user is in two parts: {names}")
    return write_json(
        RESULTS / f"{NAME}.json",
        {
            "benchmark": NAME,
            "protocol": __doc__.split("Protocol")[1].strip(),
            "summary": summarize(users),
            "zoo": parts[0]["zoo"],
            "users": users,
            "parts": [
                {k: p[k] for k in ("part", "command", "wall_s", "date", "machine") if k in p} for p in parts
            ],
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("selection_work"), help="zoo, cohorts and caches")
    args = parser.parse_args(argv)
    if args.merge == (args.part is not None):
        parser.error("give either --part NAME or --merge")
    path = merge() if args.merge else run_part(args.part, args.work)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
