"""Quality against memory: is RateQuant, allocating bits and group sizes per unit under a budget in true bits, below
every other cache of the same bytes?

One run, one model (SmolLM2-135M-Instruct unless `--model` says otherwise), one held-out text, one shared
full-precision reference; every cache is measured through the real cache (`ratequant_quality.evaluate`: windows fed
in chunks, quantized past plus full-precision window):

- every fixed configuration of our designs between `--min-true` and the largest budget in true bits per element:
  one (bits, group) option for all keys and one for all values, uniform or split by one bit either way, any group
  size the design can take (kivi: keys over 32 / 64 / 128 tokens, values over 32 / 64 channels; the per-token
  designs: one row group of 16 / 32 / 64 channels for keys and values alike);
- transformers' `QuantizedCache` (quanto 2 and 4 bits, HQQ 2, 3 and 4 bits) at q_group_size 32, 64 and 128;
- RateQuant for each design of `--ratequant` at every budget of `--budgets` true bits per element, calibrated with
  the library's defaults and `groups=` the design's option grid (reused from `--configs-from DIR/<design>-<budget>`
  when a config of the same layout, bit range, group grid and budget is there; calibration seconds are then read
  from its record).

`--scale-bits 16 8` lists the fixed configurations and calibrates RateQuant with each precision of scales and
zero-points (8: one byte each per group, relative to three 16-bit numbers per super-block; `CacheLayout.scale_bits`).
`--merge RUN.json` adds the caches an earlier run of this benchmark measured (same model, held-out text and
evaluation settings; its full-precision figures must equal this run's, window by window) and measures only the
others (and those that failed there), so a new precision or design extends a finished frontier instead of
repeating it.

Memory: the mean MiB a cache of bfloat16 states holds over 4096 to 4223 tokens (the window's share changes as the
sequence moves between two releases): `footprint.cache_bytes` for ours (equal to `RateQuantCache.nbytes`, tested),
and for `QuantizedCache` the bytes of every tensor it holds, measured after a 4096-token prefill and each of the
127 decode steps after it. The checks: at each budget, RateQuant's KL against the lowest KL of every fixed
configuration with no more bytes held (any design), of every fixed configuration of no more true bits, and of every
`QuantizedCache` with no more bytes held.

    pip install -e ".[baselines]"                 # optimum-quanto and hqq for QuantizedCache
    HF_HUB_OFFLINE=1 python benchmarks/byte_frontier.py        # CPU fp32, default model (~1.5 h on 2 cores)
    python benchmarks/byte_frontier.py --from-json benchmarks/results/byte_frontier.json   # redraw only

Writes `byte_frontier.md`, `.json` and `byte_frontier.png` to `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
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
    held_mib,
    load_average,
    load_benchmark_model,
    machine,
    time_fwd_bwd,
    window_difference,
    write_results,
)
from field_comparison import cache_bytes, quantized_cache
from ratequant_quality import evaluate, paired

from hf_ratequant.models import cache_kwargs

logger = logging.getLogger("benchmarks.byte_frontier")

DESIGNS = ("kivi", "token", "rotated")
OPTION_GROUPS = {"kivi": (64, 128), "token": (16, 32), "rotated": (16, 32)}  # besides the layout's own groups
QC_BACKENDS = {"quanto": (2, 4), "hqq": (2, 3, 4)}
MEMORY_TOKENS = (4096, 4224)  # held bytes are averaged over these lengths (end excluded)


@dataclass
class Point:
    method: str
    family: str  # "fixed", "quanto", "hqq", "ratequant", "full"
    design: str | None
    true_bits: float | None = None  # bits per element of the quantized part, metadata included (ours)
    budget: float | None = None  # RateQuant: the budget in true bits per element
    mib: float | None = None  # mean MiB held over MEMORY_TOKENS tokens, bfloat16 states
    perplexity: float | None = None
    kl: float | None = None
    window_nll: list = field(default_factory=list)
    window_kl: list = field(default_factory=list)
    seconds: float | None = None
    calibration_s: float | None = None
    fwd_bwd_s: float | None = None
    options: str = ""  # RateQuant: how many units use each (bits, group)
    error: str | None = None
    note: str = ""
    scale_bits: int = 16  # ours: scales and zero-points in 16 or 8 bits


def precision_suffix(scale_bits: int) -> str:
    """What a name says of its scales: nothing for 16 bits (the default), else `", 8-bit scales"`."""
    return "" if scale_bits == 16 else f", {scale_bits}-bit scales"


# ---- the methods --------------------------------------------------------------------------------------------------


def fixed_configs(model_config, design: str, min_true: float, max_true: float, b_min: int, b_max: int,
                  scale_bits: int = 16):
    """`[(name, config, true bits)]`: every fixed (bits, group) configuration of `design` between `min_true` and
    `max_true` true bits per element, scales and zero-points in `scale_bits` (see the module docstring)."""
    from hf_ratequant import RateQuantConfig
    from hf_ratequant.config import CacheLayout, ModelFingerprint
    from hf_ratequant.footprint import option_bits_per_element, option_groups

    fp = ModelFingerprint.from_model_config(model_config)
    layout = CacheLayout(quantizer=design, scale_bits=scale_bits)
    usable = option_groups(design, layout.group_size, OPTION_GROUPS[design], fp.head_dim)
    tied = design != "kivi"  # the per-token designs group keys and values along the same (channel) axis
    out = []
    for kb in range(b_min, b_max + 1):
        for vb in range(max(b_min, kb - 1), min(b_max, kb + 1) + 1):
            for kg in usable["key"]:
                for vg in usable["value"]:
                    if tied and kg != vg:
                        continue
                    true = (option_bits_per_element(design, kb, kg, "key", fp.head_dim, scale_bits=scale_bits)
                            + option_bits_per_element(design, vb, vg, "value", fp.head_dim,
                                                      scale_bits=scale_bits)) / 2
                    if not min_true - 1e-9 <= true <= max_true + 1e-9:
                        continue
                    cfg = RateQuantConfig.uniform(fp, key_bits=kb, value_bits=vb, layout=layout, key_group=kg,
                                                  value_group=vg)
                    out.append((f"{design} K{kb}g{kg}V{vb}g{vg}{precision_suffix(scale_bits)}", cfg, true))
    return out


def _matches(cfg, design: str, budget: float, b_min: int, b_max: int, scale_bits: int = 16) -> str | None:
    """Why a saved config is not the one this run would calibrate (None: it is)."""
    from hf_ratequant.config import CacheLayout

    cal = cfg.calibration or {}
    wanted = dict(asdict(CacheLayout(quantizer=design, scale_bits=scale_bits)), b_min=b_min, b_max=b_max)
    differs = [f"{k} {getattr(cfg, k)} instead of {v}" for k, v in wanted.items() if getattr(cfg, k) != v]
    grid = sorted(set(OPTION_GROUPS[design]) | {cfg.group_size})
    if cal.get("true_budget") != budget:
        differs.append(f"true budget {cal.get('true_budget')} instead of {budget}")
    if not set(grid) <= set(cal.get("group_grid") or ()):
        differs.append(f"group grid {cal.get('group_grid')} instead of one holding {grid}")
    return ", ".join(differs) or None


def config_folder(design: str, budget: float, scale_bits: int) -> str:
    """The folder name of a RateQuant config under `--configs-from` / `--save-configs`."""
    return f"{design}-{budget:g}" + ("" if scale_bits == 16 else f"-s{scale_bits}")


def ratequant_config(args, model, tok, design: str, budget: float, scale_bits: int = 16):
    """`(config, calibration seconds, note)`: reused from `--configs-from` when it is this run's, else calibrated."""
    from hf_ratequant import RateQuantConfig, calibrate

    name = config_folder(design, budget, scale_bits)
    folder = os.path.join(args.configs_from, name) if args.configs_from else None
    if folder and os.path.isdir(folder):
        cfg = RateQuantConfig.from_pretrained(folder)
        try:
            cfg.check_model(model.config)
            why = _matches(cfg, design, budget, args.b_min, args.b_max, scale_bits)
        except ValueError as err:
            why = str(err)
        if why is None:
            return cfg, cfg.calibration["seconds"]["total"], f"config from {folder} (its own calibration time)"
        logger.warning("Not reusing %s (%s): calibrating instead.", folder, why)
    t0 = time.perf_counter()
    cfg = calibrate(model, tok, args.calib_data, quantizer=design, budget=budget, budget_unit="true",
                    groups=OPTION_GROUPS[design], b_min=args.b_min, b_max=args.b_max, scale_bits=scale_bits,
                    progress=False)
    seconds = time.perf_counter() - t0
    if args.save_configs:
        cfg.save_pretrained(os.path.join(args.save_configs, name))
    return cfg, seconds, "calibrated in this run"


def option_histogram(cfg) -> str:
    """`"K 2b g128: 61, ..."`: how many units use each (bits, group)."""
    bits, groups = cfg.bits_tensor(), cfg.groups_tensor(cfg.fingerprint.head_dim)
    counts: dict[tuple, int] = {}
    for k, kind in enumerate("KV"):
        for b, g in zip(bits[..., k].flatten().tolist(), groups[..., k].flatten().tolist()):
            counts[(kind, b, g)] = counts.get((kind, b, g), 0) + 1
    return ", ".join(f"{kind} {b}b g{g}: {n}" for (kind, b, g), n in sorted(counts.items(), key=lambda kv: (
        kv[0][0], -kv[1])))


# ---- memory -------------------------------------------------------------------------------------------------------


def quantized_cache_mib(make, states) -> float:
    """Mean MiB a `QuantizedCache` holds after a prefill of MEMORY_TOKENS[0] tokens and each decode step up to
    MEMORY_TOKENS[1] (its residual grows token by token between two re-quantizations)."""
    start, stop = MEMORY_TOKENS
    cache = make()
    sizes = []
    with torch.inference_mode():
        for i, (k, v) in enumerate(states):
            cache.update(k[:, :, :start], v[:, :, :start], i)
        sizes.append(cache_bytes(cache))
        for t in range(start, stop - 1):
            for i, (k, v) in enumerate(states):
                cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], i)
            sizes.append(cache_bytes(cache))
    return sum(sizes) / len(sizes) / 2**20


def long_states(model, tok, eval_data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer `(keys, values)` of MEMORY_TOKENS[1] tokens of held-out text, cast to bfloat16."""
    from transformers import DynamicCache

    from hf_ratequant.data import load_text, tokenize_windows

    text, _ = load_text(eval_data, split="test")
    ids = tokenize_windows(tok, text, seq_len=MEMORY_TOKENS[1], n_windows=1)
    ref = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, **cache_kwargs(model, ref), use_cache=True, logits_to_keep=1)
    return [(layer.keys.to(torch.bfloat16), layer.values.to(torch.bfloat16)) for layer in ref.layers]


# ---- the checks ---------------------------------------------------------------------------------------------------


def verdicts(points: list[Point]) -> list[dict]:
    """Per RateQuant point, the best (lowest-KL) competitor of each kind that fits in its bytes."""
    ok = [p for p in points if p.kl is not None and p.error is None]
    fixed = [p for p in ok if p.family == "fixed"]
    qc = [p for p in ok if p.family in QC_BACKENDS]
    out = []
    for r in (p for p in ok if p.family == "ratequant"):
        entry = dict(method=r.method, design=r.design, budget=r.budget, kl=r.kl, perplexity=r.perplexity, mib=r.mib,
                     true_bits=r.true_bits, scale_bits=r.scale_bits, checks={})
        for what, pool in (
            ("fixed, bytes held <=", [p for p in fixed if p.mib <= r.mib + 1e-9]),
            ("fixed, true bits <=", [p for p in fixed if p.true_bits <= r.budget + 1e-9]),
            ("QuantizedCache, bytes held <=", [p for p in qc if p.mib <= r.mib + 1e-9]),
        ):
            best = min(pool, key=lambda p: p.kl, default=None)
            if best is None:
                entry["checks"][what] = None
                continue
            dkl, se = paired(r, best, "kl")
            entry["checks"][what] = dict(best=best.method, kl=best.kl, perplexity=best.perplexity, mib=best.mib,
                                         below=r.kl < best.kl, d_kl=dkl, d_kl_se=se)
        out.append(entry)
    return out


# ---- report -------------------------------------------------------------------------------------------------------


def _f(x, fmt: str, na: str = "-") -> str:
    return na if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def merged_line(merged: dict) -> str:
    """What a merged run took from the earlier one, and the proof that the two measure alike."""
    proof = ", ".join(f"{name} {diff:.1e}" for name, diff in merged["max_window_difference"].items())
    return (f"{merged['points']} of these caches were measured by the earlier run `{merged['file']}` (same model, "
            f"texts and settings) and merged; re-measured here, their largest difference window by window: {proof}.")


def markdown(payload: dict) -> str:
    s, m = payload["settings"], payload["machine"]
    points = [Point(**p) for p in payload["points"]]
    full = next(p for p in points if p.family == "full")
    lo, hi = MEMORY_TOKENS
    out = [
        "# Quality against memory",
        "",
        f"Model {payload['model']} ({payload['geometry']}), fp32 on the CPU; machine: {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}, transformers {m['transformers']}.",
        f"Calibration: {payload['calib_source']}; held-out: {payload['eval_tokens']} tokens of "
        f"{payload['eval_source']}, windows of {s['window']} fed in chunks of {s['chunk']}; full-precision perplexity "
        f"{full.perplexity:.3f}. Our caches: G = {LAYOUT.group_size}, R = {LAYOUT.residual_length}, "
        f"S = {LAYOUT.sink_length} sinks, bits {s['b_min']}..{s['b_max']}; QuantizedCache: R = "
        f"{LAYOUT.residual_length}, no sinks. MiB: mean bytes held over {lo} to {hi - 1} tokens of bfloat16 states "
        f"(codes, scales, zero-points, window and sinks).",
        *([merged_line(payload["merged"])] if payload.get("merged") else []),
        "",
        "## The checks",
        "",
        "| design | budget (true bits) | RateQuant ppl / KL | MiB | best fixed, bytes held <= | best fixed, true bits "
        "<= | best QuantizedCache, bytes held <= | KL below all three |",
        "|---|---:|---|---:|---|---|---|---|",
    ]

    def cell(c):
        if c is None:
            return "none fits"
        se = f" ± {c['d_kl_se']:.4f}" if c.get("d_kl_se") is not None else ""
        return (f"{c['best']} {c['perplexity']:.3f} / {c['kl']:.4f} ({c['mib']:.2f} MiB; ΔKL {c['d_kl']:+.4f}{se})")

    for v in payload["verdicts"]:
        below = all(c is None or c["below"] for c in v["checks"].values())
        design = v["design"] + precision_suffix(v.get("scale_bits", 16))
        out.append(f"| {design} | {v['budget']:g} | {v['perplexity']:.3f} / {v['kl']:.4f} | {v['mib']:.2f} | "
                   + " | ".join(cell(v["checks"][k]) for k in ("fixed, bytes held <=", "fixed, true bits <=",
                                                               "QuantizedCache, bytes held <="))
                   + f" | {'yes' if below else '**no**'} |")
    out += ["", "## RateQuant", "",
            "| design | budget | true bits | ppl | KL | MiB | calibration s (x fwd+bwd) | options used (units) |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in (p for p in points if p.family == "ratequant"):
        ratio = p.calibration_s / p.fwd_bwd_s if p.calibration_s and p.fwd_bwd_s else None
        out.append(f"| {p.design}{precision_suffix(p.scale_bits)} | {p.budget:g} | {_f(p.true_bits, '.3f')} | "
                   f"{_f(p.perplexity, '.3f')} | "
                   f"{_f(p.kl, '.4f')} | {_f(p.mib, '.2f')} | {_f(p.calibration_s, '.0f')} ({_f(ratio, '.1f')}x) | "
                   f"{p.options} |")
    out += ["", "## Every other cache", "", "| method | true bits | MiB (bits per element held) | ppl | KL |",
            "|---|---:|---:|---:|---:|"]
    full_mib = full.mib
    for p in sorted((p for p in points if p.family != "ratequant"), key=lambda p: (p.mib or 0.0)):
        if p.error:
            out.append(f"| {p.method} | | | failed: {p.error} | |")
            continue
        held = 16 * p.mib / full_mib if p.mib is not None else None
        out.append(f"| {p.method} | {_f(p.true_bits, '.3f')} | {_f(p.mib, '.2f')} ({_f(held, '.2f')}) | "
                   f"{_f(p.perplexity, '.3f')} | {_f(p.kl, '.4f')} |")
    notes = [f"- {p.method}: {p.note}" for p in points if p.note]
    if notes:
        out += ["", "## Notes", ""] + notes
    out += ["", f"Total run time {payload['total_s'] / 60:.1f} min; load average at the end "
            f"{m.get('load_average_end')}.", ""]
    return "\n".join(out)


SERIES = tuple((design, sb) for sb in (16, 8) for design in DESIGNS)  # (design, scale bits): a marker / line each
COLOR = {"kivi": "tab:blue", "token": "tab:orange", "rotated": "tab:green", "quanto": "tab:gray", "hqq": "tab:brown"}


def _envelope(points: list[Point], metric: str) -> tuple[list[float], list[float]]:
    """The lower staircase of `metric` against MiB: the best value at no more bytes, at every point's bytes."""
    xs, ys, best = [], [], math.inf
    for p in sorted(points, key=lambda p: p.mib):
        value = getattr(p, metric)
        if value < best:
            if xs:
                xs.append(p.mib)
                ys.append(best)
            best = value
            xs.append(p.mib)
            ys.append(best)
    return xs, ys


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [Point(**p) for p in payload["points"] if p["kl"] is not None and p["error"] is None]
    full = next(p for p in points if p.family == "full")
    others = [p for p in points if p.family not in ("ratequant", "full")]
    hi = max((p.mib for p in points if p.family == "ratequant"), default=math.inf) * 1.15
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric in zip(axes, ("kl", "perplexity")):
        for fam in ("fixed", "quanto", "hqq"):
            for design, sb in SERIES if fam == "fixed" else ((None, 16),):
                pts = [p for p in others if p.family == fam and (design is None or p.design == design)
                       and p.scale_bits == sb and p.mib <= hi]
                if pts:
                    marker = ("." if sb == 16 else "x") if fam == "fixed" else ("s" if fam == "quanto" else "D")
                    ax.scatter([p.mib for p in pts], [getattr(p, metric) for p in pts], s=12 if fam == "fixed" else 30,
                               marker=marker,
                               color=COLOR[design or fam], alpha=0.5,
                               label=f"{design} fixed (bits x group{precision_suffix(sb)})" if fam == "fixed"
                               else f"QuantizedCache {fam}")
        xs, ys = _envelope([p for p in others if p.mib <= hi], metric)
        ax.step(xs, ys, where="post", color="k", lw=1.2, ls="--", label="best of all others at no more bytes")
        for design, sb in SERIES:
            pts = sorted((p for p in points if p.family == "ratequant" and p.design == design and p.scale_bits == sb),
                         key=lambda p: p.mib)
            if pts:
                ax.plot([p.mib for p in pts], [getattr(p, metric) for p in pts], marker="o", lw=2.2,
                        ls="-" if sb == 16 else ":", color=COLOR[design],
                        label=f"RateQuant {design}{precision_suffix(sb)}")
        if metric == "perplexity":
            ax.axhline(full.perplexity, color="k", lw=0.8, alpha=0.5)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel(f"MiB held at {MEMORY_TOKENS[0]}-{MEMORY_TOKENS[1] - 1} tokens (bf16; scales, window, sinks)")
        ax.set_ylabel("KL to full precision (nats/token)" if metric == "kl" else "perplexity (held-out)")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{payload['model']}: quality against cache memory, held-out text "
                 f"(full-precision perplexity {full.perplexity:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stem(tag: str | None) -> str:
    """The result files' name: `byte_frontier` or `byte_frontier_<tag>` (.json, .md, .png)."""
    return f"byte_frontier_{tag}" if tag else "byte_frontier"


def write_report(payload: dict, output_dir: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    name = stem(payload["settings"].get("tag"))
    plot(payload, os.path.join(output_dir, f"{name}.png"))
    md = markdown(payload)
    write_results(name, payload, md, output_dir)
    return md


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 5.0],
                   help="RateQuant budgets in true bits per element (metadata included)")
    p.add_argument("--ratequant", nargs="*", default=list(DESIGNS), choices=DESIGNS,
                   help="designs calibrated at every budget")
    p.add_argument("--fixed", nargs="*", default=list(DESIGNS), choices=DESIGNS, help="designs of the fixed rows")
    p.add_argument("--scale-bits", type=int, nargs="+", default=[16], choices=(16, 8),
                   help="precisions of scales and zero-points, for the fixed configurations and RateQuant alike")
    p.add_argument("--merge", metavar="RUN.json", help="add the caches an earlier run of this benchmark measured "
                   "(same model, text and settings) and measure only the others")
    p.add_argument("--tag", help="write byte_frontier_<tag>.json/.md/.png instead of byte_frontier.*")
    p.add_argument("--min-true", type=float, default=2.0, help="fewest true bits of a fixed configuration listed")
    p.add_argument("--qc-groups", type=int, nargs="*", default=[32, 64, 128], help="QuantizedCache q_group_size")
    p.add_argument("--configs-from", metavar="DIR", help="reuse DIR/<design>-<budget> when it is this run's config")
    p.add_argument("--save-configs", metavar="DIR", help="save configs calibrated here as DIR/<design>-<budget>")
    p.add_argument("--calib-data", default=None, help="calibration text (default: WikiText-2 train)")
    p.add_argument("--eval-data", default=None, help="held-out text (default: WikiText-2 test)")
    p.add_argument("--b-min", type=int, default=CALIBRATION.b_min)
    p.add_argument("--b-max", type=int, default=CALIBRATION.b_max)
    p.add_argument("--window", type=int, default=EVALUATION.window)
    p.add_argument("--windows", type=int, default=EVALUATION.n_windows)
    p.add_argument("--chunk", type=int, default=EVALUATION.chunk)
    p.add_argument("--output-dir", default=RESULTS_DIR)
    p.add_argument("--from-json", metavar="PATH", help="only redraw the table and plot of a finished run's JSON")
    return p.parse_args(argv)


MERGE_KEYS = ("model", "calib_data", "eval_data", "b_min", "b_max", "window", "windows", "chunk")


def load_merge(path: str, args) -> tuple[dict, list[Point]]:
    """`(run, points)` of the earlier run `path`, refused before any model work unless it ran with this run's model,
    texts and evaluation settings (`MERGE_KEYS`)."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        points = [Point(**p) for p in run["points"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--merge {path}: not a byte_frontier result ({type(err).__name__}: {err}).") from err
    s = run.get("settings", {})
    differs = [f"{k} {s.get(k)!r} instead of {getattr(args, k)!r}" for k in MERGE_KEYS if s.get(k) != getattr(args, k)]
    if differs:
        raise SystemExit(f"--merge {path}: that run used {'; '.join(differs)}; its caches are not comparable with "
                         "this run's (pass the same settings, or run without --merge).")
    return run, points


def same_figures(a: Point, b: Point, tol: float = 1e-6) -> float:
    """The largest difference between two measurements of one cache, window by window (NLL and KL); a
    `SystemExit` above `tol`: the earlier run's figures cannot be merged with this run's."""
    diff = window_difference(a.window_nll, a.window_kl, b.window_nll, b.window_kl)
    if diff > tol:
        raise SystemExit(f"--merge: {a.method} measures {diff:.2e} away from the earlier run's figures (windows "
                         f"{len(b.window_nll)} vs {len(a.window_nll)}): not the same protocol or code; run without "
                         "--merge.")
    return diff


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            print(write_report(json.load(f), args.output_dir))
        return 0
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.data import load_text, text_fingerprint, tokenize_windows
    from hf_ratequant.evaluation import evaluation_windows, reference_logprobs
    from hf_ratequant.footprint import true_bits_per_element

    earlier_run, earlier = load_merge(args.merge, args) if args.merge else ({}, [])
    earlier = [p for p in earlier if p.error is None]  # what failed there is measured again
    done = {p.method for p in earlier if p.family != "full"}
    start = time.perf_counter()
    info = machine(packages=("optimum-quanto", "hqq"))
    model, tok, _ = load_benchmark_model(args.model, torch.float32, torch.device("cpu"))
    if tok is None:
        raise SystemExit("--model: this benchmark needs real text, so a model with a tokenizer (not random:).")
    fp = ModelFingerprint.from_model_config(model.config)
    calib_text, calib_source = load_text(args.calib_data, split="train")
    eval_text, eval_source = load_text(args.eval_data, split="test")
    if text_fingerprint(calib_text) == text_fingerprint(eval_text):
        logger.warning("Calibration and evaluation text are identical: the evaluation is NOT held out.")

    os.makedirs(args.output_dir, exist_ok=True)
    points: list[Point] = []
    configs = {}  # method -> RateQuantConfig (ours) or cache factory (QuantizedCache)
    check = next((p for p in earlier if p.family == "fixed"), None)  # re-measured: the merge's proof
    for sb in args.scale_bits:
        for design in args.fixed:
            for name, cfg, true in fixed_configs(model.config, design, args.min_true, max(args.budgets), args.b_min,
                                                 args.b_max, sb):
                if name not in done:
                    points.append(Point(name, "fixed", design, true_bits=true, mib=held_mib(cfg), scale_bits=sb))
                configs[name] = cfg
    if check is not None and check.method not in configs:
        configs[check.method] = next(cfg for name, cfg, _ in fixed_configs(
            model.config, check.design, 0.0, 99.0, args.b_min, args.b_max, check.scale_bits) if name == check.method)
    for backend, bit_list in QC_BACKENDS.items():
        for bits in bit_list:
            for g in args.qc_groups:
                name = f"QuantizedCache {backend} {bits}-bit g{g}"
                if name not in done:
                    points.append(Point(name, backend, None))
                    configs[name] = quantized_cache(model.config, backend, bits, g, LAYOUT.residual_length)
    logger.info("%d fixed configurations and QuantizedCaches to measure, %d from %s", len(points),
                len(done), args.merge)

    n_windows = CALIBRATION.n_samples + CALIBRATION.n_validation  # the windows calibrate() measures on come first
    calib_ids = tokenize_windows(tok, calib_text, seq_len=CALIBRATION.seq_len, n_windows=n_windows,
                                 min_windows=n_windows)[: CALIBRATION.n_samples]
    for design in args.ratequant:
        todo = [(sb, budget) for sb in args.scale_bits for budget in args.budgets
                if f"{design} RateQuant-{budget:g}{precision_suffix(sb)}" not in done]
        if not todo:
            continue
        fwd_bwd = time_fwd_bwd(model, calib_ids, CALIBRATION.batch_size)["wall_s"]
        logger.info("[%s] one forward+backward over the calibration tokens: %.1f s", design, fwd_bwd)
        for sb, budget in todo:
            cfg, seconds, note = ratequant_config(args, model, tok, design, budget, sb)
            name = f"{design} RateQuant-{budget:g}{precision_suffix(sb)}"
            points.append(Point(name, "ratequant", design, true_bits=true_bits_per_element(cfg, fp.head_dim),
                                budget=budget, mib=held_mib(cfg), calibration_s=seconds, fwd_bwd_s=fwd_bwd,
                                options=option_histogram(cfg), note=f"{note}; winner {cfg.calibration['winner']}",
                                scale_bits=sb))
            configs[name] = cfg
            logger.info("[%s %g] %s (%.0f s)", name, budget, note, seconds)

    states = long_states(model, tok, args.eval_data)
    for p in points:
        if p.family in QC_BACKENDS:
            try:
                p.mib = quantized_cache_mib(configs[p.method], states)
            except Exception as err:  # noqa: BLE001 - a backend that fails is reported, not fatal
                p.error = f"{type(err).__name__}: {err}"
    del states

    windows = evaluation_windows(tok, args.eval_data, window=args.window, max_windows=args.windows)
    refs = reference_logprobs(model, windows, batch_size=1)
    full = Point("full precision (DynamicCache)", "full", None, true_bits=16.0)
    points.insert(0, full)
    if check is not None:  # measured right after full precision: a merge that does not hold fails early
        points.insert(1, Point(check.method, "check", check.design, scale_bits=check.scale_bits))
    merge_check = {}
    partial = os.path.join(args.output_dir, f"{stem(args.tag)}.partial.json")
    for p in points:
        if p.error:
            continue
        try:
            r = evaluate(model, windows, refs, 1, configs.get(p.method), args.chunk)
        except Exception as err:  # noqa: BLE001
            p.error = f"{type(err).__name__}: {err}"
            logger.warning("%s failed: %s", p.method, p.error)
            continue
        p.perplexity, p.kl, p.seconds = r["perplexity"], max(r["kl"], 0.0), r["seconds"]
        p.window_nll, p.window_kl = r["window_nll"], r["window_kl"]
        logger.info("%-40s %s MiB  ppl %.3f  KL %.5f  (%.0f s)", p.method, _f(p.mib, ".2f"), p.perplexity, p.kl,
                    p.seconds)
        if earlier and p.family in ("full", "check"):
            before = next(q for q in earlier if q.method == p.method and q.family in ("full", "fixed"))
            merge_check[p.method] = same_figures(p, before)
        with open(partial, "w", encoding="utf-8") as f:
            json.dump([asdict(q) for q in points], f)  # what a run cut short has measured so far
    points = [p for p in points if p.family != "check"]
    full.mib = 2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * 2 * (sum(range(*MEMORY_TOKENS))
                                                                       / (MEMORY_TOKENS[1] - MEMORY_TOKENS[0])) / 2**20
    points += [p for p in earlier if p.family != "full"]

    info["load_average_end"] = load_average()
    payload = dict(settings=vars(args), machine=info, model=model.config._name_or_path, geometry=fp.describe(),
                   calib_source=calib_source, eval_source=eval_source, eval_tokens=int(windows.shape[0]
                                                                                        * (windows.shape[1] - 1)),
                   points=[asdict(p) for p in points], verdicts=verdicts(points), total_s=time.perf_counter() - start)
    if earlier:
        payload["merged"] = dict(file=os.path.basename(args.merge), machine=earlier_run.get("machine"),
                                 total_s=earlier_run.get("total_s"), points=len(done),
                                 max_window_difference=merge_check)
    print(write_report(payload, args.output_dir))
    if os.path.exists(partial):  # the finished run's JSON holds all of it
        os.remove(partial)
    logger.info("wrote %s.md/.json/.png to %s (%.1f min)", stem(args.tag), args.output_dir, payload["total_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
