"""lm-evaluation-harness through the real cache: the `ratequant` model class and [`evaluate`].

lm-eval's loglikelihood requests (multiple-choice, loglikelihood and perplexity tasks) are scored by one forward pass
over context and continuation, which never reads a cache back: a KV-cache method wrapped naively would score
exactly as full precision. [`RateQuantLM`], a subclass of lm-eval's `HFLM` registered as `ratequant`, changes what
that forward pass is and nothing else:

- loglikelihood, multiple_choice and loglikelihood_rolling: the padded batch that `HFLM` scores is fed in chunks
  of `chunk` tokens into a fresh cache, so every chunk (the continuation included) attends to the past *as the
  cache stores it*: the quantized past, the sink tokens and the full-precision window (the last R to R + G - 1
  tokens), as `hf_ratequant.evaluation` measures perplexity. lm-eval pads loglikelihood batches on the right, so a
  row's real tokens come first: they are grouped, quantized and attended to exactly as in an unpadded run, and the
  pad tokens after them change nothing (the scores of batch sizes 1 and 4 agree to float tolerance). Rows of a
  batch that begin with the same tokens (the choices of one multiple-choice question) share that prefix: it is fed
  once and the cache copied to every row, which gives the same numbers.
- generate_until: `model.generate(past_key_values=<a fresh RateQuantCache>)`, one row at a time (lm-eval pads
  generation batches on the left, and pad tokens inside the quantized groups would make a row's result depend on
  its batch). The prompt is prefilled in one forward pass, as in serving; every generated token reads the
  quantized past.

A cache that never quantized anything (contexts shorter than its full-precision window) scores exactly as full
precision; [`evaluate`] warns when that happens, and `RateQuantLM.cache_stats` says how many scored tokens read a
quantized past.

Example:
    >>> import lm_eval
    >>> from hf_ratequant import load_default_model, default_config_path
    >>> from hf_ratequant.harness import RateQuantLM
    >>> model, tokenizer = load_default_model()
    >>> lm = RateQuantLM(pretrained=model, tokenizer=tokenizer, cache=default_config_path(), batch_size=4)
    >>> results = lm_eval.simple_evaluate(model=lm, tasks=["my_task"],
    ...                                   task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks/"))

Or, with the model class by name (once this module is imported): `lm_eval.simple_evaluate(model="ratequant",
model_args={"pretrained": "smollm2", "cache": "kv:3,2"}, tasks=[...])`, or the command line: `hf-ratequant lm-eval
--tasks my_task --include-path my_tasks/ --cache none kv:3,2`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

LM_EVAL_MIN, LM_EVAL_MAX = "0.4.12", "0.4.14"
"""The lm-eval versions this module is tested with: `LM_EVAL_MIN <= version < LM_EVAL_MAX`."""
UNTESTED_ENV = "HF_RATEQUANT_LM_EVAL_UNTESTED"
"""Set to 1 to use an lm-eval version outside the tested range anyway (with a warning)."""
INSTALL_HINT = f"pip install 'hf-ratequant[lm-eval]' (or 'lm-eval>={LM_EVAL_MIN},<{LM_EVAL_MAX}')"


def _check_lm_eval_version() -> str:
    """The installed lm-eval version; an `ImportError` saying what to install when it is missing or untested."""
    from packaging.version import Version

    try:
        version = importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"The lm-eval integration needs lm-evaluation-harness: {INSTALL_HINT}.") from None
    if not Version(LM_EVAL_MIN) <= Version(version) < Version(LM_EVAL_MAX):
        message = (f"hf_ratequant's lm-eval integration is tested with lm-eval>={LM_EVAL_MIN},<{LM_EVAL_MAX}, but "
                   f"lm-eval {version} is installed: {INSTALL_HINT}")
        if os.environ.get(UNTESTED_ENV) != "1":
            raise ImportError(f"{message}. (Set {UNTESTED_ENV}=1 to try this version anyway: lm-eval's HFLM "
                              "internals that this module overrides may have changed.)")
        warnings.warn(f"{message}; running anyway because {UNTESTED_ENV}=1.", RuntimeWarning, stacklevel=3)
    return version


LM_EVAL_VERSION = _check_lm_eval_version()

import torch  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from .cache import RateQuantCache  # noqa: E402
from .config import RateQuantConfig  # noqa: E402
from .models import cache_kwargs  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["CacheStats", "RateQuantLM", "evaluate", "load_tasks", "resolve_cache"]

_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "xml", "sql"}


def resolve_cache(cache: Any, model: Any, sink_length: int | None = None) -> RateQuantConfig | None:
    """The `RateQuantConfig` (or `None`: full precision) that `cache` names for `model`: `None`/`"none"`, a
    `RateQuantConfig`, or a spec of `hf_ratequant.cache_spec` (`"uniform:BITS"`, `"kv:KBITS,VBITS"`, a saved config
    folder or a Hub repo id), as `hf-ratequant eval --cache` accepts them. `sink_length` sets the sinks of the fixed
    shorthands (default: `CacheLayout`'s 32); a saved config keeps its own and refuses a different one."""
    from .cache_spec import parse_cache_spec
    from .settings import layout_with

    if cache is None or isinstance(cache, RateQuantConfig):
        config = cache
    elif isinstance(cache, (str, os.PathLike)):
        explicit = () if sink_length is None else ("sink_length",)
        layout = layout_with(sink_length=None if sink_length is None else int(sink_length))
        config = parse_cache_spec(cache).build(model.config, layout, explicit=explicit)
    else:
        raise TypeError(f"cache must be a RateQuantConfig, a cache spec string or None, got {type(cache).__name__}.")
    if config is not None:
        RateQuantCache(config=model.config, quant_config=config)  # refuses a config that does not fit the model
    return config


@dataclass
class CacheStats:
    """What the caches of an evaluation held and read, summed over every forward pass since the last `reset`.

    Attributes:
        rows (`int`): sequences scored (one per loglikelihood request or rolling window; lm-eval may score several
            one-token continuations of the same context with one row) or generated.
        tokens (`int`): tokens fed through the cache in loglikelihood batches, right padding included.
        quantized_read_tokens (`int`): of those, tokens fed while the cache already held quantized tokens, i.e.
            that attended to a quantized past.
        shared_prefix_tokens (`int`): tokens computed once for several rows that begin with them (row x tokens).
        generated_rows (`int`), generated_rows_quantized (`int`): generations, and those whose prompt was long
            enough for the cache to hold quantized tokens when generation ended.
        bytes (`int`): bytes each row's cache held at its end, summed over rows (padding included, for the rows
            of a loglikelihood batch: it holds the batch's longest row).
        bytes_16bit (`int`): the same for a 16-bit `DynamicCache` holding the same tokens.
        peak_bytes (`int`): the most one batch's cache held.
        seconds (`float`): time in the model's forward passes and generate calls.
    """

    rows: int = 0
    tokens: int = 0
    quantized_read_tokens: int = 0
    shared_prefix_tokens: int = 0
    generated_rows: int = 0
    generated_rows_quantized: int = 0
    bytes: int = 0
    bytes_16bit: int = 0
    peak_bytes: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        for name, value in asdict(CacheStats()).items():
            setattr(self, name, value)

    @property
    def read_quantized(self) -> bool:
        """Whether any scored token attended to a quantized past."""
        return self.quantized_read_tokens > 0 or self.generated_rows_quantized > 0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        rows = self.rows or 1
        out.update(
            mean_bytes_per_row=self.bytes / rows,
            vs_16bit=(self.bytes / self.bytes_16bit) if self.bytes_16bit else None,
            quantized_read_share=(self.quantized_read_tokens / self.tokens) if self.tokens else None,
        )
        return out


def _describe(cache: Any, config: RateQuantConfig | None) -> str:
    """A short name of the cache: its spec as given, or what the config is."""
    if config is None:
        return "none"
    if isinstance(cache, (str, os.PathLike)):
        return os.fspath(cache)
    return f"RateQuantConfig({config.quantizer}, {config.average_bits:g} bits, {config.method})"


def _cache_bytes(cache: Any) -> tuple[int, int]:
    """Bytes `cache` holds, and what a 16-bit `DynamicCache` would hold for the same tokens."""
    if isinstance(cache, RateQuantCache):
        return cache.nbytes, cache.nbytes_16bit()
    held = sixteen = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            for t in (layer.keys, layer.values):
                held += t.numel() * t.element_size()
                sixteen += t.numel() * 2
    return held, sixteen


def _quantized_tokens(cache: Any) -> int:
    """Tokens that some layer of `cache` holds quantized (neither in the full-precision window nor a sink)."""
    if not isinstance(cache, RateQuantCache):
        return 0
    sinks = cache.quant_config.sink_length
    most = 0
    for layer in cache.layers:
        if layer.is_initialized:
            left = layer.get_seq_length() - getattr(layer, "dropped", 0) - layer.keys.shape[-2]
            most = max(most, left - min(left, sinks))
    return most


def _common_prefix(rows: torch.Tensor) -> int:
    """Length of the longest prefix that every row of `rows` `(batch, tokens)` shares."""
    same = (rows == rows[:1]).all(0)
    return int(same.numel() if bool(same.all()) else same.long().argmin())


@register_model("ratequant", "hf-ratequant")
class RateQuantLM(HFLM):
    """lm-eval's `HFLM`, scoring every request through a fresh KV cache (see the module docstring).

    Args:
        pretrained (`str` or `PreTrainedModel`): as for `HFLM` (a model instance also needs `tokenizer`), or
            `"smollm2"`: the embedded default model with its tokenizer.
        cache (`str`, `RateQuantConfig` or `None`, *optional*, defaults to `None`): the cache to evaluate: `None` or
            `"none"` (a full-precision `DynamicCache`, fed the same way), a `RateQuantConfig`, `"uniform:BITS"`,
            `"kv:KBITS,VBITS"`, a saved config folder or a Hub repo id.
        sink_length (`int`, *optional*): sink tokens of `uniform:` and `kv:` caches (a multiple of 32; default:
            `CacheLayout`'s 32, as a calibrated config keeps); a saved config keeps its own.
        chunk (`int`, *optional*, defaults to 64): tokens per forward pass when scoring loglikelihoods.
        share_prefix (`bool`, *optional*, defaults to `True`): compute the prefix that all rows of a batch share
            once (the same numbers, up to float rounding).
        attention (`str`, *optional*, defaults to `"auto"`): `RateQuantCache`'s `attention` mode.
        kwargs: `HFLM`'s arguments (`tokenizer`, `batch_size`, `max_length`, `device`, `dtype`, ...).
    """

    def __init__(
        self,
        pretrained: Any,
        cache: Any = None,
        sink_length: int | None = None,
        chunk: int = 64,
        share_prefix: bool = True,
        attention: str = "auto",
        **kwargs,
    ) -> None:
        from .models import DEFAULT_MODEL

        if isinstance(pretrained, str) and pretrained == DEFAULT_MODEL:
            from .models import load_model

            pretrained, tokenizer = load_model(DEFAULT_MODEL)
            kwargs.setdefault("tokenizer", tokenizer)
        if not isinstance(pretrained, str) and kwargs.get("tokenizer") is None:
            raise ValueError("RateQuantLM(pretrained=<model instance>) needs its tokenizer: pass tokenizer=... "
                             "(lm-eval would otherwise look it up on the Hub by the model's name).")
        if int(chunk) < 1:
            raise ValueError(f"chunk={chunk} must be a positive number of tokens per forward pass.")
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise ValueError(
                f"RateQuantLM scores decoder-only (causal) models through their KV cache; this model uses lm-eval's "
                f"{self.backend!r} backend, whose encoder is not cached. Evaluate it with lm-eval's own 'hf' model."
            )
        self.quant_config = resolve_cache(cache, self.model, sink_length)
        self.cache_spec = _describe(cache, self.quant_config)
        self.chunk = int(chunk)
        self.share_prefix = bool(share_prefix)
        self.attention = attention
        self.cache_stats = CacheStats()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's `key=value,key=value` model arguments, where `cache=kv:3,2` keeps its comma."""
        protected = re.sub(r"(\bcache=kv:\s*\d+)\s*,\s*(\d+)", r"\1;\2", arg_string or "")
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(protected)
        if isinstance(args.get("cache"), str):
            args["cache"] = args["cache"].replace(";", ",")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**args, **extra)

    # ---- the cache ---------------------------------------------------------------------------------------------
    def new_cache(self):
        """A fresh cache for one batch: a `RateQuantCache` of `quant_config`, or a `DynamicCache` (full precision)."""
        if self.quant_config is None:
            return DynamicCache(config=self.model.config)
        return RateQuantCache(config=self.model.config, quant_config=self.quant_config, attention=self.attention)

    def _record(self, cache: Any, rows: int) -> None:
        held, sixteen = _cache_bytes(cache)
        stats = self.cache_stats
        stats.bytes += held
        stats.bytes_16bit += sixteen
        stats.peak_bytes = max(stats.peak_bytes, held)
        stats.rows += rows

    # ---- what HFLM calls ---------------------------------------------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(batch, tokens, vocab)` of the right-padded batch `inps`, fed in chunks through a fresh cache."""
        if attn_mask is not None or labels is not None:
            raise NotImplementedError("RateQuantLM scores decoder-only models only (an encoder attention mask and "
                                      "labels were passed, as for a seq2seq model).")
        start_time = time.perf_counter()
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                           enabled=self.mixed_precision_dtype is not None),
        ):
            logits = self._chunked_logits(inps)
        self.cache_stats.seconds += time.perf_counter() - start_time
        return logits

    def _chunked_logits(self, inps: torch.Tensor) -> torch.Tensor:
        batch, length = inps.shape
        cache = self.new_cache()
        stats = self.cache_stats
        shared = 0
        if self.share_prefix and batch > 1:
            # Stop at a chunk boundary before the first differing token, so the shared part is fed in the same chunks
            # as every row would be; one more token is always left to feed per row.
            shared = min(_common_prefix(inps), length - 1) // self.chunk * self.chunk
        out = None
        for start in range(0, length, self.chunk):
            stop = min(start + self.chunk, length)
            rows = inps[:1] if start < shared else inps
            if start == shared and shared:
                cache.batch_repeat_interleave(batch)
            reads_quantized = _quantized_tokens(cache) > 0
            logits = self.model(input_ids=rows[:, start:stop], use_cache=True,
                                **cache_kwargs(self.model, cache)).logits
            if out is None:
                out = logits.new_empty(batch, length, logits.shape[-1])
            out[:, start:stop] = logits
            stats.tokens += batch * (stop - start)
            stats.quantized_read_tokens += batch * (stop - start) * reads_quantized
            stats.shared_prefix_tokens += batch * (stop - start) * (start < shared)
        self._record(cache, batch)
        return out

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """`generate(past_key_values=<fresh cache>)` for every row of the left-padded batch `context`, one by one;
        the result is laid out as `HFLM` returns it: the padded context, then each row's new tokens (right-padded)."""
        given = [name for name in ("past_key_values", "cache") if name in generation_kwargs]
        if given:
            raise ValueError(f"RateQuantLM passes its own fresh cache to generate(); remove {given[0]} from the "
                             "task's generation_kwargs.")
        mask = generation_kwargs.pop("attention_mask", None)
        max_new = max_length - context.shape[1]
        new_tokens = []
        start_time = time.perf_counter()
        for i in range(context.shape[0]):
            ids = context[i : i + 1]
            if mask is not None:
                ids = ids[:, mask[i].bool()]
            cache = self.new_cache()
            out = super()._model_generate(
                ids, ids.shape[1] + max_new, stop, attention_mask=torch.ones_like(ids),
                **cache_kwargs(self.model, cache), **dict(generation_kwargs),
            )
            new_tokens.append(out[0, ids.shape[1] :])
            self._record(cache, 1)
            self.cache_stats.generated_rows += 1
            self.cache_stats.generated_rows_quantized += _quantized_tokens(cache) > 0
        self.cache_stats.seconds += time.perf_counter() - start_time
        width = max(t.numel() for t in new_tokens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        tail = context.new_full((context.shape[0], width), pad)
        for i, t in enumerate(new_tokens):
            tail[i, : t.numel()] = t
        return torch.cat([context, tail], dim=1)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        cfg = self.quant_config
        info["ratequant"] = {
            "cache": self.cache_spec,
            "average_bits": 16.0 if cfg is None else cfg.average_bits,
            "quantizer": None if cfg is None else cfg.quantizer,
            "group_size": None if cfg is None else cfg.group_size,
            "residual_length": None if cfg is None else cfg.residual_length,
            "sink_length": None if cfg is None else cfg.sink_length,
            "chunk": self.chunk,
        }
        return info


# ---- tasks ------------------------------------------------------------------------------------------------------
def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_tasks(tasks: list[str | dict], include_path: str | list[str] | None = None):
    """An lm-eval `TaskManager` and the loaded task (or group) objects, for `lm_eval.simple_evaluate(tasks=...)`;
    a task that cannot be loaded is an error naming it and what to change.

    lm-eval's own task index (thousands of YAML files, seconds to build) is only read when some task is neither a
    YAML file nor found under `include_path`."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("No tasks given: name lm-eval tasks, YAML files, or tasks under --include-path.")
    missing = [t for t in tasks if isinstance(t, str) and t.endswith((".yaml", ".yml")) and not os.path.isfile(t)]
    if missing:
        raise FileNotFoundError(f"No such task file: {', '.join(missing)}.")
    manager = TaskManager(include_path=include_path, include_defaults=False)
    local = all(isinstance(t, dict) or t in manager.all_tasks or os.path.isfile(t) for t in tasks)
    if not local:
        manager = TaskManager(include_path=include_path, include_defaults=True)
    objects = []
    for spec in tasks:
        name = spec.get("task", spec) if isinstance(spec, dict) else spec
        if isinstance(spec, str) and spec not in manager.all_tasks and not os.path.isfile(spec):
            where = f"lm-eval's tasks nor those under {include_path}" if include_path else "lm-eval's tasks"
            raise ValueError(f"Unknown lm-eval task {spec!r}: neither one of {where}, nor a YAML file. Check the "
                             "name, or pass the folder of its YAML with --include-path (include_path=...).")
        try:
            part = manager.load([spec])
        except Exception as e:  # datasets raises many kinds (ConnectionError, FileNotFoundError, DatasetNotFound...)
            raise _task_error(name, e) from e
        groups, children = part.get("groups", {}), part.get("group_map", {})
        nested = {c for members in children.values() for c in members}
        if groups:  # the group(s) this spec names, which hold their tasks
            objects += [g for n, g in groups.items() if n not in nested]
        else:  # a task, or the tasks of a tag
            objects += list(part["tasks"].values())
    return manager, objects


def _task_error(name: str, error: Exception) -> Exception:
    hint = (
        "A task that must run offline (or here, without the Hub) has to read local files: write a task YAML with "
        "`dataset_path: json` (or csv, parquet, text) and `dataset_kwargs: {data_files: {test: /path/to/data.jsonl}}` "
        "and pass its folder with --include-path (or the YAML path itself as the task)."
    )
    offline = " HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, so nothing is downloaded." if _offline() else ""
    return RuntimeError(f"lm-eval task {name!r} could not be loaded: {type(error).__name__}: {error}.{offline} {hint}")


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[str | dict],
    cache: Any = None,
    *,
    include_path: str | list[str] | None = None,
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    chunk: int = 64,
    sink_length: int | None = None,
    lm: RateQuantLM | None = None,
    loaded: tuple | None = None,
    **simple_evaluate_kwargs,
) -> dict:
    """Run lm-eval `tasks` with `model`'s KV cache `cache` (see [`RateQuantLM`]) and return lm-eval's results dict,
    with `results["ratequant"]` added: the cache, its average bits and [`CacheStats`] of the run.

    Args:
        tasks (`list`): lm-eval task names, YAML paths, or inline task configs.
        cache: as [`RateQuantLM`] accepts it (`None` for full precision).
        include_path (`str`, *optional*): a folder of task YAMLs (local tasks).
        batch_size (`int`, *optional*, defaults to 1), limit, num_fewshot: as `lm_eval.simple_evaluate`.
        lm ([`RateQuantLM`], *optional*): reuse this wrapper (its cache is replaced by `cache`).
        loaded (*optional*): `(task_manager, task_objects)` from [`load_tasks`], to load the tasks only once.
        simple_evaluate_kwargs: passed on (`bootstrap_iters`, `log_samples`, `gen_kwargs`, `random_seed`, ...).
    """
    import lm_eval

    manager, objects = loaded if loaded is not None else load_tasks(list(tasks), include_path)
    if lm is None:
        lm = RateQuantLM(pretrained=model, tokenizer=tokenizer, cache=cache, sink_length=sink_length, chunk=chunk,
                         batch_size=batch_size)
    else:
        lm.quant_config = resolve_cache(cache, lm.model, sink_length)
        lm.cache_spec = _describe(cache, lm.quant_config)
        lm.chunk, lm.batch_size_per_gpu = int(chunk), int(batch_size)
    lm.cache_stats.reset()
    # the Task objects loaded once (and checked) by load_tasks: lm-eval does not load their data again
    results = lm_eval.simple_evaluate(model=lm, tasks=objects, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, **simple_evaluate_kwargs)
    stats = lm.cache_stats
    if lm.quant_config is not None and not stats.read_quantized:
        warnings.warn(
            f"No token of this evaluation attended to a quantized past: every context was shorter than what the "
            f"cache keeps in full precision (residual_length={lm.quant_config.residual_length}, group_size="
            f"{lm.quant_config.group_size}, sink_length={lm.quant_config.sink_length}), so these scores are those of "
            "full precision. Use tasks with longer contexts (or more few-shot examples) to measure the cache.",
            RuntimeWarning, stacklevel=2,
        )
    if results is not None:
        cfg = lm.quant_config
        results["ratequant"] = {
            "cache": lm.cache_spec,
            "average_bits": 16.0 if cfg is None else cfg.average_bits,
            "chunk": lm.chunk,
            "stats": stats.summary(),
        }
    return results
