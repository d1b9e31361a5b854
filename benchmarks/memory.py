"""Memory held by `RateQuantCache` for a real model's keys and values (`--model`), against a 16-bit `DynamicCache`.

The default model (SmolLM2-135M, 30 layers x 3 kv-heads x head_dim 64) is run once in float32 over `--tokens` tokens
of text with a `DynamicCache`. Its keys and values are cast to bfloat16 (the usual serving dtype) and fed to every
cache under test with one prefill `cache.update(k, v, layer_idx)` call per layer, so all caches hold exactly the same
states. For each quantizer (kivi, token, rotated) and each allocation (uniform 8/4/3/2 bits, K3/V2, a per-head mix
averaging 2.5 bits) the table reports the bytes held, their ratio to the 16-bit reference, the arithmetic floor
(`avg_bits / 16`) and where the bytes go: packed codes, scales + zero-points, the full-precision residual window and
the full-precision sink tokens (the library's layout by default: G = 32, R = 128, S = 32, as a calibrated config).

    python benchmarks/memory.py                      # writes benchmarks/results/memory.md and memory.json
    python benchmarks/memory.py --tokens 2048 --quantizers kivi
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from _common import (
    LAYOUT,
    MODEL_HELP,
    RESULTS_DIR,
    add_sink_length,
    bits_table,
    layout_from_args,
    load_benchmark_model,
    machine,
    resolve_layout,
    write_results,
)

from hf_ratequant.models import cache_kwargs
from hf_ratequant.settings import CacheLayout, layout_with

logger = logging.getLogger("benchmarks.memory")

QUANTIZERS = ("kivi", "token", "rotated")
GOALS = {"uniform-2": 0.25, "avg-2.5": 0.30}  # max ratio vs 16-bit, from the issue
TRUE_BUDGET, TRUE_TOLERANCE = 2.5, 0.03  # issue [4 bytes]: bytes at 2.5 true bits within 3% of the arithmetic


@dataclass
class Row:
    quantizer: str
    allocation: str
    avg_bits: float
    nbytes: int
    ratio: float
    floor: float
    codes: int
    scales_zeros: int
    window: int
    unquantized_heads: int
    window_tokens: int
    quantized_tokens: int
    goal: float | None = None
    sinks: int = 0  # bytes of the first sink_length tokens, kept as they are
    sink_tokens: int = 0
    true_bits: float | None = None  # bits per quantized element, 16-bit scales and zero-points included
    arithmetic: int | None = None  # the true-budget rows only: TRUE_BUDGET/16 of quantized tokens + window + sinks

    @property
    def gap(self) -> float:
        return self.ratio - self.floor


# ---- allocations ---------------------------------------------------------------------------------------------


def allocations(num_layers: int, num_heads: int) -> list[tuple[str, list[list[int]], list[list[int]]]]:
    """`(name, key_bits, value_bits)` of every allocation measured."""

    def table(fn):
        return [[fn(layer * num_heads + head) for head in range(num_heads)] for layer in range(num_layers)]

    out = [(f"uniform-{b}", table(lambda i, b=b: b), table(lambda i, b=b: b)) for b in (8, 4, 3, 2)]
    out.append(("K3/V2 (avg 2.5)", table(lambda i: 3), table(lambda i: 2)))
    # Per-head mix: (layer, head) units alternate 2 and 3 bits along the flattened index, keys and values out of
    # phase, so every layer holds heads of both widths and the average is exactly 2.5.
    out.append(("per-head 2/3 (avg 2.5)", table(lambda i: 2 + i % 2), table(lambda i: 3 - i % 2)))
    return out


def true_budget_allocation(layout: CacheLayout, num_layers: int, num_heads: int, head_dim: int):
    """`(name, key_bits, value_bits)` of [`TRUE_BUDGET`] true bits per element for `layout`'s design: the code
    budget `code_budget` gives, as whole bits, or 2 widths alternating over (layer, head) units for a half bit."""
    from hf_ratequant.footprint import code_budget

    code = code_budget(TRUE_BUDGET, layout.quantizer, layout.group_size, head_dim, 1, 8)
    low, half = int(code), code - int(code)
    if half not in (0.0, 0.5):
        raise ValueError(f"{TRUE_BUDGET} true bits are {code:g} code bits for {layout.quantizer}: not a whole or half "
                         "bit, which this mix cannot spread evenly.")
    step = 1 if half else 0

    def table(phase):
        return [[low + step * ((layer * num_heads + head + phase) % 2) for head in range(num_heads)]
                for layer in range(num_layers)]

    return f"{TRUE_BUDGET:g} true bits ({code:g} code)", table(0), table(1)


def grouped_budget_allocation(layout: CacheLayout, num_layers: int, num_heads: int, head_dim: int):
    """`(name, key_bits, value_bits, key_groups, value_groups)` of [`TRUE_BUDGET`] true bits per element with a
    group size per unit, or None where this layout does not fit it (it needs head_dim 64 and, for kivi, G = 32).

    Each kind cycles through four (bits, group) options over the flattened (layer, head) units whose true rates
    (code bits + 32 / group) average exactly 2.5: groups of tokens (kivi keys) 2 bits at 128, 64, 32, 128 tokens
    (2.25 + 2.5 + 3 + 2.25); groups of channels 2 bits at 32, 1 bit at 64, 2 bits at 64, 2 bits at 32 channels
    (3 + 1.5 + 2.5 + 3). Keys and values out of phase."""
    from hf_ratequant.quantizers import get_quantizer

    q = get_quantizer(layout.quantizer, layout.group_size)
    if TRUE_BUDGET != 2.5 or head_dim != 64 or (layout.quantizer == "kivi" and layout.group_size != 32):
        return None
    cycles = {"tokens": [(2, 128), (2, 64), (2, 32), (2, 128)], "channels": [(2, 32), (1, 64), (2, 64), (2, 32)]}

    def table(kind, phase, what):
        cycle = cycles[q.group_axis(kind)]
        return [[cycle[(layer * num_heads + head + phase) % 4][what] for head in range(num_heads)]
                for layer in range(num_layers)]

    return (f"{TRUE_BUDGET:g} true bits, per-unit groups", table("key", 0, 0), table("value", 2, 0),
            table("key", 0, 1), table("value", 2, 1))


def arithmetic_bytes(cache, true_bits: float) -> int:
    """What a cache holding `true_bits` bits per quantized element should take: every layer's quantized tokens at
    that rate, its window and sinks as held (per layer: layers may release tokens in different blocks)."""
    total = 0.0
    for layer in cache.layers:
        b, h, _, d = layer.keys.shape
        n_quantized = layer.past_keys.num_tokens - layer.past_keys.num_sink
        total += 2 * b * h * n_quantized * d * true_bits / 8
        total += sum(_tensor_bytes(t) for t in (layer.keys, layer.values))
        total += sum(_tensor_bytes(g.sink) for g in (layer.past_keys, layer.past_values) if g.sink is not None)
    return round(total)


def goal_for(name: str) -> float | None:
    if name == "uniform-2":
        return GOALS["uniform-2"]
    if "avg 2.5" in name:
        return GOALS["avg-2.5"]
    return None


# ---- measuring ---------------------------------------------------------------------------------------------------


def capture_states(model, tokenizer, n_tokens: int, text_source: str) -> tuple[list[tuple[torch.Tensor, ...]], str]:
    """Run the model once over `n_tokens` tokens; return every layer's `(keys, values)` in float32 and the source."""
    from transformers import DynamicCache

    from hf_ratequant.data import load_text, tokenize_windows

    text, source = load_text(text_source)
    ids = tokenize_windows(tokenizer, text, seq_len=n_tokens, n_windows=1)
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    logger.info("Captured %d layers x %d tokens in %.1f s.", len(cache.layers), n_tokens, time.perf_counter() - start)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers], source


def reference_bytes(states: list[tuple[torch.Tensor, torch.Tensor]], model_config) -> int:
    """Bytes of a `DynamicCache` holding the states (already bfloat16)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model_config)
    for i, (k, v) in enumerate(states):
        cache.update(k, v, i)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def breakdown(cache) -> dict[str, int]:
    """Split `cache.nbytes` into codes, scales + zero-points, unquantized (16-bit) heads, the residual window and the
    sink tokens.

    Reads the layers' internals (`past_keys.data`, `.sink`, `keys`, `values`); the sum is checked against
    `cache.nbytes`.
    """
    from hf_ratequant.quantizers import QuantizedBlock

    out = dict(codes=0, scales_zeros=0, unquantized_heads=0, window=0, window_tokens=0, quantized_tokens=0, sinks=0,
               sink_tokens=0)
    for layer in cache.layers:
        out["window"] += _tensor_bytes(layer.keys) + _tensor_bytes(layer.values)
        out["window_tokens"] = max(out["window_tokens"], layer.keys.shape[-2])
        past = layer.past_keys
        out["quantized_tokens"] = max(out["quantized_tokens"], past.num_tokens - past.num_sink)
        out["sink_tokens"] = max(out["sink_tokens"], past.num_sink)
        for groups in (layer.past_keys, layer.past_values):
            if groups.sink is not None:
                out["sinks"] += _tensor_bytes(groups.sink)
            for data in groups.data:
                if data is None:
                    continue
                if isinstance(data, QuantizedBlock):
                    out["codes"] += _tensor_bytes(data.codes)
                    out["scales_zeros"] += _tensor_bytes(data.scale) + _tensor_bytes(data.zero)
                else:
                    out["unquantized_heads"] += _tensor_bytes(data)
    return out


def measure(states, model_config, layout: CacheLayout, ref: int) -> list[Row]:
    """Every allocation of `allocations` in a `RateQuantCache` of `layout` holding `states`."""
    from hf_ratequant import RateQuantCache, RateQuantConfig
    from hf_ratequant.footprint import true_bits_per_element

    rows = []
    quantizer = layout.quantizer
    num_layers, num_heads, head_dim = len(states), states[0][0].shape[1], states[0][0].shape[-1]
    true_row = true_budget_allocation(layout, num_layers, num_heads, head_dim)
    grouped_row = grouped_budget_allocation(layout, num_layers, num_heads, head_dim)
    measured_rows = [(*row, None, None) for row in (*allocations(num_layers, num_heads), true_row)]
    measured_rows += [grouped_row] if grouped_row else []
    for name, key_bits, value_bits, key_groups, value_groups in measured_rows:
        groups = None if key_groups is None else bits_table(key_groups, value_groups)
        qc = RateQuantConfig.from_bits(bits_table(key_bits, value_bits), layout, method=name, groups=groups)
        cache = RateQuantCache(config=model_config, quant_config=qc)
        for i, (k, v) in enumerate(states):
            cache.update(k, v, i)
        parts = breakdown(cache)
        total = cache.nbytes
        accounted = sum(parts[k] for k in ("codes", "scales_zeros", "unquantized_heads", "window", "sinks"))
        if accounted != total:
            raise RuntimeError(f"{quantizer}/{name}: breakdown sums to {accounted} bytes but cache.nbytes={total}.")
        if cache.nbytes_16bit() != ref:
            raise RuntimeError(f"cache.nbytes_16bit()={cache.nbytes_16bit()} but the 16-bit DynamicCache holds {ref}.")
        arithmetic = None
        if name == true_row[0] or key_groups is not None:  # the quantized tokens at TRUE_BUDGET/16, the rest as held
            arithmetic = arithmetic_bytes(cache, TRUE_BUDGET)
        rows.append(
            Row(
                quantizer=quantizer,
                allocation=name,
                avg_bits=qc.average_bits,
                nbytes=total,
                ratio=total / ref,
                floor=qc.average_bits / 16,
                goal=goal_for(name),
                true_bits=true_bits_per_element(qc, head_dim),
                arithmetic=arithmetic,
                **parts,
            )
        )
        logger.info("%s %-24s %.4fx", quantizer, name, total / ref)
    return rows


# ---- reporting ---------------------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def markdown_table(rows: list[Row], ref: int) -> str:
    head = (
        "| quantizer | allocation | avg bits | effective bits | MiB | ratio vs 16-bit | floor (bits/16) | gap "
        "| codes MiB | scales+zeros MiB | window MiB | sinks MiB | goal |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines.append(f"| bf16 DynamicCache | reference | 16 | 16 | {_mib(ref)} | 1.000 | 1.000 | 0 | | | | | |")
    for r in rows:
        goal = ""
        if r.goal is not None:
            goal = f"<= {r.goal:.2f}: {'PASS' if r.ratio <= r.goal else 'FAIL'}"
        lines.append(
            f"| {r.quantizer} | {r.allocation} | {r.avg_bits:g} | {16 * r.ratio:.2f} | {_mib(r.nbytes)} "
            f"| {r.ratio:.3f} | {r.floor:.3f} "
            f"| +{r.gap:.3f} | {_mib(r.codes)} | {_mib(r.scales_zeros)} | {_mib(r.window)} | {_mib(r.sinks)} "
            f"| {goal} |"
        )
    return "\n".join(lines)


def true_budget_lines(rows: list[Row]) -> list[str]:
    """Issue [4 bytes]'s bar: bytes held at TRUE_BUDGET true bits per element against the arithmetic."""
    lines = [f"## {TRUE_BUDGET:g} true bits per element (issue [4 bytes])", "",
             f"Arithmetic: {TRUE_BUDGET:g}/16 = {TRUE_BUDGET / 16:.4f}x of the quantized tokens' 16-bit bytes, plus "
             "the full-precision window and sinks as held (per layer). Measured: `cache.nbytes`. With a group size "
             "per unit, a layer's window releases tokens in whole groups of its largest key group (kivi: 128 tokens "
             "instead of G = 32), so it holds R to R + 127 tokens instead of R to R + 31: the window column shows "
             "what that costs at this length.", "",
             "| quantizer | allocation | true bits | MiB held | arithmetic MiB | deviation | within 3%? "
             "| window MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.arithmetic is None:
            continue
        dev = r.nbytes / r.arithmetic - 1
        lines.append(f"| {r.quantizer} | {r.allocation} | {r.true_bits:.4g} | {_mib(r.nbytes)} | {_mib(r.arithmetic)} "
                     f"| {dev:+.2%} | {'PASS' if abs(dev) <= TRUE_TOLERANCE else 'FAIL'} | {_mib(r.window)} |")
    return lines


def overhead_notes(rows: list[Row], ref: int, layout: CacheLayout, n_tokens: int) -> str:
    """Explain the gap to the arithmetic floor at 2.5 bits, term by term, for every quantizer."""
    group_size, residual_length = layout.group_size, layout.residual_length
    lines = [
        f"Arithmetic floor at 2.5 bits: {2.5 / 16:.4f}x. Gap = ratio - floor, split exactly into:",
        "",
        "- scales+zeros: one scale and one zero-point per group, stored in the states' dtype (2 x 16 bits per group);",
        f"- window: the last R..R+G-1 = {residual_length}..{residual_length + group_size - 1} tokens stay at 16 bits, "
        "costing (1 - bits/16) of their 16-bit size above the floor;",
        f"- sinks: the first S = {layout.sink_length} tokens stay at 16 bits too, at the same cost;",
        "- packing: codes above `bits/8` bytes per element (row padding; 0 when head_dim * bits is a multiple of 8).",
        "",
        "| quantizer | allocation | ratio | floor | gap | scales+zeros | window | sinks | packing "
        "| elements per group | scale/zero bits per element | ratio with R+G-1 window (approx.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "2.5" not in r.allocation and r.allocation != "uniform-2":
            continue
        bits = r.avg_bits
        elements_q = r.quantized_tokens and ref * r.quantized_tokens / n_tokens / 2  # 16-bit elements quantized
        codes_floor = elements_q * bits / 8
        window_excess = r.window * (1 - bits / 16)
        sink_excess = r.sinks * (1 - bits / 16)
        packing = r.codes - codes_floor
        sz_bits = 8 * r.scales_zeros / elements_q if elements_q else 0.0
        per_group = 32 / sz_bits if sz_bits else float("nan")
        # Just before a flush the window holds R+G-1 tokens: G-1 more tokens at 16 bits instead of `bits`.
        per_token_16 = ref / n_tokens
        worst = r.ratio + (group_size - 1) * per_token_16 * (1 - bits / 16) / ref
        lines.append(
            f"| {r.quantizer} | {r.allocation} | {r.ratio:.4f} | {r.floor:.4f} | +{r.gap:.4f} "
            f"| +{r.scales_zeros / ref:.4f} | +{window_excess / ref:.4f} | +{sink_excess / ref:.4f} "
            f"| +{packing / ref:.4f} | {per_group:.0f} "
            f"| {sz_bits:.2f} | {worst:.4f} |"
        )
    lines.append("")
    for r in rows:
        if r.allocation.startswith("K3/V2"):
            bits = r.avg_bits
            window_excess = r.window * (1 - bits / 16) / ref
            sink_excess = r.sinks * (1 - bits / 16) / ref
            lines.append(
                f"- {r.quantizer} at {bits:g} bits: {r.ratio:.3f}x vs the {r.floor:.3f}x floor, "
                f"{r.ratio / r.floor:.2f}x the floor; the +{r.gap:.3f} gap is scales+zeros "
                f"{r.scales_zeros / ref:.3f} ({100 * r.scales_zeros / ref / r.gap:.0f}%), the window "
                f"{window_excess:.3f} ({100 * window_excess / r.gap:.0f}%) and the sinks {sink_excess:.3f} "
                f"({100 * sink_excess / r.gap:.0f}%)."
            )
    lines += [
        "",
        f"With G={group_size} and bf16 scale/zero, a kivi group (G tokens of one key channel, or G channels of one "
        f"value token) costs 32 bits of metadata per {group_size} elements = {32 / group_size:.2f} extra bits per "
        "element; token/rotated use one group per head row (head_dim elements), i.e. 32/head_dim extra bits. "
        f"The window holds {rows[0].window_tokens} and the sinks {rows[0].sink_tokens} of {n_tokens} tokens here; "
        "both are fixed costs, so their share shrinks as the context grows (the window grows to R+G-1 tokens just "
        "before a flush).",
    ]
    return "\n".join(lines)



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--tokens", type=int, default=4096, help="context length captured (default 4096)")
    p.add_argument("--text", default="pydoc", help="text for hf_ratequant.data.load_text (default: pydoc)")
    p.add_argument("--group-size", type=int, default=LAYOUT.group_size, help=f"G (default {LAYOUT.group_size})")
    p.add_argument("--residual-length", type=int, default=LAYOUT.residual_length,
                   help=f"R (default {LAYOUT.residual_length})")
    add_sink_length(p, "")
    p.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS)
    p.add_argument("--output-dir", default=RESULTS_DIR, help="where memory.md, memory.json and memory.png go")
    return resolve_layout(p, p.parse_args(argv))


def plot(rows: list[Row], tokens: int, path: str, layout: CacheLayout) -> None:
    """Bytes held (fraction of the 16-bit cache) against average bits, per quantizer, with the arithmetic floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    bits = [2, 2.5, 3, 4, 8]
    ax.plot(bits, [b / 16 for b in bits], "k--", lw=1, label="arithmetic floor (bits / 16)")
    for quantizer, marker in (("kivi", "o"), ("token", "s"), ("rotated", "^")):
        pts = sorted({(r.avg_bits, r.ratio) for r in rows if r.quantizer == quantizer})
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=f"RateQuantCache, {quantizer}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("average bits per key/value element")
    ax.set_ylabel("bytes held / 16-bit DynamicCache")
    ax.set_title(f"SmolLM2-135M KV cache, {tokens} tokens, bf16 states (G={layout.group_size}, "
                 f"R={layout.residual_length}, S={layout.sink_length})", fontsize=9)
    ax.set_ylim(0, 0.65)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    start = time.perf_counter()
    model, tokenizer, _ = load_benchmark_model(args.model, torch.float32, torch.device("cpu"))
    if tokenizer is None:
        raise SystemExit("--model: this benchmark needs real text, so a model with a tokenizer (not random:).")
    logger.info("Loaded the model in %.1f s.", time.perf_counter() - start)
    states32, source = capture_states(model, tokenizer, args.tokens, args.text)
    states = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in states32]
    del states32
    ref = reference_bytes(states, model.config)

    layout = layout_from_args(args)
    rows: list[Row] = []
    for quantizer in args.quantizers:
        rows.extend(measure(states, model.config, layout_with(layout, quantizer=quantizer), ref))

    k0 = states[0][0]
    header = (
        f"# KV-cache memory: RateQuantCache vs 16-bit DynamicCache\n\n"
        f"Default model ({model.config._name_or_path}): {len(states)} layers x {k0.shape[1]} kv-heads x head_dim "
        f"{k0.shape[-1]}; {args.tokens} tokens of {source}; states captured in float32 and held as bfloat16. "
        f"G={layout.group_size}, R={layout.residual_length}, S={layout.sink_length} sink tokens. Bytes are "
        "`cache.nbytes` (what the cache really holds).\n"
    )
    table = markdown_table(rows, ref)
    notes = overhead_notes(rows, ref, layout, args.tokens)
    goals = []
    for r in rows:
        if r.goal is not None:
            verdict = "PASS" if r.ratio <= r.goal else "FAIL"
            goals.append(f"- {r.quantizer} {r.allocation}: {r.ratio:.3f}x (goal <= {r.goal:.2f}x): {verdict}")
    md = "\n".join(
        [header, table, "", "## Goals (issue)", "", *goals, "", *true_budget_lines(rows), "",
         "## Why not the arithmetic floor", "", notes, ""]
    )

    payload = dict(
        machine=machine(),
        model=model.config._name_or_path,
        text=source,
        tokens=args.tokens,
        group_size=args.group_size,
        residual_length=args.residual_length,
        reference_bytes=ref,
        rows=[dict(asdict(r), gap=r.gap) for r in rows],
    )
    write_results("memory", payload, md, args.output_dir)
    plot(rows, args.tokens, os.path.join(args.output_dir, "memory.png"), layout)
    print(md)
    logger.info("Wrote %s/memory.md, memory.json and memory.png.", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
