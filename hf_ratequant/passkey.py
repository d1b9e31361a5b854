"""Passkey retrieval through the cache: a number hidden at a chosen depth of filler text, asked for at the end.

The test of long-context recall that KV-cache papers report (Mohtashami & Jaggi, 2023): a five-digit pass key is
stated once, somewhere inside `length` tokens of repetitive filler, and the model is asked for it after the filler.
What makes it a test *of the cache*: the context (filler and key) is stored in the cache first, exactly as one
prefill forward pass would store it, and only then is the question fed and the answer generated, so every token of
the question and of the answer attends to the key as the cache holds it (quantized, unless it is still in the
full-precision residual window). A trial is correct when the key appears in the generated answer as a number of
its own.

When several caches are scored on the same trials (`run_passkey` with many caches), the context is prefilled once
with a `DynamicCache` and every cache is filled through its own `update(keys, values, layer_idx)` with those states:
the calls a prefill forward pass makes, without repeating the forward for every cache.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub.utils import tqdm
from transformers import DynamicCache

from .evaluation import CacheLike, make_cache
from .models import cache_kwargs

logger = logging.getLogger(__name__)

__all__ = ["PasskeyResult", "PasskeyTrial", "evaluate_passkey", "passkey_trials", "run_passkey"]

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_LENGTHS = (1024, 2048, 4096, 6144)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)

@dataclass
class PasskeyTrial:
    """One haystack: `context_ids` (`(1, length)`: intro, filler, the key at `depth`, filler) and `question_ids`."""

    length: int
    depth: float
    passkey: str
    context_ids: torch.LongTensor = field(repr=False)
    question_ids: torch.LongTensor = field(repr=False)


@dataclass
class PasskeyResult:
    """Share of trials whose answer contains the right key, overall and per context length."""

    accuracy: float
    correct: int
    trials: int
    by_length: dict[int, float]
    records: list[dict] = field(default_factory=list, repr=False)  # length, depth, passkey, answer, correct


def passkey_trials(
    tokenizer: Any,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    seed: int = 0,
    max_positions: int | None = None,
) -> list[PasskeyTrial]:
    """One trial per (length, depth): a context of exactly `length` tokens with a random five-digit key placed after
    `depth` of the filler (0: right after the intro, 1: right before the question).

    Args:
        tokenizer: the model's tokenizer.
        lengths (`Sequence[int]`): context lengths in tokens, e.g. `(1024, 2048, 4096, 6144)`.
        depths (`Sequence[float]`): key positions as fractions of the filler, each in [0, 1].
        seed (`int`, *optional*, defaults to 0): the keys are drawn from `random.Random(seed)`.
        max_positions (`int`, *optional*): the model's position limit (`config.max_position_embeddings`): a length
            whose context plus question and answer would not fit is refused.
    """
    if not lengths or not depths:
        raise ValueError("Passkey retrieval needs at least one length and one depth.")
    bad_depths = [d for d in depths if not 0.0 <= float(d) <= 1.0]
    if bad_depths:
        raise ValueError(f"Passkey depths must lie in [0, 1] (fraction of filler before the key), got {bad_depths}.")

    def ids(text: str, special: bool = False) -> list[int]:
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    intro, filler, question = ids(INTRO, special=True), ids(FILLER), ids(QUESTION)
    rng = random.Random(seed)
    trials = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            needle = ids(NEEDLE.format(key=key))
            n_filler = int(length) - len(intro) - len(needle)
            if n_filler < len(filler):
                raise ValueError(
                    f"Passkey context length {length} is too short: the intro and the key alone take "
                    f"{len(intro) + len(needle)} tokens. Use lengths of at least "
                    f"{len(intro) + len(needle) + len(filler)}."
                )
            if max_positions is not None and length + len(question) + 16 > max_positions:
                raise ValueError(
                    f"Passkey context length {length} plus the question and answer exceeds the model's "
                    f"{max_positions} positions (max_position_embeddings). Use lengths up to "
                    f"{max_positions - len(question) - 16}."
                )
            hay = (filler * (n_filler // len(filler) + 1))[:n_filler]
            # Cut the filler at a sentence boundary so the key is not spliced into the middle of a word.
            cut = _sentence_boundary(hay, filler, round(float(depth) * n_filler))
            context = intro + hay[:cut] + needle + hay[cut:]
            trials.append(
                PasskeyTrial(
                    length=int(length), depth=float(depth), passkey=key,
                    context_ids=torch.tensor([context], dtype=torch.long),
                    question_ids=torch.tensor([question], dtype=torch.long),
                )
            )
    return trials


def _sentence_boundary(hay: list[int], filler: list[int], position: int) -> int:
    """The start of the filler repetition nearest to `position` (within the haystack)."""
    period = len(filler)
    return min(round(position / period) * period, (len(hay) // period) * period)


def _found(passkey: str, answer: str) -> bool:
    """The key appears in the answer as a number of its own (not as part of a longer digit run)."""
    return passkey in re.findall(r"\d+", answer)


def _shareable(model: Any) -> bool:
    """Prefilling once and replaying the states is exact only when every layer keeps the whole context."""
    types = getattr(model.config, "layer_types", None) or []
    return all(t == "full_attention" for t in types) and not getattr(model.config, "sliding_window", None)


@torch.inference_mode()
def run_passkey(
    model: Any,
    tokenizer: Any,
    trials: Sequence[PasskeyTrial],
    caches: Mapping[str, CacheLike],
    *,
    max_new_tokens: int = 12,
    progress: bool = True,
) -> dict[str, PasskeyResult]:
    """Score every cache in `caches` (name -> `RateQuantConfig`, `None` for full precision, or a function returning
    a fresh transformers `Cache`) on the same `trials`; see the module docstring for how the context is stored."""
    if not caches:
        raise ValueError("run_passkey needs at least one cache to score.")
    device = model.get_input_embeddings().weight.device
    share = len(caches) > 1 and _shareable(model)
    records: dict[str, list[dict]] = {name: [] for name in caches}
    bar = tqdm(total=len(trials) * len(caches), desc="passkey", unit="trial", disable=not progress)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for trial in trials:
        context = trial.context_ids.to(device)
        states = None
        if share:
            ref = DynamicCache(config=model.config)
            model(input_ids=context, use_cache=True, logits_to_keep=1, **cache_kwargs(model, ref))
            states = [(layer.keys, layer.values) for layer in ref.layers]
            del ref
        full = torch.cat([context, trial.question_ids.to(device)], dim=1)
        for name, cache_like in caches.items():
            bar.set_postfix_str(name)
            cache = make_cache(model, cache_like)
            if states is not None:
                for idx, (k, v) in enumerate(states):
                    cache.update(k, v, idx)
            else:
                model(input_ids=context, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            out = model.generate(
                input_ids=full, attention_mask=torch.ones_like(full), **cache_kwargs(model, cache),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            )
            answer = tokenizer.decode(out[0, full.shape[1]:], skip_special_tokens=True)
            correct = _found(trial.passkey, answer)
            records[name].append(dict(length=trial.length, depth=trial.depth, passkey=trial.passkey,
                                      answer=answer.strip(), correct=correct))
            bar.update(1)
    bar.close()
    return {name: _summarize(recs) for name, recs in records.items()}


def _summarize(records: list[dict]) -> PasskeyResult:
    correct = sum(r["correct"] for r in records)
    by_length: dict[int, float] = {}
    for length in dict.fromkeys(r["length"] for r in records):
        hits = [r["correct"] for r in records if r["length"] == length]
        by_length[length] = sum(hits) / len(hits)
    return PasskeyResult(accuracy=correct / len(records), correct=correct, trials=len(records), by_length=by_length,
                         records=records)


def evaluate_passkey(
    model: Any,
    tokenizer: Any,
    cache_config: CacheLike = None,
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    seed: int = 0,
    max_new_tokens: int = 12,
    progress: bool = True,
) -> PasskeyResult:
    """Passkey retrieval accuracy of one cache (`None`: the full-precision `DynamicCache`).

    Example:
        >>> res = evaluate_passkey(model, tokenizer, RateQuantConfig.from_pretrained("path/to/config"))
        >>> res.accuracy, res.by_length
    """
    trials = passkey_trials(tokenizer, lengths, depths, seed=seed,
                            max_positions=getattr(model.config, "max_position_embeddings", None))
    return run_passkey(model, tokenizer, trials, {"cache": cache_config}, max_new_tokens=max_new_tokens,
                       progress=progress)["cache"]
