"""Publishing configs on the Hugging Face Hub: `push_folder` pushes a folder saved with
`RateQuantConfig.save_pretrained`, with its model card and allocation heatmap.

The layers below it, which `hf_ratequant.config` uses and which know nothing of the config module: the downloads and
`push_config` are in `hf_ratequant.hub_io`, the model card in `hf_ratequant.cards`; their public names are importable
from here too, as they always were.
"""

from __future__ import annotations

import os

from .cards import CARD_NAME, DEFAULT_MODEL_ID, HEATMAP_NAME, LIBRARY_NAME, model_card, usage_snippet
from .config import RateQuantConfig
from .hub_io import download_config, hub_file, looks_local, push_config

__all__ = [
    "CARD_NAME", "DEFAULT_MODEL_ID", "HEATMAP_NAME", "LIBRARY_NAME", "download_config", "hub_file", "looks_local",
    "model_card", "push_config", "push_folder", "usage_snippet",
]


def push_folder(folder: str | os.PathLike, repo_id: str, **kwargs):
    """Push a folder saved with `RateQuantConfig.save_pretrained` to `repo_id` (created if it does not exist).

    The folder is checked first (it must load as a config). What is uploaded is a copy: the config as loaded, the
    folder's own `README.md` and `allocation.png` when it has them, otherwise a generated model card
    ([`model_card`]) and heatmap. The local folder is never modified, whether the push succeeds or fails.

    Keyword arguments are those of [`push_config`]: `private`, `token`, `revision`, `commit_message`, `create_pr`,
    `license`, `evaluation` (held-out quality rows for the card).

    Returns:
        `huggingface_hub.CommitInfo` of the upload.
    """
    config = RateQuantConfig.from_pretrained(folder)  # refuse to publish something that does not load
    return push_config(config, repo_id, extras_folder=os.fspath(folder), **kwargs)
