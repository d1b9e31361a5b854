"""The Hugging Face Hub: download config files (cached the Hub's usual way, offline from that cache), push a saved
config folder with a generated model card and its allocation heatmap.

Everything goes through the real `huggingface_hub` client (`hf_hub_download`, `HfApi.create_repo`,
`HfApi.upload_folder`), so `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` and the cache settings behave as users expect.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RateQuantConfig

logger = logging.getLogger(__name__)

__all__ = ["hub_file", "model_card", "push_folder"]

CARD_NAME = "README.md"
HEATMAP_NAME = "allocation.png"
LIBRARY_NAME = "hf-ratequant"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


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


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    license: str = "apache-2.0",
    evaluation: list[dict] | None = None,
):
    """Push a folder saved with `RateQuantConfig.save_pretrained` to `repo_id` (created if it does not exist).

    The folder is checked first (it must load as a config). What is uploaded is a copy: the config as loaded, the
    folder's own `README.md` and `allocation.png` when it has them, otherwise a generated model card
    ([`model_card`]) and heatmap. The local folder is never modified, whether the push succeeds or fails.

    Returns:
        `huggingface_hub.CommitInfo` of the upload.
    """
    from huggingface_hub import HfApi

    from .config import RateQuantConfig

    folder = os.fspath(folder)
    config = RateQuantConfig.from_pretrained(folder)  # refuse to publish something that does not load
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        # The config files are written again from what loaded: the pair the folder's JSON commits to (a folder whose
        # last save was interrupted holds newer curves next to a backup), and never a backup or temporary file.
        config.save_pretrained(staging)
        for name in (CARD_NAME, HEATMAP_NAME):
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copy2(os.path.join(folder, name), staging)
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
    logger.info("pushed %s to %s", folder, repo_id)
    return info


def _base_model(config: RateQuantConfig) -> str | None:
    name = config.fingerprint.name_or_path if config.fingerprint else None
    if not name:
        return None
    if name.startswith(DEFAULT_MODEL_ID):  # the embedded GGUF describes itself with a suffix
        return DEFAULT_MODEL_ID
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def usage_snippet(config: RateQuantConfig, repo_id: str) -> str:
    """Python that loads the model and generates with this config from the Hub, as written."""
    base = _base_model(config)
    if base == DEFAULT_MODEL_ID:
        load = "from hf_ratequant import load_default_model\n\nmodel, tokenizer = load_default_model()  # " \
               "SmolLM2-135M-Instruct, embedded in hf-ratequant"
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{base or "<the base model>"}", dtype="auto", '
            'device_map="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base or "<the base model>"}")'
        )
    return (
        f"{load}\nfrom hf_ratequant import RateQuantCache\n\n"
        f'cache = RateQuantCache.from_pretrained("{repo_id}", model=model)\n'
        'inputs = tokenizer("The key idea of mixed-precision KV caches is", return_tensors="pt").to(model.device)\n'
        "out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)\n"
        "print(tokenizer.decode(out[0], skip_special_tokens=True))\n"
        'print(f"cache: {cache.nbytes} bytes, {cache.nbytes_16bit()} in 16-bit")\n'
    )


def model_card(
    config: RateQuantConfig, repo_id: str, *, license: str = "apache-2.0", evaluation: list[dict] | None = None
) -> str:
    """The README.md of a config repo: YAML metadata (`library_name`, `base_model`, `tags`, `license`), what the
    config is, the allocation heatmap, calibration and quality tables, and a usage snippet that runs as written.

    Args:
        evaluation (`list[dict]`, *optional*): held-out quality rows, each with `cache`, `avg_bits`, `perplexity`
            and `kl` (e.g. from `hf-ratequant eval --json`), shown as a table.
    """
    from huggingface_hub import ModelCardData

    bits = config.bits_tensor().double()
    base = _base_model(config)
    data = ModelCardData(
        library_name=LIBRARY_NAME, license=license, base_model=base,
        tags=["kv-cache", "quantization", "mixed-precision", "ratequant", f"{config.quantizer}"],
    )
    fp = config.fingerprint
    cal: dict[str, Any] = config.calibration or {}
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {base or (fp.name_or_path if fp else 'Model')}: RateQuant KV-cache allocation, {config.quantizer}, "
        f"{config.average_bits:g} average bits", "",
        f"A calibrated per-(layer, kv-head) bit allocation for `hf_ratequant.RateQuantCache`: keys and values of "
        f"every kv-head are stored at their own bit-width (packed codes, {config.quantizer} quantizer, group size "
        f"{config.group_size}, the last {config.residual_length} tokens"
        f"{f' and the first {config.sink_length}' if config.sink_length else ''} kept in full precision). Keys get "
        f"{bits[..., 0].mean():.2f} bits on average, values {bits[..., 1].mean():.2f}; method: `{config.method}`.", "",
        f"Model geometry: {fp.describe() if fp else 'not recorded'}. The cache refuses a model of another "
        "architecture or geometry.", "",
        f"![bits per layer and kv-head]({HEATMAP_NAME})", "",
        "## Usage", "", "```python", usage_snippet(config, repo_id).rstrip(), "```", "",
        "`pip install hf-ratequant`; the config is two small files (`ratequant_config.json`, "
        "`ratequant_curves.safetensors`); nothing else is downloaded or executed.", "",
    ]
    if evaluation:
        lines += ["## Quality on held-out text", "", "| cache | avg bits | perplexity | KL to full precision |",
                  "|---|---|---|---|"]
        for r in evaluation:
            kl = "0" if not r.get("kl") else f"{r['kl']:.4f}"
            lines.append(f"| {r['cache']} | {r['avg_bits']:g} | {r['perplexity']:.3f} | {kl} |")
        lines.append("")
    if cal.get("validation_kl"):
        lines += ["## Calibration", "",
                  f"Calibrated on {cal.get('source', 'unrecorded text')} ({cal.get('fit_tokens', '?')} tokens for the "
                  f"fit, {cal.get('validation_tokens', '?')} held back for validation). Measure: {cal.get('measure')}."
                  " Every candidate below was evaluated through the real cache on held-back windows (KL to the "
                  "full-precision cache); the best one is this config.", ""]
        scored = cal.get("validation_windows") or {}
        if scored:  # successive halving: KLs over different numbers of windows are not comparable with each other
            lines[-1:] = [f" Successive halving: every candidate was scored on the first {min(scored.values())} "
                          f"windows, the best ones on more; this config is the best of those scored on all "
                          f"{max(scored.values())}.", ""]
            lines += ["| candidate | validation KL | windows scored |", "|---|---|---|"]
            order = sorted(cal["validation_kl"].items(), key=lambda kv: (-scored.get(kv[0], 0), kv[1]))
        else:
            lines += ["| candidate | validation KL |", "|---|---|"]
            order = sorted(cal["validation_kl"].items(), key=lambda kv: kv[1])
        for name, kl in order:
            mark = " (this config)" if name == cal.get("winner") else ""
            windows = f" {scored[name]} |" if name in scored else (" |" if scored else "")
            lines.append(f"| {name}{mark} | {kl:.5f} |{windows}")
        beta = cal.get("beta_median") or {}
        if beta:
            lines += ["", f"Fitted distortion curves D(b) = alpha * beta^(-b): median beta {beta['key']:.2f} (keys), "
                          f"{beta['value']:.2f} (values), median fit R^2 {cal.get('fit_r2_median', float('nan')):.3f}"
                          "; per-unit alpha and beta are in `ratequant_curves.safetensors`."]
        lines.append("")
    return "\n".join(lines)
