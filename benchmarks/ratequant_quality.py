"""Does a calibrated RateQuant allocation beat every fixed allocation of the same budget on held-out text?

For every quantizer and average-bit budget, `hf_ratequant.calibration.calibrate` is run on calibration text (timed,
next to one plain forward+backward pass over the same calibration tokens), and then every cache is evaluated
*through the real cache* (windows fed in chunks, quantized past + full-precision residual window) on evaluation text
that calibration never saw:

- the full-precision `DynamicCache` (once per run; its perplexity is the floor);
- every fixed allocation of the budget: uniform bits where the budget is an integer and every keys/values split
  (`hf_ratequant.allocation.fixed_allocations`); budgets such as 2.25 have none with equal key/value unit counts;
- the config `calibrate` returned ("chosen": the validation winner, which may itself be a fixed split);
- every RateQuant candidate recorded in `config.calibration["candidates"]` and kvq's fixed beta = 4 rule.

Perplexity and KL(full precision || cache) per predicted token are reported; the full-precision reference
log-probabilities are computed once per run and shared by every cache. Windows are evaluated in groups of
`--eval-batch-size` (default 1: one window at a time), so every row also has per-window numbers, and differences
between two caches come with a paired standard error over windows (a rough noise bar: there are few windows).

    HF_HUB_OFFLINE=1 python benchmarks/ratequant_quality.py                         # full default grid
    python benchmarks/ratequant_quality.py --quantizers kivi --budgets 2.5 3.0 --windows 4 --tag kivi_4w
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from _common import (
    CALIBRATION,
    EVALUATION,
    LAYOUT,
    MODEL_HELP,
    RESULTS_DIR,
    add_sink_length,
    layout_from_args,
    load_average,
    load_benchmark_model,
    machine,
    resolve_layout,
    time_fwd_bwd,
    write_results,
)

from hf_ratequant.settings import BUDGET_UNITS, MEASURES

logger = logging.getLogger("benchmarks.ratequant_quality")

CANDIDATE_ORDER = ("ratequant", "ratequant-measured", "ratequant-shrunk", "kvq-beta4")
NOISE_NOTE = (
    "METHOD.md: at 3 bits, changing a single unit moves perplexity and KL by 1 to 2% in either direction; smaller "
    "differences are not evidence."
)


@dataclass
class Row:
    quantizer: str
    budget: float | None
    cache: str  # "full precision", "uniform-3", "K3V2", "chosen (ratequant-shrunk)", "ratequant", "kvq-beta4", ...
    kind: str  # "full", "fixed", "chosen", "candidate"
    avg_bits: float
    key_bits_mean: float
    value_bits_mean: float
    perplexity: float = math.nan
    kl: float = math.nan
    tokens: int = 0
    seconds: float = 0.0
    validation_kl: float | None = None  # the score calibration gave it on its held-back calibration windows
    validation_stopped: bool = False  # the race stopped it early: validation_kl is a lower bound
    true_bits: float | None = None  # bits per stored element, scales and zero-points included (per element held)
    mib_4k: float | None = None  # MiB a bf16/fp16 model's cache holds at 4096 tokens, window and sinks included
    window_nll: list[float] = field(default_factory=list)  # mean NLL per token of every window group
    window_kl: list[float] = field(default_factory=list)
    window_tokens: list[int] = field(default_factory=list)


# ---- environment ------------------------------------------------------------------------------------------------



# ---- evaluation -------------------------------------------------------------------------------------------------


_PREFIXES: dict[tuple, object] = {}
"""`shared_prefix` per (windows, window group, R, S, G, chunk): the start of the windows every RateQuant cache of one
residual window, sink length and group size serves in full precision, run once for all of them."""


def evaluate(model, windows, refs, group: int, cfg, chunk: int) -> dict:
    """Evaluate `cfg` (None: full precision) window group by window group against the shared reference."""
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.evaluation import evaluate_quality, shared_prefix

    nll, kls, toks = [], [], []
    t0 = time.perf_counter()
    for g, ref in enumerate(refs):
        ids = windows[g * group : (g + 1) * group]
        if ref.windows != ids.shape[0]:  # evaluate_quality does not check this; a mismatch would broadcast
            raise RuntimeError(f"reference batch {g} has {ref.windows} windows, the evaluated batch {ids.shape[0]}")
        prefix = None
        if isinstance(cfg, RateQuantConfig):
            key = (id(windows), g, cfg.residual_length, cfg.sink_length, cfg.group_size, chunk)
            if key not in _PREFIXES:
                _PREFIXES[key] = shared_prefix(model, ids, cfg, chunk=chunk, batch_size=group, reference=[ref])
            prefix = _PREFIXES[key]
        r = evaluate_quality(model, ids, cfg, chunk=chunk, batch_size=group, progress=False, reference=[ref],
                             prefix=prefix)
        nll.append(math.log(r.perplexity))
        kls.append(r.kl)
        toks.append(r.tokens)
    total = sum(toks)
    return dict(
        perplexity=math.exp(sum(n * t for n, t in zip(nll, toks)) / total),
        kl=sum(k * t for k, t in zip(kls, toks)) / total,
        tokens=total,
        seconds=time.perf_counter() - t0,
        window_nll=nll,
        window_kl=kls,
        window_tokens=toks,
    )


def paired(a: Row, b: Row, metric: str) -> tuple[float, float | None]:
    """Mean over window groups of a - b (`"nll"`: per-token NLL = log-perplexity; `"kl"`) and its standard error."""
    xs, ys = (a.window_nll, b.window_nll) if metric == "nll" else (a.window_kl, b.window_kl)
    d = [x - y for x, y in zip(xs, ys)]
    mean = sum(d) / len(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
    return mean, se


def bits_config(bits: torch.Tensor, template, name: str):
    """`bits` `(layers, kv_heads, 2)` with the layout, budget, bounds and model of the config `template`."""
    from hf_ratequant import RateQuantConfig

    return RateQuantConfig.from_bits(bits, template.layout, fingerprint=template.fingerprint, method=name,
                                     budget=template.budget, b_min=template.b_min, b_max=template.b_max)


def make_row(quantizer: str, budget: float | None, cache: str, kind: str, cfg, result: dict, val=None,
             stopped: bool = False) -> Row:
    from hf_ratequant.footprint import REPORT_TOKENS, cache_bytes, true_bits_per_element

    mib = None
    if cfg is None:
        avg = kb = vb = true = 16.0
    else:
        bt = cfg.bits_tensor().double()
        avg, kb, vb = cfg.average_bits, float(bt[..., 0].mean()), float(bt[..., 1].mean())
        fp, true = cfg.fingerprint, None
        if fp is not None:  # each layer's elements counted by the tokens it holds (sliding layers hold fewer)
            true = true_bits_per_element(cfg, fp.head_dim, fingerprint=fp)
            mib = cache_bytes(cfg, fp, REPORT_TOKENS).total / 2**20
    return Row(quantizer=quantizer, budget=budget, cache=cache, kind=kind, avg_bits=avg, key_bits_mean=kb,
               value_bits_mean=vb, validation_kl=val, validation_stopped=stopped, true_bits=true, mib_4k=mib,
               **result)


# ---- one (quantizer, budget) --------------------------------------------------------------------------------------


CALIBRATION_KEYS = ("model", "samples", "validation", "seq_len", "b_min", "b_max", "group_size", "budget_unit",
                    "groups", "residual_length", "scale_bits", "sink_length", "batch_size", "chunk", "plain_measure",
                    "measure")
"""The settings `calibrate()` and the fixed configurations depend on besides the calibration text: a run that
evaluates an earlier run's configs (`--configs-from`) must have the same."""


def load_calibrated(path: str, args) -> dict:
    """The earlier run `path` (a `ratequant_quality` result) whose configs `--configs-from` evaluates, refused before
    any model work unless it ran with this run's calibration settings (`CALIBRATION_KEYS`; a key an older file lacks
    is that setting's default) and holds a config for every quantizer and budget asked."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        blocks = {(b["summary"]["quantizer"], float(b["summary"]["budget"])): b for b in run["blocks"]}
        if not all("key_bits" in b["config"] for b in blocks.values()):
            raise KeyError("config")
        theirs = run["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--configs-from {path}: not a ratequant_quality result with its configs "
                         f"({type(err).__name__}: {err}).") from err
    defaults = vars(parse_args([]))
    differs = [f"{k} {theirs.get(k, defaults[k])!r} instead of {getattr(args, k)!r}" for k in CALIBRATION_KEYS
               if theirs.get(k, defaults[k]) != getattr(args, k)]
    if differs:
        raise SystemExit(f"--configs-from {path}: that run calibrated with {'; '.join(differs)}; pass the same "
                         "settings, or calibrate (run without --configs-from).")
    missing = [f"{q} {b:g}" for q in args.quantizers for b in args.budgets if (q, b) not in blocks]
    if missing:
        held = ", ".join(f"{q} {b:g}" for q, b in blocks)
        raise SystemExit(f"--configs-from {path}: it holds no config for {', '.join(missing)} (it has {held}); "
                         "ask for those, or calibrate them (run without --configs-from).")
    run["blocks_by_key"] = blocks
    return run


def fixed_configs(args, model_config, quantizer: str, budget: float, layout) -> list:
    """`[(name, config)]`: every fixed configuration of `layout` of the budget that `args` (this script's options)
    compares with (true budgets: of its bytes; with 8-bit scales, of at most them, as calibration races them)."""
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.allocation import fixed_allocations
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import code_budget
    from hf_ratequant.options import OptionGrid, fixed_option_candidates

    fp = ModelFingerprint.from_model_config(model_config)
    n_heads = fp.num_layers * fp.num_kv_heads
    true_budget = args.budget_unit == "true"
    out = []
    if layout.scale_bits == 16:
        code = (code_budget(budget, quantizer, layout.group_size, fp.head_dim, args.b_min, args.b_max) if true_budget
                else budget)  # the splits at the layout's group: this many code bits store `budget` true bits
        for k_bits, v_bits in fixed_allocations(n_heads, n_heads, code, args.b_min, args.b_max):
            name = f"uniform-{k_bits}" if k_bits == v_bits else f"K{k_bits}V{v_bits}"
            out.append((name, RateQuantConfig.uniform(model_config, key_bits=k_bits, value_bits=v_bits,
                                                      layout=layout)))
    if true_budget and (args.groups or layout.scale_bits != 16):  # (bits, group) pairs of keys and values
        grid = OptionGrid.build(layout, tuple(args.groups or ()), list(range(args.b_min, args.b_max + 1)),
                                fp.head_dim)
        for c in fixed_option_candidates(grid, budget, fp.num_layers, fp.num_kv_heads):
            out.append((c.name, RateQuantConfig.from_bits(c.bits, layout, fingerprint=fp, method=c.name,
                                                          groups=c.groups)))
    return out


def run_budget(args, model, tok, windows, refs, fwd_bwd: dict, full: Row, quantizer: str, budget: float,
               source: dict | None = None) -> dict:
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.calibration import calibrate

    layout = layout_from_args(args, quantizer=quantizer)  # of the calibrated and of every fixed cache
    true_budget = args.budget_unit == "true"
    if source is not None:  # --configs-from: the earlier run's calibration, and its times
        block = source["blocks_by_key"][(quantizer, budget)]
        config = RateQuantConfig.from_dict(block["config"])
        config.check_model(model.config)
        calib = dict(wall_s=block["summary"]["calibration_wall_s"], cpu_s=block["summary"]["calibration_cpu_s"],
                     load_average=block["summary"].get("calibration_load_average"))
        logger.info("[%s %.4g] the config %s calibrated (not calibrating)", quantizer, budget, args.configs_from)
    else:
        logger.info("[%s %.4g] calibrating", quantizer, budget)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        config = calibrate(
            model, tok, args.calib_data, quantizer=quantizer, budget=budget, n_samples=args.samples,
            seq_len=args.seq_len, n_validation=args.validation, group_size=layout.group_size,
            residual_length=layout.residual_length, sink_length=layout.sink_length, scale_bits=layout.scale_bits,
            b_min=args.b_min, b_max=args.b_max,
            batch_size=args.batch_size, chunk=args.chunk, residual_aware=not args.plain_measure, progress=False,
            measure=args.measure, budget_unit=args.budget_unit, groups=tuple(args.groups) if args.groups else None,
        )
        calib = dict(wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0, load_average=load_average())
    if args.save_configs and source is None:
        config.save_pretrained(os.path.join(args.save_configs, f"{quantizer}-{budget:g}"))
    cal = config.calibration
    winner = cal["winner"]
    logger.info("[%s %.4g] calibration: %.1f s wall (%s), winner %s", quantizer, budget, calib["wall_s"],
                {k: round(v, 1) for k, v in cal["seconds"].items()}, winner)
    val, stopped = cal.get("validation_kl", {}), set(cal.get("validation_stopped", []))

    rows: list[Row] = []

    def add(cache: str, kind: str, cfg, val_kl=None):
        result = evaluate(model, windows, refs, args.eval_batch_size, cfg, args.chunk)
        row = make_row(quantizer, budget, cache, kind, cfg, result, val_kl, cache in stopped)
        rows.append(row)
        logger.info("[%s %.4g] %-28s bits %.3f  ppl %.3f  KL %.5f  (%.0f s)", quantizer, budget, cache,
                    row.avg_bits, row.perplexity, row.kl, row.seconds)
        return row

    fixed = fixed_configs(args, model.config, quantizer, budget, layout)
    for name, cfg in fixed:
        add(name, "fixed", cfg, val.get(name))
    if true_budget and layout.scale_bits != 16:  # the same bytes with 16-bit scales: the frontier to beat
        for name, cfg in fixed_configs(args, model.config, quantizer, budget,
                                       dataclasses.replace(layout, scale_bits=16)):
            add(f"{name} s16", "fixed", cfg)
    chosen = add(f"chosen ({winner})", "chosen", config, val.get(winner))
    chosen_bits = config.bits_tensor()
    same_as_chosen = None
    for name in sorted(cal["candidates"], key=lambda n: (CANDIDATE_ORDER + (n,)).index(n)):
        if not args.all_candidates and name not in ("ratequant", "kvq-beta4"):
            continue  # the chosen one is evaluated above; the closed form and kvq's rule are always shown
        bits = torch.tensor(cal["candidates"][name])
        row = add(name, "candidate", bits_config(bits, config, name), val.get(name))
        if torch.equal(bits, chosen_bits):
            same_as_chosen = row

    summary = summarize(quantizer, budget, rows, full, chosen, fixed, calib, fwd_bwd, cal, args)
    if same_as_chosen is not None:  # determinism check: the same bits rebuilt from the table, evaluated again
        summary["chosen_reproduced"] = (same_as_chosen.perplexity == chosen.perplexity
                                        and same_as_chosen.kl == chosen.kl)
    return dict(rows=rows, summary=summary, calibration=cal, config=config.to_dict())


def summarize(quantizer, budget, rows, full, chosen, fixed, calib, fwd_bwd, cal, args) -> dict:
    fixed_rows = [r for r in rows if r.kind == "fixed"]
    s = dict(quantizer=quantizer, budget=budget, winner=cal["winner"], chosen_ppl=chosen.perplexity,
             chosen_kl=chosen.kl, full_ppl=full.perplexity,
             calibration_wall_s=calib["wall_s"], calibration_cpu_s=calib["cpu_s"],
             calibration_internal_s=cal["seconds"], fwd_bwd_wall_s=fwd_bwd["wall_s"], fwd_bwd_cpu_s=fwd_bwd["cpu_s"],
             # the machine's load right after each timed phase (1, 5, 15 min): was it shared while timed?
             calibration_load_average=calib.get("load_average"), fwd_bwd_load_average=fwd_bwd.get("load_average"),
             ratio_wall=calib["wall_s"] / fwd_bwd["wall_s"], ratio_cpu=calib["cpu_s"] / fwd_bwd["cpu_s"],
             beta_median=cal.get("beta_median"), fit_r2_median=cal.get("fit_r2_median"))
    if not fixed_rows:
        s["note"] = (f"no fixed keys/values split reaches {budget:g} bits: equal key and value unit counts give "
                     f"(k + v) / 2, and k + v = {2 * budget:g} has no integer solution in "
                     f"[{args.b_min}, {args.b_max}]")
        return s
    best = min(fixed_rows, key=lambda r: r.perplexity)
    best_kl = min(fixed_rows, key=lambda r: r.kl)
    d_nll, se_nll = paired(chosen, best, "nll")
    d_kl, se_kl = paired(chosen, best_kl, "kl")
    gap = best.perplexity - full.perplexity
    s.update(
        best_fixed=best.cache, best_fixed_ppl=best.perplexity, best_fixed_kl=best.kl,
        best_fixed_by_kl=best_kl.cache, best_fixed_kl_min=best_kl.kl,
        beats_every_fixed_ppl=all(chosen.perplexity < r.perplexity for r in fixed_rows),
        beats_every_fixed_kl=all(chosen.kl < r.kl for r in fixed_rows),
        ppl_gap_recovered=(best.perplexity - chosen.perplexity) / gap if gap > 0 else None,
        kl_gap_recovered=(best_kl.kl - chosen.kl) / best_kl.kl if best_kl.kl > 0 else None,
        paired_dlogppl_vs_best_fixed=d_nll, paired_dlogppl_se=se_nll,
        paired_dkl_vs_best_fixed_by_kl=d_kl, paired_dkl_se=se_kl,
    )
    uniform = next((r for r in fixed_rows if r.cache.startswith("uniform-")), None)  # at most one of the budget
    if uniform is not None:
        s["uniform_kl"] = uniform.kl
        s["kl_vs_uniform"] = chosen.kl / uniform.kl - 1
        s["kl_within_2pct_of_uniform"] = chosen.kl <= 1.02 * uniform.kl
    return s


# ---- reporting --------------------------------------------------------------------------------------------------


def _f(x, fmt: str, na: str = "n/a") -> str:
    return na if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _yn(x) -> str:
    return "n/a" if x is None else ("yes" if x else "**no**")


def _pm(mean, se, fmt) -> str:
    return f"{mean:{fmt}}" + (f" ± {se:{fmt.lstrip('+')}}" if se is not None else "")


def markdown(payload: dict) -> str:
    a, m = payload["settings"], payload["machine"]
    lines = [
        "# RateQuant quality: calibrated allocation vs every fixed allocation of the same budget",
        "",
        f"Model: {payload['model']}, float32, {payload['geometry']}. "
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, shared with other work; load "
        f"average {m['load_average_start']} at start, {m.get('load_average_end')} at end), torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}. Total wall time {payload['total_s'] / 60:.1f} min.",
        "",
        f"- **Calibration text**: {payload['calib_source']} (sha256 {payload['calib_sha256']}); "
        f"{a['samples']} fit windows + {a['validation']} validation windows of {a['seq_len']} tokens, "
        f"b in [{a['b_min']}, {a['b_max']}], calibration batch size {a['batch_size']}, measure: "
        f"{a.get('measure', 'state')} (gradient-weighted error of the "
        f"{'attention output' if a.get('measure') == 'output' else 'states'}).",
        f"- **Evaluation text**: {payload['eval_source']} (sha256 {payload['eval_sha256']}); "
        f"{payload['eval_windows']} windows x {a['window']} tokens = {payload['eval_tokens']} predicted tokens, fed "
        f"in chunks of {a['chunk']} through the real cache, R = {a['residual_length']}, G = {a['group_size']}, "
        f"sink tokens S = {a.get('sink_length', 0)} (every quantized cache, fixed and calibrated alike).",
        f"- Full-precision reference log-probs computed once ({payload['reference_mib']:.0f} MiB, kept in "
        f"{a['ref_dtype']}) and shared by every cache; windows evaluated {a['eval_batch_size']} at a time, so every "
        "difference below has a paired standard error over window groups (± 1 SE; few windows: a rough bar).",
        f"- {NOISE_NOTE}",
        *([f"- **Calibrated by an earlier run**: every config comes from `{payload['configs_from']['file']}` (same "
           "model, calibration text and settings; calibration is deterministic), evaluated here; its calibration and "
           f"fwd+bwd seconds are that run's ({payload['configs_from']['machine']['cpu']}, "
           f"{payload['configs_from']['machine']['cores']} cores)."] if payload.get("configs_from") else []),
        *(["- **Budgets in true bits per element** (codes plus every group's 16-bit scale and zero-point); the "
           "fixed allocations are every keys/values split of the same bytes at G"
           + (f" and every fixed (bits, group) pair of keys and values of the same bytes over group sizes "
              f"{a['groups']}, which calibration chose from per unit" if a.get("groups") else "") + ". 'true bits' "
           "counts each layer's elements by the tokens it holds at 4096 tokens, as the budget does (a sliding-window "
           "layer holds fewer); 'MiB @ 4k' is the whole cache of a 16-bit model at 4096 tokens."]
          if a.get("budget_unit") == "true" else []),
        "",
        "## Summary",
        "",
        "| quantizer | budget | best fixed (ppl) | its ppl / KL | RateQuant chosen | ppl / KL | beats every fixed "
        "(ppl)? | (KL)? | Δlog-ppl vs best fixed ± SE | KL within 2% of uniform? | ppl gap recovered | calib s "
        "| fwd+bwd s | ratio (goal <= 3x) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in payload["summaries"]:
        if "best_fixed" in s:
            fixed = f"{s['best_fixed']}"
            fixed_num = f"{s['best_fixed_ppl']:.3f} / {s['best_fixed_kl']:.4f}"
            d = _pm(s["paired_dlogppl_vs_best_fixed"], s["paired_dlogppl_se"], "+.4f")
        else:
            fixed, fixed_num, d = "none (see note)", "-", "-"
        within = ("n/a" if "kl_within_2pct_of_uniform" not in s
                  else f"{_yn(s['kl_within_2pct_of_uniform'])} ({s['kl_vs_uniform']:+.1%})")
        lines.append(
            f"| {s['quantizer']} | {s['budget']:g} | {fixed} | {fixed_num} | {s['winner']} | "
            f"{s['chosen_ppl']:.3f} / {s['chosen_kl']:.4f} | {_yn(s.get('beats_every_fixed_ppl'))} | "
            f"{_yn(s.get('beats_every_fixed_kl'))} | {d} | {within} | {_f(s.get('ppl_gap_recovered'), '.0%')} | "
            f"{s['calibration_wall_s']:.1f} | {s['fwd_bwd_wall_s']:.1f} | {s['ratio_wall']:.1f}x "
            f"({s['ratio_cpu']:.1f}x CPU) |"
        )
    notes = [f"- {s['quantizer']} {s['budget']:g}: {s['note']}." for s in payload["summaries"] if "note" in s]
    lines += [
        "",
        "Best fixed = lowest perplexity among the fixed allocations. Δlog-ppl < 0 means RateQuant is better; "
        "'ppl gap recovered' = (best fixed - RateQuant) / (best fixed - full precision), negative when RateQuant is "
        "worse. Calibration seconds are the wall time of `calibrate()` (fit + validation of every candidate); "
        "fwd+bwd is one plain forward+backward pass over the same fit tokens with the same batch size, timed once "
        "per quantizer in the same process; the CPU-seconds ratio is less sensitive to other work on the machine.",
        *notes,
        "",
        "## Every cache",
        "",
        f"Full precision: perplexity {payload['full']['perplexity']:.3f} (KL 0) on these windows. 'val KL' is the "
        "score `calibrate` gave the allocation on its held-back *calibration* windows (how it picked the winner; "
        "'>': a lower bound, the race stopped it once it could no longer win).",
        "",
        "| quantizer | budget | cache | avg bits (K / V) | true bits | MiB @ 4k | perplexity | KL "
        "| Δlog-ppl vs chosen ± SE | val KL | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = payload["full"]
    lines.append(f"| - | - | full precision | 16 | 16 | | {full['perplexity']:.3f} | 0 | | | "
                 f"{full['seconds']:.0f} |")
    for block in payload["blocks"]:
        rows = [Row(**r) for r in block["rows"]]
        chosen = next(r for r in rows if r.kind == "chosen")
        for r in rows:
            d = "" if r is chosen else _pm(*paired(r, chosen, "nll"), "+.4f")
            name = f"**{r.cache}**" if r is chosen else r.cache
            lines.append(
                f"| {r.quantizer} | {r.budget:g} | {name} | {r.avg_bits:.3f} ({r.key_bits_mean:.2f} / "
                f"{r.value_bits_mean:.2f}) | {_f(r.true_bits, '.4g')} | {_f(r.mib_4k, '.2f')} | {r.perplexity:.3f} | "
                f"{r.kl:.4f} | {d} | "
                f"{'>' if r.validation_stopped else ''}{_f(r.validation_kl, '.4f')} | "
                f"{r.seconds:.0f} |"
            )
    lines += ["", "## Calibration details", ""]
    for block in payload["blocks"]:
        s, cal = block["summary"], block["calibration"]
        sec = ", ".join(f"{k} {v:.1f} s" for k, v in cal["seconds"].items())
        beta = cal.get("beta_median") or {}
        lines.append(
            f"- {s['quantizer']} {s['budget']:g}: winner {cal['winner']}; {sec}; fit tokens {cal['fit_tokens']}, "
            f"validation tokens {cal['validation_tokens']}; median beta keys {beta.get('key', math.nan):.2f} / values "
            f"{beta.get('value', math.nan):.2f}, median fit R² {cal.get('fit_r2_median', math.nan):.3f}"
            + (f"; chosen re-evaluated from its candidate table gives identical numbers: {s['chosen_reproduced']}"
               if "chosen_reproduced" in s else "")
        )
    lines.append("")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--quantizers", nargs="+", default=["kivi", "token", "rotated"])
    p.add_argument("--budgets", nargs="+", type=float, default=[2.25, 2.5, 3.0, 3.5])
    p.add_argument("--calib-data", default=None,
                   help="calibration text (default: WikiText-2 train; offline: the train half of pydoc topics;\n"
                   "'bbc': the calibration half of BBC News; 'pydoc+bbc': both, paragraph by paragraph)")
    p.add_argument("--eval-data", default=None,
                   help="evaluation text (default: WikiText-2 test; offline: the test half of pydoc topics;\n"
                   "'bbc': the held-out half of BBC News)")
    p.add_argument("--window", type=int, default=EVALUATION.window,
                   help=f"tokens per evaluation window (default {EVALUATION.window})")
    p.add_argument("--windows", type=int, default=EVALUATION.n_windows,
                   help=f"evaluation windows (default {EVALUATION.n_windows})")
    p.add_argument("--chunk", type=int, default=EVALUATION.chunk,
                   help=f"tokens fed per forward pass, evaluation and validation (default {EVALUATION.chunk})")
    p.add_argument("--samples", type=int, default=CALIBRATION.n_samples,
                   help=f"calibration fit windows (calibrate's n_samples, {CALIBRATION.n_samples})")
    p.add_argument("--validation", type=int, default=CALIBRATION.n_validation,
                   help=f"calibration validation windows (n_validation, {CALIBRATION.n_validation})")
    p.add_argument("--seq-len", type=int, default=CALIBRATION.seq_len,
                   help=f"calibration window length (default {CALIBRATION.seq_len})")
    p.add_argument("--b-min", type=int, default=CALIBRATION.b_min, help=f"default {CALIBRATION.b_min}")
    p.add_argument("--b-max", type=int, default=CALIBRATION.b_max, help=f"default {CALIBRATION.b_max}")
    p.add_argument("--group-size", type=int, default=LAYOUT.group_size, help=f"G (default {LAYOUT.group_size})")
    p.add_argument("--budget-unit", choices=BUDGET_UNITS, default="code",
                   help="what --budgets count: code bits per unit (default) or true bits per stored element; the "
                   "fixed splits are those of the same bytes")
    p.add_argument("--groups", type=int, nargs="+", default=None,
                   help="group sizes calibration may choose per unit (needs --budget-unit true); the fixed "
                   "(bits, group) pairs of keys and values of the same bytes are evaluated too")
    p.add_argument("--residual-length", type=int, default=LAYOUT.residual_length,
                   help=f"R (default {LAYOUT.residual_length})")
    p.add_argument("--scale-bits", type=int, choices=[16, 8], default=LAYOUT.scale_bits,
                   help="scales and zero-points of the calibrated and fixed caches in 16 or 8 bits (8 needs "
                   "--budget-unit true; the 16-bit fixed configurations of the same bytes are evaluated too)")
    add_sink_length(p, "by every quantized cache, fixed and calibrated")
    p.add_argument("--batch-size", type=int, default=CALIBRATION.batch_size,
                   help=f"calibration (and fwd+bwd) batch size (default {CALIBRATION.batch_size})")
    p.add_argument("--eval-batch-size", type=int, default=1,
                   help="evaluation windows per batch (default 1: per-window numbers for paired errors)")
    p.add_argument("--ref-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the shared reference log-probs are kept in (default float32)")
    p.add_argument("--plain-measure", action="store_true",
                   help="weight errors by gradients through all attention, the residual window included (the "
                        "measure before residual-aware calibration; for comparison)")
    p.add_argument("--measure", choices=MEASURES, default=CALIBRATION.measure,
                   help="calibrate's measure: gradient-weighted error of the attention output or of the states "
                        f"themselves (the measure before; default {CALIBRATION.measure})")
    p.add_argument("--all-candidates", action="store_true",
                   help="also evaluate the RateQuant candidates calibration did not choose (default: only the "
                        "closed form and kvq's beta = 4 rule next to the chosen one)")
    p.add_argument("--save-configs", default=os.path.join(RESULTS_DIR, "ratequant_quality_configs"),
                   help="folder to save every calibrated config in, as <quantizer>-<budget>/ ('' to skip)")
    p.add_argument("--configs-from", metavar="RUN.json", default=None,
                   help="evaluate the configs an earlier run of this script calibrated instead of calibrating (the\n"
                   "same model, calibration text and settings; its calibration and fwd+bwd times are reported):\n"
                   "the same calibration evaluated on other text")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="suffix of the output names: ratequant_quality_<tag>.md/.json")
    args = resolve_layout(p, p.parse_args(argv))
    if args.scale_bits != 16 and args.budget_unit != "true":
        p.error("--scale-bits 8 stores fewer bytes per group: give the budgets in true bits per element "
                "(--budget-unit true), so the fixed configurations compared are those of the same bytes")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.data import load_text, text_fingerprint, tokenize_windows
    from hf_ratequant.evaluation import ReferenceBatch, evaluation_windows, reference_logprobs

    start = time.perf_counter()
    info = machine()
    source = load_calibrated(args.configs_from, args) if args.configs_from else None
    model, tok, _ = load_benchmark_model(args.model, torch.float32, torch.device("cpu"))
    if tok is None:
        raise SystemExit("--model: this benchmark needs real text, so a model with a tokenizer (not random:).")
    fp = ModelFingerprint.from_model_config(model.config)
    n_units = 2 * fp.num_layers * fp.num_kv_heads
    for b in args.budgets:
        if abs(b * n_units - round(b * n_units)) > 1e-6:
            raise SystemExit(f"budget {b} x {n_units} units is not a whole number of bits; pick a multiple of "
                             f"1/{n_units}")

    calib_text, calib_source = load_text(args.calib_data, split="train")
    eval_text, eval_source = load_text(args.eval_data, split="test")
    if text_fingerprint(calib_text) == text_fingerprint(eval_text):
        logger.warning("Calibration and evaluation text are identical: the evaluation is NOT held out.")
    if source is not None and source["calib_sha256"] != text_fingerprint(calib_text):
        raise SystemExit(f"--configs-from {args.configs_from}: that run calibrated on {source['calib_source']} "
                         f"(sha256 {source['calib_sha256']}), this run's calibration text is {calib_source} (sha256 "
                         f"{text_fingerprint(calib_text)}): pass its --calib-data.")
    # The same windows calibrate() fits on (it tokenizes the same text the same way).
    calib_ids = tokenize_windows(tok, calib_text, seq_len=args.seq_len, n_windows=args.samples + args.validation,
                                 min_windows=args.samples + args.validation)[: args.samples]
    windows = evaluation_windows(tok, args.eval_data, window=args.window, max_windows=args.windows)
    group = args.eval_batch_size

    t0 = time.perf_counter()
    refs = reference_logprobs(model, windows, batch_size=group)
    if args.ref_dtype == "bfloat16":  # stored log-probabilities only: the hidden states are small already
        refs = [r if r.logprobs is None else ReferenceBatch(logprobs=r.logprobs.to(torch.bfloat16)) for r in refs]
    ref_mib = sum(r.nbytes for r in refs) / 2**20
    logger.info("reference log-probs: %.0f MiB in %.1f s", ref_mib, time.perf_counter() - t0)
    full_result = evaluate(model, windows, refs, group, None, args.chunk)
    full = make_row("-", None, "full precision", "full", None, full_result)
    logger.info("full precision: ppl %.3f (%.0f s)", full.perplexity, full.seconds)

    blocks = []
    for quantizer in args.quantizers:
        if source is not None:  # the earlier run's, timed beside its calibrations
            s = source["blocks_by_key"][(quantizer, args.budgets[0])]["summary"]
            fwd_bwd = dict(wall_s=s["fwd_bwd_wall_s"], cpu_s=s["fwd_bwd_cpu_s"],
                           load_average=s.get("fwd_bwd_load_average"))
        else:
            logger.info("[%s] timing one plain forward+backward over %d calibration tokens", quantizer,
                        calib_ids.numel())
            fwd_bwd = time_fwd_bwd(model, calib_ids, args.batch_size) | dict(load_average=load_average())
        logger.info("[%s] forward+backward: %.1f s wall, %.1f s CPU", quantizer, fwd_bwd["wall_s"], fwd_bwd["cpu_s"])
        for budget in args.budgets:
            blocks.append(run_budget(args, model, tok, windows, refs, fwd_bwd, full, quantizer, budget, source))
            logger.info("summary %s", {k: v for k, v in blocks[-1]["summary"].items() if not isinstance(v, dict)})

    info["load_average_end"] = load_average()
    payload = dict(
        settings=vars(args),
        machine=info,
        model=model.config._name_or_path,
        geometry=fp.describe(),
        calib_source=calib_source,
        calib_sha256=text_fingerprint(calib_text),
        eval_source=eval_source,
        eval_sha256=text_fingerprint(eval_text),
        eval_windows=int(windows.shape[0]),
        eval_tokens=full.tokens,
        reference_mib=ref_mib,
        full=asdict(full),
        summaries=[b["summary"] for b in blocks],
        blocks=[dict(summary=b["summary"], calibration=b["calibration"], config=b["config"],
                     rows=[asdict(r) for r in b["rows"]]) for b in blocks],
        total_s=time.perf_counter() - start,
    )
    if source is not None:
        payload["configs_from"] = dict(file=os.path.basename(args.configs_from), machine=source["machine"])
    md = markdown(payload)
    stem = "ratequant_quality" + (f"_{args.tag}" if args.tag else "")
    json_path, md_path = write_results(stem, payload, md, args.output_dir)
    print(md)
    logger.info("wrote %s and %s (%.1f min)", md_path, json_path, payload["total_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
