"""The `ehr-transformer` command: every command's help works, every flag has one style, and the commands that
need no model run end to end from the command line."""

import argparse
import subprocess
import sys

import pytest

from ehr_transformer.cli import main

COMMANDS = ["quickstart", "select", "adapt", "synthetic", "convert-wide", "evaluate", "predict"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                captured.update(action.choices)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            main(["quickstart"])
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ehr-transformer")
    if command is not None:
        assert command in out.splitlines()[0]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_training_commands_parse_their_own_arguments(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--data_dir" in out and "--learning_rate" in out
    # pretraining flags belong to pretrain, fine-tuning flags to finetune
    assert ("--loss_balancing" in out) == (command == "pretrain")
    assert ("--linear_probe" in out) == (command == "finetune")


def test_every_flag_is_snake_case_and_paths_are_named_for_what_they_are():
    parsers = _subparsers()
    assert set(COMMANDS) <= set(parsers)
    for name, parser in parsers.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                assert flag.startswith("--") and flag[2:] == flag[2:].lower() and "-" not in flag[2:], (
                    name,
                    flag,
                )
                assert flag not in ("--output", "--data", "--subjects"), (name, flag)


def test_synthetic_then_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    out = tmp_path / "meds"
    assert main(["synthetic", "--num_subjects", "30", "--output_dir", str(out), "--num_shards", "2"]) == 0
    assert "synthetic MEDS cohort of 30 subjects written to" in capsys.readouterr().out
    assert len(list((out / "data" / "train").glob("*.parquet"))) == 2
    # a user mistake is one line on stderr and exit status 2; --debug (before the command) gives the traceback
    assert main(["synthetic", "--num_subjects", "30", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("ehr-transformer: error: ") and str(out) in err and len(err.strip().splitlines()) == 1
    )
    with pytest.raises(FileExistsError):
        main(["--debug", "synthetic", "--num_subjects", "30", "--output_dir", str(out)])
    assert main(["synthetic", "--num_subjects", "30", "--output_dir", str(out), "--overwrite"]) == 0


def test_version(capsys):
    from ehr_transformer import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ehr-transformer {__version__}"


def _run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_of_every_command_loads_neither_torch_nor_transformers():
    """`--help` answers at once: no command's help imports torch or transformers (benchmarks/cli_startup.py times
    it). `pretrain` / `finetune` print a short help built from the package's dataclasses."""
    commands = [None, "pretrain", "finetune", *COMMANDS]
    out = _run_python(
        "import contextlib, io, sys\n"
        "import ehr_transformer.cli\n"
        f"for command in {commands!r} + ['--version']:\n"
        "    argv = ['--help'] if command is None else [command] if command == '--version' else [command, '--help']\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as help_text:\n"
        "        try:\n"
        "            ehr_transformer.cli.main(argv)\n"
        "        except SystemExit as exit:\n"
        "            assert exit.code == 0, (argv, exit.code)\n"
        "    assert help_text.getvalue().strip(), argv\n"
        "    print(command, len(help_text.getvalue().splitlines()), sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert len(lines) == len(commands) + 1
    for command, rest in lines.items():
        assert rest.endswith(" []"), f"{command} --help imported {rest}"
    for command in ("pretrain", "finetune"):  # short: the package's flags and the recipe, not 700 lines
        assert int(lines[command].split()[0]) < 150


def test_import_ehr_transformer_registers_the_auto_classes_in_a_fresh_process(tmp_path):
    """`import ehr_transformer` stays light yet registers the model with the Auto classes, whichever of it and
    transformers (or a transformers module that loads the Auto classes itself, the Trainer) is imported first."""
    from ehr_transformer import EHRTransformerConfig, EHRTransformerForSequenceClassification

    config = EHRTransformerConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    EHRTransformerForSequenceClassification(config).save_pretrained(tmp_path / "model")
    load = (
        "from transformers import AutoConfig, AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'model')!r})\n"
        "print(type(model).__name__, type(AutoConfig.for_model('ehr_transformer')).__name__)\n"
    )
    expected = "EHRTransformerForSequenceClassification EHRTransformerConfig"
    light = "import sys, ehr_transformer\nassert not {'torch', 'transformers'} & set(sys.modules)\n"
    assert _run_python(light + load).strip() == expected
    auto_first = "import transformers.models.auto.modeling_auto\nimport ehr_transformer\n"
    assert _run_python(auto_first + load).strip() == expected
    trainer_after = "import ehr_transformer\nimport transformers.trainer\n"
    assert _run_python(trainer_after + load).strip() == expected


def test_a_mistyped_data_dir_is_named_on_one_line(tmp_path, capsys):
    missing = str(tmp_path / "no_such_meds")
    labels = str(tmp_path / "labels.parquet")
    for argv in (
        ["pretrain", "--data_dir", missing, "--output_dir", str(tmp_path / "p")],
        ["finetune", "--data_dir", missing, "--labels", labels, "--output_dir", str(tmp_path / "f")],
        ["evaluate", "--checkpoint", str(tmp_path), "--data_dir", missing, "--labels", labels],
        ["select", "--data_dir", missing, "--candidates", str(tmp_path)],
        [
            "adapt",
            "--checkpoint",
            str(tmp_path),
            "--data_dir",
            missing,
            "--labels",
            labels,
            "--output_dir",
            "a",
        ],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err == f"ehr-transformer: error: --data_dir {missing}: no such folder\n", argv


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_training_commands_default_to_the_package_recipe(command, tmp_path):
    """`pretrain` / `finetune` without training flags train with the package's recipe (the quickstart's), not
    `transformers`' 5e-5; a flag still overrides it."""
    from ehr_transformer.cli import _parse_training
    from ehr_transformer.training.arguments import RECIPES, ModelArguments, recipe_training_arguments

    argv = ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    *_, model_args, _, training_args = _parse_training(command, argv)
    recipe = recipe_training_arguments(tmp_path / "out", command)
    for name in (*RECIPES[command], "report_to"):
        assert getattr(training_args, name) == getattr(recipe, name), name
    assert training_args.per_device_train_batch_size == 32
    if command == "pretrain":
        assert training_args.learning_rate == 1e-3 and training_args.weight_decay == 0.01
        assert training_args.num_train_epochs == 4 and training_args.warmup_steps == 0.05
    else:  # a budget with early stopping on the tuning loss, the best epoch restored
        assert training_args.learning_rate == 3e-3 and training_args.weight_decay == 0.05
        assert training_args.num_train_epochs == 30 and training_args.warmup_steps == 0.1
        assert training_args.load_best_model_at_end and training_args.eval_strategy == "epoch"
        assert training_args.metric_for_best_model == "loss"
    assert model_args == ModelArguments()
    assert (ModelArguments().hidden_size, ModelArguments().num_hidden_layers) == (64, 2)
    *_, overridden = _parse_training(command, [*argv, "--learning_rate", "3e-4"])
    assert overridden.learning_rate == 3e-4


def test_a_bare_default_finetune_learns(tmp_path, capsys):
    """`finetune` with nothing but the data, the labels and the output folder (from scratch, the package's
    recipe: 5 networks cross-fitted, a new model) learns the synthetic outcome: held-out AUROC above chance (0.627
    measured on 2026-12-07 for this 400-subject cohort, 112 held-out admissions, 13 deaths)."""
    from sklearn.metrics import roc_auc_score

    from ehr_transformer.inference import predict

    data = tmp_path / "meds"
    labels = str(data / "labels" / "in_hospital_mortality.parquet")
    assert main(["synthetic", "--num_subjects", "400", "--output_dir", str(data)]) == 0
    argv = ["finetune", "--data_dir", str(data), "--labels", labels, "--output_dir", str(tmp_path / "f")]
    assert main([*argv, "--use_cpu"]) == 0
    predictions = predict(tmp_path / "f", data, labels, split="held_out")
    auroc = roc_auc_score(
        predictions["boolean_value"].to_numpy(), predictions["predicted_boolean_probability"].to_numpy()
    )
    print(f"bare finetune held-out AUROC {auroc:.3f}")
    assert auroc > 0.55


def test_finetune_without_epoch_saves_is_refused_in_one_sentence(tmp_path, capsys):
    """The fine-tuning recipe restores its best epoch: `--save_strategy no` alone gets one sentence saying what to
    do, not transformers' multi-line mismatch; turning the three off together trains a fixed number of epochs."""
    from ehr_transformer.cli import _parse_training

    argv = ["finetune", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    assert main([*argv, "--save_strategy", "no"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--save_strategy no with --eval_strategy epoch" in err
    assert "--load_best_model_at_end false" in err
    fixed = ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"]
    *_, training_args = _parse_training("finetune", [*argv[1:], *fixed])
    assert training_args.save_strategy == "no" and not training_args.load_best_model_at_end
