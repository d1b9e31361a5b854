"""Quality measured through the real cache: perplexity and KL divergence to the full-precision cache.

Every evaluation window is fed in chunks, so each chunk attends to the history *as the cache stores it* (the
quantized past plus the full-precision residual window). A single full-sequence forward would never read the cache
back and would measure nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from huggingface_hub.utils import tqdm
from transformers import Cache, DynamicCache

from .cache import RateQuantCache
from .config import ModelFingerprint, RateQuantConfig
from .data import load_text, tokenize_windows
from .models import cache_kwargs, last_hidden_states, output_head
from .settings import EvaluationSettings

logger = logging.getLogger(__name__)
_DEFAULTS = EvaluationSettings()  # every default below is one of its fields

__all__ = [
    "CacheLike",
    "QualityResult",
    "ReferenceBatch",
    "SharedPrefix",
    "evaluate_kl",
    "evaluate_perplexity",
    "evaluate_quality",
    "evaluation_windows",
    "exact_prefix_length",
    "make_cache",
    "reference_and_prefix",
    "reference_logprobs",
    "shared_prefix",
]


@dataclass
class QualityResult:
    """Perplexity and mean KL divergence (nats per token) of one cache over the same windows."""

    perplexity: float
    kl: float | None
    tokens: int
    complete: bool = True
    """False when [`evaluate_quality`] stopped early (`stop_above`): the figures cover the `tokens` scored."""


def evaluation_windows(
    tokenizer: Any,
    data: Any = None,
    *,
    window: int = _DEFAULTS.window,
    max_windows: int | None = _DEFAULTS.n_windows,
    split: str = "test",
) -> torch.LongTensor:
    """Token windows `(n_windows, window)` of evaluation text: WikiText-2 test by default (local text offline),
    a list of strings, a text file, or an already tokenized `(n, window)` tensor."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"Token windows must be a (n_windows, window) tensor, got shape {tuple(data.shape)}.")
        return data[:max_windows] if max_windows else data
    text, source = load_text(data, split=split)
    logger.info("Evaluating on %s", source)
    return tokenize_windows(tokenizer, text, seq_len=window, n_windows=max_windows)


CacheLike = Union[RateQuantConfig, Callable[[], Cache], None]


def make_cache(model: Any, cache_config: CacheLike) -> Cache:
    """A fresh cache: full precision for `None`, a `RateQuantCache` for a config, else whatever the factory returns
    (e.g. `lambda: QuantizedCache(backend="hqq", config=model.config, nbits=4)`, to measure another method the same
    way)."""
    if cache_config is None:
        return DynamicCache(config=model.config)
    if isinstance(cache_config, RateQuantConfig):
        return RateQuantCache(config=model.config, quant_config=cache_config)
    if callable(cache_config):
        cache = cache_config()
        if not isinstance(cache, Cache):
            raise TypeError(f"The cache factory returned a {type(cache).__name__}, not a transformers Cache.")
        return cache
    raise TypeError(f"cache_config must be a RateQuantConfig, None (full precision) or a function returning a fresh "
                    f"transformers Cache, got {type(cache_config).__name__}.")


@dataclass
class _ChunkScore:
    nll: float
    kl: float
    tokens: int


def _score_chunk(
    logits: torch.Tensor, prev_logits: torch.Tensor | None, piece: torch.LongTensor, ref_logp: torch.Tensor | None,
) -> _ChunkScore:
    """NLL of the targets of one chunk, and their KL from `ref_logp` (the reference log-probs of the same targets)."""
    # Predictions for the tokens of this chunk: the last logit of the previous chunk, then all but the last.
    pred = logits[:, :-1] if prev_logits is None else torch.cat([prev_logits, logits[:, :-1]], 1)
    target = piece if prev_logits is not None else piece[:, 1:]
    logp = F.log_softmax(pred, dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).sum().item()
    kl = 0.0
    if ref_logp is not None:
        kl = F.kl_div(logp, ref_logp.to(logp.device, logp.dtype), log_target=True, reduction="sum").item()
    return _ChunkScore(nll, kl, target.numel())


def _reference_slice(reference: ReferenceBatch, start: int, piece: torch.LongTensor) -> torch.Tensor:
    """The precomputed reference log-probs predicting the targets of the chunk that starts at `start`."""
    first = max(start, 1) - 1  # logit index predicting the first target of this chunk
    return reference.slice(first, piece.shape[1] - (start == 0))


def exact_prefix_length(config: RateQuantConfig, chunk: int, window: int) -> int:
    """Tokens at the start of a `window`-token sequence fed in chunks of `chunk` that `config`'s cache serves
    exactly: the chunks before the first one that reads a quantized token. The cache quantizes whole groups of G
    tokens older than its last R, so after s tokens it holds ((s - R) // G) * G of them outside the window
    (whatever the chunking), of which the first S are sinks kept as they are."""
    r, s, g = config.residual_length, config.sink_length, config.group_size
    start = 0
    while start < window and max(start - r, 0) // g * g <= s:
        start += chunk
    return min(start, window)


@dataclass
class SharedPrefix:
    """The part of every window that all caches of one residual window, sink length and group size serve in full
    precision, computed once (see [`shared_prefix`]): its scores and the states a cache holds after it."""

    length: int
    chunk: int
    batch_size: int
    windows: torch.LongTensor
    states: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per batch, per layer: keys and values
    last_logits: list[torch.Tensor]  # per batch: the logits predicting the first token after the prefix
    scores: list[list[_ChunkScore]]  # per batch, per chunk
    with_kl: bool

    def check(self, config: RateQuantConfig, windows: torch.LongTensor, chunk: int, batch_size: int) -> None:
        if (chunk, batch_size) != (self.chunk, self.batch_size) or not torch.equal(windows.cpu(), self.windows):
            raise ValueError(
                "This SharedPrefix was computed for other windows, chunk or batch_size "
                f"(chunk={self.chunk}, batch_size={self.batch_size}, windows {tuple(self.windows.shape)}): compute "
                "it with shared_prefix() for the windows and settings being evaluated."
            )
        length = exact_prefix_length(config, chunk, windows.shape[1])
        if length != self.length:
            raise ValueError(
                f"This SharedPrefix covers {self.length} tokens but a cache with residual_length="
                f"{config.residual_length}, sink_length={config.sink_length} and group_size={config.group_size} is "
                f"exact for {length}: compute it with shared_prefix() for this config."
            )


def _windowed_layers_fit(model: Any, window: int) -> bool:
    fp = ModelFingerprint.from_model_config(model.config)
    return all((fp.window(t) or window) >= window for t in fp.layer_types)


@torch.inference_mode()
def shared_prefix(
    model: Any,
    windows: torch.LongTensor,
    config: RateQuantConfig,
    *,
    chunk: int = _DEFAULTS.chunk,
    batch_size: int = _DEFAULTS.batch_size,
    reference: list[ReferenceBatch] | None = None,
) -> SharedPrefix | None:
    """Run, once, the chunks that every cache with `config`'s residual window, sinks and group size serves in full
    precision ([`exact_prefix_length`]), for [`evaluate_quality`]`(..., prefix=...)` to start every such cache
    after them: the same results, bit for bit, without recomputing the start of every window for every cache (192
    of 512 tokens with R = 128, S = 32, G = 32 and chunks of 64; at least the first chunk, read from an empty cache).
    `None` for models with sliding-window layers shorter than the windows, whose caches drop tokens."""
    if not _windowed_layers_fit(model, windows.shape[1]):
        return None
    length = exact_prefix_length(config, chunk, windows.shape[1])
    device = model.get_input_embeddings().weight.device
    states, last, scores = [], [], []
    for batch_idx, ids in enumerate(torch.split(windows, batch_size)):
        ids = ids.to(device)
        cache = DynamicCache(config=model.config)
        logits = (model(input_ids=ids[:, start : min(start + chunk, length)], use_cache=True,
                        **cache_kwargs(model, cache)).logits.float() for start in range(0, length, chunk))
        batch_scores, prev = _prefix_scores(logits, ids, length, chunk,
                                            reference[batch_idx] if reference is not None else None)
        states.append([(layer.keys, layer.values) for layer in cache.layers])
        last.append(prev)
        scores.append(batch_scores)
    return SharedPrefix(length, chunk, batch_size, windows.cpu(), states, last, scores, reference is not None)


def _prefix_scores(logits: Iterable[torch.Tensor], ids: torch.LongTensor, length: int, chunk: int,
                   reference: ReferenceBatch | None) -> tuple[list[_ChunkScore], torch.Tensor]:
    """The scores of a prefix's chunks from their logits (float32, in order, consumed as they come), and the logits
    predicting the first token after it."""
    prev, scores = None, []
    for start, chunk_logits in zip(range(0, length, chunk), logits):
        piece = ids[:, start : min(start + chunk, length)]
        ref = _reference_slice(reference, start, piece) if reference is not None else None
        scores.append(_score_chunk(chunk_logits, prev, piece, ref))
        prev = chunk_logits[:, -1:]
    return scores, prev


@torch.inference_mode()
def evaluate_quality(
    model: Any,
    windows: torch.LongTensor,
    cache_config: CacheLike,
    *,
    chunk: int = _DEFAULTS.chunk,
    batch_size: int = _DEFAULTS.batch_size,
    with_kl: bool = True,
    progress: bool = True,
    reference: list[ReferenceBatch] | None = None,
    prefix: SharedPrefix | None = None,
    desc: str = "evaluate",
    stop_above: float | None = None,
) -> QualityResult:
    """Perplexity of `cache_config`'s cache and its KL divergence from the full-precision cache, on `windows`.

    Args:
        model (`PreTrainedModel`): the causal LM.
        windows (`torch.LongTensor`): `(n_windows, window)` token ids; see [`evaluation_windows`].
        cache_config (`RateQuantConfig`, `None` or a callable): the cache to measure; `None` is the full-precision
            `DynamicCache` (its KL is 0); a function returning a fresh transformers `Cache` (called once per batch)
            measures any other cache, such as transformers' `QuantizedCache`, the same way.
        chunk (`int`, *optional*, defaults to 64): tokens fed per forward pass.
        batch_size (`int`, *optional*, defaults to 4): windows evaluated together.
        with_kl (`bool`, *optional*, defaults to `True`): also run the full-precision cache in lockstep and measure
            KL(full precision || this cache) per predicted token.
        reference (`list[ReferenceBatch]`, *optional*): precomputed full-precision log-probabilities, one per
            batch of `batch_size` windows (see [`reference_logprobs`]); saves the lockstep pass
            when the same windows are evaluated for many caches.
        prefix ([`SharedPrefix`], *optional*): the start of the windows that this `RateQuantConfig`'s cache serves
            in full precision, computed once by [`shared_prefix`] (with the same `reference`) for many configs of
            the same residual window, sinks and group size; the cache starts after it. Results are unchanged.
        desc (`str`, *optional*, defaults to `"evaluate"`): the progress bar's name (e.g. the cache measured).
        stop_above (`float`, *optional*): stop after the chunk where the KL summed over the tokens scored so far
            exceeds this: KL per token is non-negative, so the sum over every token would exceed it too (what
            validation needs to drop a candidate). The result then has `complete=False`, and its perplexity and KL
            cover the tokens scored.
    """
    if chunk < 1 or windows.shape[1] < 2:
        raise ValueError(f"Need chunk >= 1 and windows of at least 2 tokens (got chunk={chunk}, "
                         f"window={windows.shape[1]}).")
    want_kl = with_kl and cache_config is not None
    if stop_above is not None and not want_kl:
        raise ValueError("stop_above bounds the KL summed so far: it needs with_kl=True and a cache to measure.")
    if prefix is not None:
        if not isinstance(cache_config, RateQuantConfig):
            raise ValueError("A SharedPrefix can only start a RateQuantConfig's cache, whose flush rule it relies on.")
        prefix.check(cache_config, windows, chunk, batch_size)
        if want_kl and (reference is None or not prefix.with_kl):
            raise ValueError("With a SharedPrefix, KL needs the precomputed `reference` (given to shared_prefix too).")
    device = model.get_input_embeddings().weight.device
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    batches = list(torch.split(windows, batch_size))
    begin = prefix.length if prefix is not None else 0
    bar = tqdm(total=len(batches) * math.ceil((windows.shape[1] - begin) / chunk), desc=desc,
               disable=not progress)
    for batch_idx, ids in enumerate(batches):
        ids = ids.to(device)
        cache = make_cache(model, cache_config)
        ref_cache = DynamicCache(config=model.config) if want_kl and reference is None else None
        prev_logits = prev_ref = None
        if prefix is not None:
            for part in prefix.scores[batch_idx]:  # in order, so the sums (and where they stop) are the ones of
                nll_sum, kl_sum, count = nll_sum + part.nll, kl_sum + part.kl, count + part.tokens  # feeding them
                if stop_above is not None and kl_sum > stop_above:
                    bar.close()
                    return _stopped(nll_sum, kl_sum, count)
            for layer_idx, (k, v) in enumerate(prefix.states[batch_idx]):
                cache.update(k.clone(), v.clone(), layer_idx)
            prev_logits = prefix.last_logits[batch_idx]
        for start in range(begin, ids.shape[1], chunk):
            piece = ids[:, start : start + chunk]
            logits = model(input_ids=piece, use_cache=True, **cache_kwargs(model, cache)).logits.float()
            if reference is not None and want_kl:
                ref_logp = _reference_slice(reference[batch_idx], start, piece)
            elif want_kl:
                ref_logits = model(input_ids=piece, use_cache=True, **cache_kwargs(model, ref_cache)).logits.float()
                ref_pred = ref_logits[:, :-1] if prev_ref is None else torch.cat([prev_ref, ref_logits[:, :-1]], 1)
                ref_logp = F.log_softmax(ref_pred, dim=-1)
                prev_ref = ref_logits[:, -1:]
            else:
                ref_logp = None
            part = _score_chunk(logits, prev_logits, piece, ref_logp)
            nll_sum, kl_sum, count = nll_sum + part.nll, kl_sum + part.kl, count + part.tokens
            prev_logits = logits[:, -1:]
            bar.update(1)
            if stop_above is not None and kl_sum > stop_above:
                bar.close()
                return _stopped(nll_sum, kl_sum, count)
    bar.close()
    return QualityResult(
        perplexity=math.exp(nll_sum / count), kl=(kl_sum / count) if want_kl else (0.0 if with_kl else None),
        tokens=count,
    )


def _stopped(nll_sum: float, kl_sum: float, count: int) -> QualityResult:
    """What [`evaluate_quality`] returns when `stop_above` stops it: the figures of the `count` tokens scored."""
    return QualityResult(perplexity=math.exp(nll_sum / count), kl=kl_sum / count, tokens=count, complete=False)


REFERENCE_MAX_BYTES = 2 << 30
"""Above this many bytes of full-vocabulary log-probabilities, [`reference_logprobs`] keeps the output layer's
inputs instead (tokens x hidden size, not tokens x vocabulary) and recomputes each chunk's log-probabilities."""


@dataclass
class ReferenceBatch:
    """The full-precision next-token log-probabilities of one batch of windows, `(batch, window - 1, vocab)`:
    stored (`logprobs`), or as the output layer's inputs (`hidden`) from which [`slice`] recomputes a chunk's
    log-probabilities with `head`, so that memory grows with the hidden size rather than with the vocabulary."""

    logprobs: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def windows(self) -> int:
        return (self.logprobs if self.logprobs is not None else self.hidden).shape[0]

    @property
    def nbytes(self) -> int:
        held = self.logprobs if self.logprobs is not None else self.hidden
        return held.numel() * held.element_size()

    @torch.inference_mode()
    def slice(self, first: int, length: int) -> torch.Tensor:
        """Log-probabilities `(batch, length, vocab)` at prediction positions `first .. first + length - 1`."""
        if self.logprobs is not None:
            return self.logprobs[:, first : first + length]
        return F.log_softmax(self.head(self.hidden[:, first : first + length]).float(), dim=-1)


@torch.inference_mode()
def reference_logprobs(
    model: Any, windows: torch.LongTensor, *, batch_size: int = _DEFAULTS.batch_size,
    max_bytes: int = REFERENCE_MAX_BYTES,
) -> list[ReferenceBatch]:
    """Full-precision next-token log-probabilities of `windows`, one [`ReferenceBatch`] per batch of `batch_size`
    windows (one forward pass each: with nothing quantized, chunking changes nothing). Up to `max_bytes` of them
    are stored; beyond, each batch keeps the output layer's inputs and recomputes a chunk's log-probabilities when
    asked (for a 262k vocabulary, 8 x 1024 tokens of log-probabilities would be 8.6 GB)."""
    device = model.get_input_embeddings().weight.device
    head = _reference_head(model, windows, max_bytes)
    return [_reference_batch(_full_precision(model, ids.to(device), head)[:, :-1], head)
            for ids in torch.split(windows, batch_size)]


@torch.inference_mode()
def reference_and_prefix(
    model: Any,
    windows: torch.LongTensor,
    config: RateQuantConfig,
    *,
    chunk: int = _DEFAULTS.chunk,
    batch_size: int = _DEFAULTS.batch_size,
    max_bytes: int = REFERENCE_MAX_BYTES,
) -> tuple[list[ReferenceBatch], SharedPrefix | None]:
    """[`reference_logprobs`] and [`shared_prefix`] (with that reference) from one full-precision pass, for many
    `RateQuantConfig`s of `config`'s residual window, sinks and group size: each batch is fed the shared prefix
    chunk by chunk, as [`shared_prefix`] feeds it, then the rest of its windows in one forward pass from the
    prefix's states. The prefix is the one [`shared_prefix`] computes, bit for bit; the reference differs from
    [`reference_logprobs`]' single pass by float rounding only, and the prefix's tokens are not run twice (192 of
    512 with R = 128, S = 32, G = 32 and chunks of 64). For models whose sliding-window layers are shorter than the
    windows there is no prefix: `(reference_logprobs(...), None)`."""
    if not _windowed_layers_fit(model, windows.shape[1]):
        return reference_logprobs(model, windows, batch_size=batch_size, max_bytes=max_bytes), None
    length = exact_prefix_length(config, chunk, windows.shape[1])
    device = model.get_input_embeddings().weight.device
    head = _reference_head(model, windows, max_bytes)
    reference, states, last, scores = [], [], [], []
    for ids in torch.split(windows, batch_size):
        ids = ids.to(device)
        cache = DynamicCache(config=model.config)
        starts = range(0, length, chunk)
        outs = [_full_precision(model, ids[:, start : min(start + chunk, length)], head, cache) for start in starts]
        states.append([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
        if length < ids.shape[1]:
            outs.append(_full_precision(model, ids[:, length:], head, cache))
        reference.append(_reference_batch(torch.cat(outs, dim=1)[:, :-1], head))
        batch_scores, prev = _prefix_scores(((out if head is None else head(out)).float() for out in outs), ids,
                                            length, chunk, reference[-1])
        last.append(prev)
        scores.append(batch_scores)
    return reference, SharedPrefix(length, chunk, batch_size, windows.cpu(), states, last, scores, True)


def _reference_head(model: Any, windows: torch.LongTensor, max_bytes: int) -> Callable | None:
    """The output layer to recompute a reference's log-probabilities with when storing them for `windows` would take
    more than `max_bytes`; None to store them."""
    full_bytes = windows.numel() * model.config.get_text_config().vocab_size * 4
    if full_bytes <= max_bytes:
        return None
    head = output_head(model, windows[:1, :16].to(model.get_input_embeddings().weight.device))
    if head is None:
        logger.warning("This model's logits are not its output layer applied to its last hidden states: the "
                       "reference keeps full log-probabilities (%.1f GB).", full_bytes / 1e9)
    return head


def _full_precision(model: Any, ids: torch.LongTensor, head: Callable | None, cache: Cache | None = None
                    ) -> torch.Tensor:
    """The model's logits for `ids` (after `cache`'s tokens, which it extends), or with an output `head` the
    hidden states that head reads."""
    if head is None:
        return model(input_ids=ids, **({} if cache is None else {"use_cache": True, **cache_kwargs(model, cache)})
                     ).logits
    if cache is None:
        return last_hidden_states(model, ids)
    return last_hidden_states(model, ids, use_cache=True, **cache_kwargs(model.get_decoder(), cache))


def _reference_batch(predictions: torch.Tensor, head: Callable | None) -> ReferenceBatch:
    """A [`ReferenceBatch`] from the logits (or, with a `head`, the hidden states) predicting each next token."""
    if head is None:
        return ReferenceBatch(logprobs=F.log_softmax(predictions.float(), dim=-1))
    return ReferenceBatch(hidden=predictions, head=head)


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    data: str | Sequence[str] | torch.Tensor | None = None,
    cache_config: RateQuantConfig | None = None,
    *,
    window: int = _DEFAULTS.window,
    chunk: int = _DEFAULTS.chunk,
    max_windows: int | None = _DEFAULTS.n_windows,
    batch_size: int = _DEFAULTS.batch_size,
) -> float:
    """Perplexity through the real cache (see the module docstring).

    Args:
        data: WikiText-2 test through `datasets` by default (local Python docs text offline, with a warning), a
            `datasets` name, a text file, a list of strings, or `(n, window)` token ids.
        cache_config (`RateQuantConfig`, *optional*): `None` measures the full-precision `DynamicCache`.
        window (`int`, *optional*, defaults to 1024): tokens per evaluation window.
        chunk (`int`, *optional*, defaults to 64): tokens per forward pass.
        max_windows (`int`, *optional*, defaults to 8): windows evaluated (8 x 1024 = 8k tokens).

    Example:
        >>> ppl = evaluate_perplexity(model, tokenizer, cache_config=RateQuantConfig.uniform(model.config, bits=3))
    """
    windows = evaluation_windows(tokenizer, data, window=window, max_windows=max_windows)
    return evaluate_quality(model, windows, cache_config, chunk=chunk, batch_size=batch_size, with_kl=False).perplexity


def evaluate_kl(
    model: Any,
    tokenizer: Any,
    data: str | Sequence[str] | torch.Tensor | None = None,
    cache_config: RateQuantConfig | None = None,
    *,
    window: int = _DEFAULTS.window,
    chunk: int = _DEFAULTS.chunk,
    max_windows: int | None = _DEFAULTS.n_windows,
    batch_size: int = _DEFAULTS.batch_size,
) -> float:
    """Mean KL divergence (nats per token) of the next-token distribution through `cache_config`'s cache from the
    full-precision cache's, both fed the same windows in the same chunks. Arguments as [`evaluate_perplexity`]."""
    windows = evaluation_windows(tokenizer, data, window=window, max_windows=max_windows)
    return evaluate_quality(model, windows, cache_config, chunk=chunk, batch_size=batch_size).kl
