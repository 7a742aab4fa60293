"""The `ehr-transformer` command: every command's help works, every flag has one style, and the commands that
need no model run end to end from the command line."""

import argparse

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
    with pytest.raises(FileExistsError):
        main(["synthetic", "--num_subjects", "30", "--output_dir", str(out)])
    assert main(["synthetic", "--num_subjects", "30", "--output_dir", str(out), "--overwrite"]) == 0
