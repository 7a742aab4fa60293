"""Multitask pretraining: each objective learns, the EMA teacher stays out of training and of checkpoints, and each
loss balancing strategy moves its weights the way its paper says, alone and inside the Trainer."""

import json
import math

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import TrainerCallback, TrainerState, TrainingArguments, set_seed

from ehr_transformer import EHREventTokenizer, EHRTransformerConfig, EHRTransformerForMaskedEventModeling
from ehr_transformer.data.collators import DataCollatorForMaskedEventModeling
from ehr_transformer.data.synthetic import generate_synthetic_cohort
from ehr_transformer.training.objectives import (
    LOSS_BALANCING_STRATEGIES,
    TEACHER_FILE,
    EMATeacherCallback,
    GradNorm,
    PCGrad,
    UncertaintyWeighting,
    project_conflicting,
)
from ehr_transformer.training.pretrain import BALANCER_FILE, PretrainingTrainer
from ehr_transformer.training.trainer import ReproducibleMasking

ALL = ["code", "value", "time", "feature"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort():
    """A tokenizer and 48 encoded synthetic timelines of at most 48 events."""
    events = generate_synthetic_cohort(48, seed=0).events
    tokenizer = EHREventTokenizer.fit(events, min_code_count=2, max_length=48)
    features = tokenizer.encode_events(events).select("input_ids", "values", "times", "ages").to_dicts()
    return tokenizer, features


def tiny_model(tokenizer, objectives=ALL, **kwargs):
    set_seed(0)
    config = EHRTransformerConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        embedding_dropout=0.0,
        pretraining_objectives=objectives,
        **kwargs,
    )
    return EHRTransformerForMaskedEventModeling(config)


def collator(tokenizer, **kwargs):
    defaults = dict(value_mask_probability=0.3, time_mask_probability=0.2, return_teacher_inputs=True)
    return DataCollatorForMaskedEventModeling(tokenizer, **{**defaults, **kwargs})


def args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def test_every_objective_loss_decreases(cohort):
    """30 optimizer steps on one fixed masked batch of 16 synthetic timelines, the teacher following by EMA."""
    tokenizer, features = cohort
    model = tiny_model(tokenizer)
    batch = collator(tokenizer, generator=torch.Generator().manual_seed(1))(features[:16])  # fixed masks
    teacher = EMATeacherCallback(decay=0.99)
    teacher.on_train_begin(None, TrainerState(), None, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        out = model(**batch)
        history.append({name: getattr(out, f"{name}_loss").item() for name in ALL})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        teacher.on_step_end(None, TrainerState(), None, model=model)
    for name in ALL:
        assert history[-1][name] < 0.75 * history[0][name], (name, history[0], history[-1])


def test_teacher_gets_no_gradient_follows_the_student_and_is_never_saved(cohort, tmp_path):
    tokenizer, features = cohort
    model = tiny_model(tokenizer, objectives=["code", "feature"])
    trainer = PretrainingTrainer(
        model=model,
        args=args(tmp_path, max_steps=3),
        train_dataset=Dataset.from_list(features),
        data_collator=collator(tokenizer),
        ema_decay=0.5,
    )
    trainer.train()
    teacher = model.feature_teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not any(p is q for p in teacher.parameters() for q in model.parameters())
    # a backward pass through the feature loss reaches the student only
    out = model(**collator(tokenizer)(features[:8]))
    out.feature_loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.feature_head.weight.grad is not None
    # neither the state dict nor the saved folder hold the teacher
    assert set(model.state_dict()) == set(EHRTransformerForMaskedEventModeling(model.config).state_dict())
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert keys <= set(model.state_dict()) and not any("teacher" in key for key in keys)
    reloaded = EHRTransformerForMaskedEventModeling.from_pretrained(tmp_path / "saved")
    assert reloaded.feature_teacher is None


def test_ema_teacher_update_rule(cohort):
    tokenizer, _ = cohort
    model = tiny_model(tokenizer, objectives=["code", "feature"])
    callback = EMATeacherCallback(decay=0.75)
    callback.on_train_begin(None, TrainerState(), None, model=model)
    teacher = model.feature_teacher
    start = {name: p.clone() for name, p in teacher.named_parameters()}
    for name, p in model.model.named_parameters():  # the teacher starts as a copy of the student
        assert torch.equal(p, start[name]), name
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1.0)
    callback.on_step_end(None, TrainerState(), None, model=model)
    student = dict(model.model.named_parameters())
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.75 * start[name] + 0.25 * student[name])


def test_feature_objective_without_a_teacher_says_how_to_get_one(cohort):
    tokenizer, features = cohort
    model = tiny_model(tokenizer, objectives=["code", "feature"])
    with pytest.raises(ValueError, match="EMATeacherCallback"):
        model(**collator(tokenizer)(features[:4]))


def two_task_problem(noise=(0.1, 0.1), scale=(1.0, 1.0), seed=0):
    """A shared linear layer W (the "last shared layer") with one linear head per task: task k regresses
    scale_k * (x @ a_k) + noise_k * N(0, 1) from x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    targets = [
        s * (x @ torch.randn(8, generator=g)) + n * torch.randn(256, generator=g)
        for s, n in zip(scale, noise, strict=True)
    ]
    shared = torch.nn.Linear(8, 16)
    heads = torch.nn.ModuleList([torch.nn.Linear(16, 1) for _ in range(2)])

    def losses():
        h = torch.tanh(shared(x))
        return {f"t{k}": ((heads[k](h).squeeze(-1) - targets[k]) ** 2).mean() for k in range(2)}

    return shared, heads, losses


def train_balancer(balancer_class, problem, steps, lr=0.01, **options):
    shared, heads, losses = problem
    params = [*shared.parameters(), *heads.parameters()]
    balancer = balancer_class(
        ["t0", "t1"], {"t0": 1.0, "t1": 1.0}, params, list(shared.parameters()), **options
    )
    optimizer = torch.optim.Adam([*params, *balancer.parameters()], lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        balancer.backward(losses())
        optimizer.step()
        history.append(balancer.weights().clone())
    return balancer, history


def test_uncertainty_weighting_down_weights_the_noisier_task():
    torch.manual_seed(0)
    balancer, history = train_balancer(
        UncertaintyWeighting, two_task_problem(noise=(0.1, 2.0)), steps=300, lr=0.03
    )
    weights = history[-1]
    assert torch.isfinite(weights).all() and (weights > 0).all()
    assert weights[1] < 0.5 * weights[0]  # the noisy task (irreducible MSE 4) weighs far less
    assert weights[1] < 1.0 < weights[0]  # both moved from 1 in the expected direction


def test_gradnorm_raises_the_weight_of_the_task_that_trains_slower():
    torch.manual_seed(0)
    # task 1's targets are 10x smaller: its gradients are small and its loss falls slowly relative to its start
    problem = two_task_problem(scale=(1.0, 0.1), noise=(0.0, 0.0))
    balancer, history = train_balancer(GradNorm, problem, steps=60)
    weights = history[-1]
    assert torch.isfinite(weights).all() and (weights > 0).all()
    assert weights[1] > 1.0 > weights[0]
    balancer.backward(problem[2]())  # renormalises the weights to sum to K = 2 before using them
    torch.testing.assert_close(balancer.weights().sum(), torch.tensor(2.0))


def test_pcgrad_projection_removes_conflicts_and_leaves_agreement_alone():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    projected = project_conflicting(g)
    torch.testing.assert_close(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    agreeing = torch.tensor([[1.0, 0.2], [0.5, 1.0]])
    torch.testing.assert_close(project_conflicting(agreeing), agreeing)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = torch.randn(2, 50, generator=generator)
        p = project_conflicting(g, generator)
        assert p[0] @ g[1] >= -1e-5 and p[1] @ g[0] >= -1e-5  # no projected gradient opposes the other task
        if g[0] @ g[1] < 0:
            assert (p[0] @ g[1]).abs() < 1e-4 and (p[1] @ g[0]).abs() < 1e-4


def test_pcgrad_backward_writes_the_sum_of_projected_gradients():
    shared, heads, losses = two_task_problem()
    params = [*shared.parameters(), *heads.parameters()]
    balancer = PCGrad(["t0", "t1"], {"t0": 1.0, "t1": 2.0}, params, list(shared.parameters()))
    values = losses()
    rows = []
    for k, name in enumerate(["t0", "t1"]):
        grads = torch.autograd.grad((k + 1.0) * values[name], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if d is None else d).flatten()
                    for d, p in zip(grads, params, strict=True)
                ]
            )
        )
    expected = project_conflicting(torch.stack(rows)).sum(0)
    balancer.backward(values, scale=0.5)
    balancer.backward(losses(), scale=0.5)  # gradient accumulation: two halves add up
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", list(LOSS_BALANCING_STRATEGIES))
def test_trainer_logs_each_objective_under_every_strategy(cohort, tmp_path, strategy):
    tokenizer, features = cohort
    model = tiny_model(tokenizer)
    trainer = PretrainingTrainer(
        model=model,
        args=args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=Dataset.from_list(features),
        data_collator=collator(tokenizer),
        loss_balancing=strategy,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for name in ALL:
            assert math.isfinite(entry[f"{name}_loss"]) and entry[f"{name}_weight"] > 0
        # `loss` stays the static-weighted sum, whatever the strategy
        assert entry["loss"] == pytest.approx(sum(entry[f"{n}_loss"] for n in ALL), rel=1e-3)
    if strategy in ("uncertainty", "gradnorm"):  # learned weights moved from their start
        assert any(logs[-1][f"{n}_weight"] != pytest.approx(1.0, abs=1e-4) for n in ALL)
        assert len(trainer.optimizer.param_groups) == 3  # decay, no decay, balancing weights
    if strategy == "pcgrad":
        assert 0.0 <= logs[-1]["pcgrad_conflict_rate"] <= 1.0


def test_static_weights_come_from_the_config(cohort, tmp_path):
    tokenizer, features = cohort
    model = tiny_model(tokenizer, objectives=["code", "value"], objective_weights={"value": 0.25})
    trainer = PretrainingTrainer(
        model=model,
        args=args(tmp_path, max_steps=2),
        train_dataset=Dataset.from_list(features),
        data_collator=collator(tokenizer, time_mask_probability=0.0, return_teacher_inputs=False),
    )
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert log["value_weight"] == 0.25 and log["code_weight"] == 1.0
    assert "time_loss" not in log and model.time_head is None and model.feature_head is None
    with pytest.raises(ValueError, match="loss_balancing"):
        PretrainingTrainer(model=model, args=args(tmp_path), loss_balancing="magic")


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def final_weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("strategy", ["static", "gradnorm", "pcgrad"])
def test_killed_run_resumes_bit_identically_with_teacher_and_learned_weights(cohort, tmp_path, strategy):
    tokenizer, features = cohort
    dataset = Dataset.from_list(features)

    def run(output, max_steps, resume=None, stop_at=None):
        trainer = PretrainingTrainer(
            model=tiny_model(tokenizer),
            train_dataset=dataset,
            loss_balancing=strategy,
            ema_decay=0.9,
            args=args(
                output,
                max_steps=max_steps,
                save_strategy="steps",
                save_steps=3,
                logging_steps=1,
                train_sampling_strategy="group_by_length",
            ),  # as pretrain() (see trainer.py)
            data_collator=ReproducibleMasking(collator(tokenizer), seed=0),
        )
        if stop_at:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 6)
    run(tmp_path / "killed", 6, stop_at=3)  # a run killed after its checkpoint at step 3
    checkpoint = tmp_path / "killed" / "checkpoint-3"
    assert (checkpoint / TEACHER_FILE).exists()
    assert (checkpoint / BALANCER_FILE).exists() == (strategy == "gradnorm")
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        assert not any("teacher" in key for key in weights.keys())
    resumed = run(tmp_path / "killed", 6, resume=str(checkpoint))
    expected, got = final_weights(full), final_weights(resumed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    for a, b in zip(
        full.model.feature_teacher.parameters(), resumed.model.feature_teacher.parameters(), strict=True
    ):
        assert torch.equal(a, b)
    torch.testing.assert_close(full.loss_balancer.weights(), resumed.loss_balancer.weights(), rtol=0, atol=0)
    losses = [
        json.loads((tmp_path / d / "checkpoint-6" / "trainer_state.json").read_text())
        for d in ("full", "killed")
    ]
    assert [e.get("loss") for e in losses[0]["log_history"][3:6]] == [
        e.get("loss") for e in losses[1]["log_history"][3:6]
    ]


def test_pretrain_continues_from_a_checkpoint_with_its_tokenizer(synthetic_meds, tmp_path):
    import dataclasses

    from ehr_transformer.training.arguments import DataArguments, ModelArguments, PretrainingArguments
    from ehr_transformer.training.pretrain import pretrain

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    data = DataArguments(data_dir=str(synthetic_meds), cache_dir=str(tmp_path / "cache"), max_length=64)
    first = pretrain(
        dataclasses.replace(data, min_code_count=3),
        ModelArguments(**tiny),
        PretrainingArguments(),
        args(tmp_path / "first", max_steps=2),
    )
    # learning rate 0: the continued model must still hold the first model's weights
    continued = pretrain(
        dataclasses.replace(data, min_code_count=50),  # ignored: the checkpoint's tokenizer is kept
        ModelArguments(model_name_or_path=str(tmp_path / "first")),
        PretrainingArguments(objectives="code,value,time,feature", loss_balancing="uncertainty"),
        args(tmp_path / "second", max_steps=2, learning_rate=0.0),
    )
    assert continued.config.pretraining_objectives == ["code", "value", "time", "feature"]
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(continued.model.state_dict()[name], tensor), name
    saved = EHREventTokenizer.from_pretrained(tmp_path / "second")
    assert saved.vocab == EHREventTokenizer.from_pretrained(tmp_path / "first").vocab
    card = (tmp_path / "second" / "README.md").read_text()
    assert "time-gap reconstruction" in card and "uncertainty" in card and "first" in card
    with safe_open(tmp_path / "second" / "model.safetensors", "pt") as weights:
        assert not any("teacher" in key for key in weights.keys())
    other = EHREventTokenizer.fit(
        [generate_synthetic_cohort(30, seed=1).events], min_code_count=1, max_length=64
    )  # another vocabulary
    with pytest.raises(ValueError, match="vocab"):
        pretrain(
            data,
            ModelArguments(model_name_or_path=str(tmp_path / "first")),
            PretrainingArguments(),
            args(tmp_path / "third"),
            tokenizer=other,
        )


DDP_SCRIPT = """
import sys, torch
from datasets import Dataset
from transformers import TrainingArguments, set_seed
from ehr_transformer import EHREventTokenizer, EHRTransformerConfig, EHRTransformerForMaskedEventModeling
from ehr_transformer.data.collators import DataCollatorForMaskedEventModeling
from ehr_transformer.data.synthetic import generate_synthetic_cohort
from ehr_transformer.training.pretrain import PretrainingTrainer
from ehr_transformer.training.trainer import finish_distributed

torch.set_num_threads(1)
events = generate_synthetic_cohort(32, seed=0).events
tokenizer = EHREventTokenizer.fit(events, min_code_count=2, max_length=32)
features = tokenizer.encode_events(events).select("input_ids", "values", "times", "ages").to_dicts()
for strategy in ("pcgrad", "gradnorm", "uncertainty"):
    set_seed(0)
    config = EHRTransformerConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, pretraining_objectives=["code", "value", "time", "feature"],
    )
    trainer = PretrainingTrainer(
        model=EHRTransformerForMaskedEventModeling(config), train_dataset=Dataset.from_list(features),
        args=TrainingArguments(sys.argv[1] + "/" + strategy, max_steps=2, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0),
        data_collator=DataCollatorForMaskedEventModeling(  # each process masks its own batches differently
            tokenizer, value_mask_probability=0.3, time_mask_probability=0.2, return_teacher_inputs=True
        ),
        loss_balancing=strategy,
    )
    trainer.train()
    rank = trainer.args.process_index
    state = {k: v for k, v in trainer.model.state_dict().items()}
    state.update({"teacher." + k: v for k, v in trainer.model.feature_teacher.state_dict().items()})
    state["balancer"] = trainer.loss_balancer.weights()
    state["world_size"] = torch.tensor(trainer.args.world_size)
    torch.save(state, f"{sys.argv[1]}/{strategy}_rank{rank}.pt")
finish_distributed()
"""


def test_two_processes_keep_identical_weights_under_every_gradient_strategy(tmp_path):
    """Under DDP over gloo with gradient accumulation, each process computes its per-objective gradients and
    learned weights from its own batches; the all-reduces must leave both processes with the same model, teacher
    and balancing weights after every step (they would drift apart after one step otherwise)."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "training" / "accelerate_cpu.yaml"),
        "--main_process_port",
        "29531",
    ]
    result = subprocess.run(
        [*launcher, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for strategy in ("pcgrad", "gradnorm", "uncertainty"):
        ranks = [torch.load(tmp_path / f"{strategy}_rank{r}.pt") for r in (0, 1)]
        assert int(ranks[0]["world_size"]) == 2
        for name, tensor in ranks[0].items():
            assert torch.equal(tensor, ranks[1][name]), (strategy, name)
        assert not torch.equal(ranks[0]["balancer"], torch.ones(4)) or strategy == "pcgrad"
