"""Files to and from the Hugging Face Hub: download a config's files (cached the Hub's usual way, offline from that
cache) and push a config with its model card and allocation heatmap.

Everything goes through the real `huggingface_hub` client (`hf_hub_download`, `HfApi.create_repo`,
`HfApi.upload_folder`), so `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` and the cache settings behave as users expect.
This module does not import `hf_ratequant.config`: `push_config` takes the config object it publishes, and
`hf_ratequant.hub.push_folder` (which loads a folder as a config) is built on it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from .cards import CARD_NAME, HEATMAP_NAME, model_card
from .storage import CONFIG_NAME, read_curves, read_settings

if TYPE_CHECKING:
    import torch

    from .config import RateQuantConfig

logger = logging.getLogger(__name__)

__all__ = ["download_config", "hub_file", "looks_local", "push_config"]


def looks_local(path: str) -> bool:
    """A path rather than a Hub repo id ('name' or 'owner/name')."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path)


def hub_file(filename: str, *, repo_id: str, revision: str | None, required: bool, **kwargs) -> str | None:
    """Download (or find in the cache) one file of a Hub repo, with errors that name the repo and file and say what to
    do. `kwargs` go to `hf_hub_download` (`subfolder`, `token`, `cache_dir`, `local_files_only`)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return hf_hub_download(repo_id, filename, revision=revision, **kwargs)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ('user/name'): {e}") from e
    except RepositoryNotFoundError as e:
        raise OSError(f"No Hub repo {repo_id!r} (or it is private or gated: log in or pass `token=`).") from e
    except RevisionNotFoundError as e:
        raise OSError(f"The Hub repo {repo_id!r} has no revision {revision!r}: pass an existing branch, tag or "
                      "commit.") from e
    except LocalEntryNotFoundError as e:  # offline and not in the cache (a subclass of EntryNotFoundError)
        if not required:
            logger.warning("%s of %s is not in the local cache and the Hub cannot be reached: loading the allocation "
                           "without its fitted curves.", filename, at)
            return None
        raise OSError(f"{filename} of {at} is not in the local Hub cache and the Hub cannot be reached (offline "
                      "mode or no network). Connect once, or pass a local folder.") from e
    except EntryNotFoundError as e:
        if not required:
            return None
        raise OSError(f"The Hub repo {at} has no {filename}: is it a RateQuant config repo (pushed with "
                      "`RateQuantConfig.push_to_hub`)?") from e
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise OSError(f"Downloading {filename} of {at} failed: {type(e).__name__}: {e}. The connection dropped or "
                      "the Hub is unreachable; a partial download is never used as the file: retrying is safe.") from e


def _is_network_error(err: BaseException) -> bool:
    """A transport failure of the HTTP client (huggingface_hub uses httpx; some versions a fork of it)."""
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or type(err).__module__.split(".")[0] in (
        "httpx", "httpx2", "httpcore", "requests", "urllib3")


def download_config(
    repo_id: str, *, revision: str | None = None, **kwargs
) -> tuple[str, dict, dict[str, torch.Tensor] | None]:
    """The path of a Hub repo's downloaded `ratequant_config.json`, its settings, and the curves it names (None: none,
    or they could not be had, with a warning). `kwargs` go to `hf_hub_download` (`subfolder`, `token`, `cache_dir`,
    `local_files_only`)."""
    config_path = hub_file(CONFIG_NAME, repo_id=repo_id, revision=revision, required=True, **kwargs)
    settings, ref = read_settings(config_path)
    if ref is None:
        return config_path, settings, None
    curves_path = hub_file(ref.name, repo_id=repo_id, revision=revision, required=False, **kwargs)
    return config_path, settings, read_curves(ref, curves_path, config_path)


def push_config(
    config: RateQuantConfig,
    repo_id: str,
    *,
    extras_folder: str | os.PathLike | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    license: str = "apache-2.0",
    evaluation: list[dict] | None = None,
):
    """Push `config` to `repo_id` (created if it does not exist) with its model card and allocation heatmap.

    What is uploaded is a staging folder: the config saved afresh (never a temporary or stale file), the `README.md`
    and `allocation.png` of `extras_folder` when it has them, otherwise a generated model card ([`model_card`]) and
    heatmap. `extras_folder` is never modified, whether the push succeeds or fails.

    Returns:
        `huggingface_hub.CommitInfo` of the upload.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        config.save_pretrained(staging)
        for name in (CARD_NAME, HEATMAP_NAME):
            if extras_folder is not None and os.path.isfile(os.path.join(extras_folder, name)):
                shutil.copy2(os.path.join(extras_folder, name), staging)
        if not os.path.isfile(os.path.join(staging, HEATMAP_NAME)):
            from .plots import plot_allocation

            plot_allocation(config, os.path.join(staging, HEATMAP_NAME))
        if not os.path.isfile(os.path.join(staging, CARD_NAME)):
            with open(os.path.join(staging, CARD_NAME), "w", encoding="utf-8") as f:
                f.write(model_card(config, repo_id, license=license, evaluation=evaluation))
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=staging, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"RateQuant {config.quantizer} config, {config.average_bits:g} bits",
        )
    logger.info("pushed %s to %s", extras_folder or "a config", repo_id)
    return info
