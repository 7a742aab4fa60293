"""Share checkpoints on a model hub: the files that make a folder complete, the push, and fetching a hub id."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers.utils.hub import PushToHubMixin, hf_api

from .checkpoint_safety import CODE_FREQUENCIES_FILE, PROTOTYPES_FILE, check_checkpoint_folder
from .model_card import read_card_metadata
from .training.checkpoint import TRAINING_LABELS_FILE

# The files that make a checkpoint folder complete and shareable; nothing else of an output folder is uploaded
# (Trainer checkpoints, optimizer pickles, logs, `training_args.bin` stay local).
SHAREABLE_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "event_tokenizer.json",
    "README.md",
    "configuration_ehr.py",
    "modeling_ehr.py",
    PROTOTYPES_FILE,
    CODE_FREQUENCIES_FILE,
    TRAINING_LABELS_FILE,
)


def resolve_candidate(candidate: str | os.PathLike) -> Path:
    """A local checkpoint folder as is; otherwise a hub id, fetched with `huggingface_hub.snapshot_download`
    (only the files of a shareable checkpoint; offline, only from the local cache)."""
    path = Path(candidate)
    if path.is_dir():
        return path
    text = str(candidate)
    if text.count("/") > 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{candidate}: no such checkpoint folder (and not a hub id of the form owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=list(SHAREABLE_FILES)))
    except Exception as error:  # offline, unknown repo, no access: say which candidate and why
        raise FileNotFoundError(
            f"{candidate}: not a local folder, and the hub id could not be fetched ({error})"
        ) from error


# ------------------------------------------------------------------------------------------------ sharing
def shareable_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a checkpoint folder that make it complete: weights, config, tokenizer, card, modeling code,
    prototypes and code frequencies (those present). Refuses a folder that `check_checkpoint_folder` refuses."""

    folder = Path(folder)
    checked = check_checkpoint_folder(folder)
    names = set(SHAREABLE_FILES) | {p.name for p in checked.weight_files}
    files = sorted(folder / name for name in names if (folder / name).is_file())
    missing = [name for name in ("config.json", "event_tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: {', '.join(missing)} missing; a shared checkpoint must be complete")
    return files


class CheckpointFolder(PushToHubMixin):
    """A saved checkpoint folder as a `transformers` `PushToHubMixin`: `save_pretrained` copies its shareable
    files (:func:`shareable_files`), and `push_to_hub` creates the repository (`create_repo(exist_ok=True)`) and
    commits them with the mixin's `_upload_modified_files`, as `model.push_to_hub` does. Unlike
    `model.push_to_hub`, the tokenizer, model card, prototypes and code frequencies go along, and the card stays
    ours rather than a generated one; Trainer state, logs and pickles never leave the machine."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files = shareable_files(self.folder)
        if (self.folder / "README.md").is_file():
            read_card_metadata(self.folder)  # the card's YAML must parse before it is published

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[Path]:
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(path, target / path.name)) for path in self.files]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = "Upload ehr-transformer checkpoint",
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **kwargs,
    ) -> Any:
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return self._upload_modified_files(
                tmp,
                repo_id,
                files_timestamps={},
                commit_message=commit_message,
                token=token,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
            )


def push_checkpoint_to_hub(folder: str | os.PathLike, repo_id: str, **kwargs) -> Any:
    """Upload a complete checkpoint folder to the hub (see :class:`CheckpointFolder`); returns the commit info."""
    return CheckpointFolder(folder).push_to_hub(repo_id, **kwargs)


__all__ = [
    "SHAREABLE_FILES",
    "resolve_candidate",
    "shareable_files",
    "CheckpointFolder",
    "push_checkpoint_to_hub",
]
