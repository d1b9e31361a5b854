"""Greedy decode speed of `RateQuantCache` against `DynamicCache` and transformers' `QuantizedCache` backends.

For every context length the default model prefills the context once with a `DynamicCache`; every cache under test
is then filled through its own `update(k, v, layer_idx)` with those states (one call per layer: exactly what a
prefill forward pass calls, so quantizing the prefill is included in "fill s" but the shared forward is not
repeated), and `--steps` greedy decode steps `model(input_ids=next_token, past_key_values=cache)` are timed under
`torch.inference_mode()`. The median of `--repeats` runs is reported, as tokens/s and as ratios to `DynamicCache`
and to `QuantizedCache` at the same bits.

Caches: `DynamicCache`, `RateQuantCache` (kivi, uniform 4 bits; uniform 2 bits; a per-head 2/3-bit mix averaging
2.5 bits; every saved config of `--configs`, e.g. a calibrated one from `hub_artifacts/`),
`QuantizedCache(backend="quanto"|"hqq", nbits=4|2)`. A backend that cannot be imported is reported as unavailable
and skipped.

    python benchmarks/decode_speed.py                                  # CPU, float32, 1k and 4k
    python benchmarks/decode_speed.py --device cuda --dtype bfloat16   # the same on a GPU
    python benchmarks/decode_speed.py --profile-only --contexts 4096   # profile one RateQuantCache decode step
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from _common import (
    LAYOUT,
    MODEL_HELP,
    RESULTS_DIR,
    add_sink_length,
    benchmark_ids,
    bits_table,
    layout_from_args,
    load_benchmark_model,
    machine,
    resolve_layout,
    write_markdown,
    write_results,
)

from hf_ratequant.models import cache_kwargs
from hf_ratequant.quantizers import available_quantizers

logger = logging.getLogger("benchmarks.decode_speed")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheSpec:
    name: str
    family: str  # "dynamic", "ratequant", "quanto", "hqq"
    bits: float | None
    make: Callable[[], object] = field(repr=False)


@dataclass
class Result:
    context: int
    cache: str
    family: str
    bits: float | None
    available: bool = True
    error: str | None = None
    fill_s: float | None = None
    step_ms: list[float] = field(default_factory=list)  # every step of the median run
    run_s: list[float] = field(default_factory=list)  # total decode time of every repeat
    cpu_util: list[float] = field(default_factory=list)  # CPU s / wall s of every repeat (contention indicator)
    stall: list[float | None] = field(default_factory=list)  # share of every kept repeat some task waited for a CPU
    retried: int = 0  # runs thrown away because another process took the cores
    best_tokens_per_s: float | None = None
    tokens_per_s: float | None = None
    ms_per_token: float | None = None
    max_step_ms: float | None = None
    kv_mib: float | None = None
    vs_dynamic: float | None = None  # tokens/s ratio (>1: faster than DynamicCache)
    vs_quantized: dict = field(default_factory=dict)  # backend -> tokens/s ratio at the same bits


# ---- environment ------------------------------------------------------------------------------------------------



def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all cores busy over `seconds` (from /proc/stat), while this process sleeps; None if unknown."""

    def sample():
        with open("/proc/stat", encoding="utf-8") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def cpu_stall_us() -> int | None:
    """Microseconds some runnable task has waited for a CPU since boot (Linux PSI); None where unavailable."""
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            some = f.readline().split()
        return int(some[-1].split("=")[1])
    except (OSError, ValueError, IndexError):
        return None


def wait_for_quiet(max_stall: float, budget: list[float], probe_s: float = 1.0) -> None:
    """Sleep while other work keeps the CPU busy (this process idle: any CPU stall or busy core is someone else's),
    spending at most `budget[0]` seconds over the whole benchmark."""
    while budget[0] > 0:
        t0, stall0 = time.perf_counter(), cpu_stall_us()
        busy = cpu_busy(probe_s)
        stall1 = cpu_stall_us()
        budget[0] -= time.perf_counter() - t0
        stall = 0.0 if stall0 is None or stall1 is None else (stall1 - stall0) / 1e6 / probe_s
        if stall <= max_stall and (busy is None or busy <= 0.25):
            return
        logger.info("Waiting for a quiet CPU (busy %.0f%%, stall %.0f%%).", 100 * (busy or 0), 100 * stall)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- caches -----------------------------------------------------------------------------------------------------


def per_head_mix(num_layers: int, num_heads: int) -> tuple[list[list[int]], list[list[int]]]:
    """(layer, head) units alternating 2 and 3 bits, keys and values out of phase: 2.5 bits on average."""
    keys = [[2 + (layer * num_heads + h) % 2 for h in range(num_heads)] for layer in range(num_layers)]
    values = [[3 - (layer * num_heads + h) % 2 for h in range(num_heads)] for layer in range(num_layers)]
    return keys, values


def cache_specs(model_config, args) -> list[CacheSpec]:
    from transformers import DynamicCache

    from hf_ratequant import RateQuantCache, RateQuantConfig

    r = args.residual_length

    def ratequant(qc: RateQuantConfig) -> Callable[[], object]:
        return lambda: RateQuantCache(config=model_config, quant_config=qc)

    specs = [CacheSpec(f"DynamicCache ({args.dtype})", "dynamic", None, lambda: DynamicCache(config=model_config))]
    for scale_bits in args.scale_precisions:  # several: interleaved in one run, a paired comparison
        layout = layout_from_args(args, scale_bits=scale_bits)
        suffix = "" if scale_bits == 16 else f", {scale_bits}-bit scales"
        uniform = {b: RateQuantConfig.uniform(model_config, bits=b, layout=layout) for b in args.ratequant_bits}
        some = uniform[args.ratequant_bits[0]]
        kb, vb = per_head_mix(some.num_layers, some.num_kv_heads)
        mixed = RateQuantConfig.from_bits(bits_table(kb, vb), layout, fingerprint=some.fingerprint,
                                          method="per-head-mix", budget=2.5)
        for b, qc in uniform.items():
            specs.append(CacheSpec(f"RateQuantCache {args.quantizer} {b}-bit{suffix}", "ratequant", b, ratequant(qc)))
        specs.append(CacheSpec(f"RateQuantCache {args.quantizer} per-head 2/3 (2.5){suffix}", "ratequant", 2.5,
                               ratequant(mixed)))
    for path in args.configs:
        qc = RateQuantConfig.from_pretrained(path)
        qc.check_model(model_config)  # a config made for another model is refused, naming both
        name = f"RateQuantCache {os.path.basename(os.path.normpath(str(path)))} (calibrated {qc.quantizer})"
        specs.append(CacheSpec(name, "ratequant", qc.average_bits, ratequant(qc)))
    for backend in args.backends:
        for bits in args.quantized_bits:

            def make(backend=backend, bits=bits):
                from transformers import QuantizedCache

                axis = 0 if backend == "quanto" else 1  # the axes transformers' docs use for each backend
                return QuantizedCache(
                    backend=backend,
                    config=model_config,
                    nbits=bits,
                    axis_key=axis,
                    axis_value=axis,
                    q_group_size=args.qc_group_size,
                    residual_length=r,
                )

            specs.append(CacheSpec(f"QuantizedCache {backend} {bits}-bit", backend, bits, make))
    return specs


def cache_mib(cache) -> float | None:
    """MiB held by a RateQuantCache (`nbytes`) or a plain DynamicCache; None for QuantizedCache."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from hf_ratequant import RateQuantCache

    if isinstance(cache, RateQuantCache):
        return cache.nbytes / 2**20
    if all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / 2**20
    return None


# ---- timing -----------------------------------------------------------------------------------------------------


def prefill(model, ids: torch.Tensor):
    """One forward over the context; returns the float states per layer and the first greedy token. Every layer
    keeps all the context's states (no config: plain layers), so that a sliding-window layer of a cache under test
    is filled with the whole context and keeps its window itself, counting every token as the model's would."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    states = [(layer.keys, layer.values) for layer in cache.layers]
    return states, out.logits[:, -1].argmax(-1, keepdim=True)


def fill(cache, states) -> None:
    for i, (k, v) in enumerate(states):
        cache.update(k, v, i)


def _step(model, token: torch.Tensor, cache) -> torch.Tensor:
    """One greedy decode step: the next token."""
    return model(input_ids=token, **cache_kwargs(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)


def decode(model, cache, first: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    """`steps` greedy decode steps; returns the seconds of every step."""
    times = []
    token = first
    with torch.inference_mode():
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            token = _step(model, token, cache)
            _sync(device)
            times.append(time.perf_counter() - start)
    return times


def run_once(model, spec: CacheSpec, states, first, context: int, args, device) -> dict:
    """Fill a fresh cache with the prefill states and time `args.steps` decode steps."""
    cache = spec.make()
    cpu0, stall0 = time.process_time(), cpu_stall_us()
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        fill(cache, states)
    _sync(device)
    fill_s = time.perf_counter() - start
    steps = decode(model, cache, first, args.steps, device)
    wall = time.perf_counter() - start
    if cache.get_seq_length() != context + args.steps:
        raise RuntimeError(f"{spec.name} holds {cache.get_seq_length()} tokens, expected {context + args.steps}.")
    # CPU seconds of this process per wall second: drops when other processes take the cores.
    cpu_util = (time.process_time() - cpu0) / wall
    stall1 = cpu_stall_us()
    # Share of the run during which some task waited for a CPU: ~0 when this benchmark has the cores to itself.
    stall = None if stall0 is None or stall1 is None else (stall1 - stall0) / 1e6 / wall
    return dict(total=sum(steps), fill_s=fill_s, steps=steps, mib=cache_mib(cache), cpu_util=cpu_util, stall=stall)


def run_context(
    model, specs: list[CacheSpec], states, first, context: int, args, device, quiet_budget: list[float]
) -> list[Result]:
    """All caches at one context; repeats are interleaved (every cache once, then again) so that a burst of load
    from other processes hits one run of several caches rather than every run of one."""
    results = [Result(context=context, cache=s.name, family=s.family, bits=s.bits) for s in specs]
    runs: list[list[dict]] = [[] for _ in specs]
    for rep in range(args.repeats):
        for spec, res, spec_runs in zip(specs, results, runs):
            if not res.available:
                continue
            for attempt in range(args.retries + 1):
                try:
                    run = run_once(model, spec, states, first, context, args, device)
                except Exception as err:  # noqa: BLE001 - a backend that fails is reported, not fatal
                    res.available, res.error = False, f"{type(err).__name__}: {err}"
                    logger.warning("%s at %d tokens failed: %s", spec.name, context, res.error)
                    break
                contended = run["stall"] is not None and run["stall"] > args.max_stall
                logger.info(
                    "%-40s ctx %5d rep %d: %5.1f tok/s (fill %.2f s, cpu %.2f, stall %s)%s",
                    spec.name, context, rep, args.steps / run["total"], run["fill_s"], run["cpu_util"],
                    "?" if run["stall"] is None else f"{100 * run['stall']:.0f}%",
                    " contended, retrying" if contended and attempt < args.retries else "",
                )
                if not contended or attempt == args.retries:
                    run["retries"] = attempt
                    spec_runs.append(run)
                    break
                res.retried += 1
                wait_for_quiet(args.max_stall, quiet_budget)
            if not res.available:
                continue
    for res, spec_runs in zip(results, runs):
        if not res.available or not spec_runs:
            continue
        ordered = sorted(spec_runs, key=lambda r: r["total"])
        median = ordered[len(ordered) // 2]
        res.run_s = [r["total"] for r in spec_runs]
        res.cpu_util = [r["cpu_util"] for r in spec_runs]
        res.stall = [r["stall"] for r in spec_runs]
        res.best_tokens_per_s = args.steps / ordered[0]["total"]
        res.fill_s = statistics.median(r["fill_s"] for r in spec_runs)
        res.step_ms = [1e3 * t for t in median["steps"]]
        res.tokens_per_s = args.steps / median["total"]
        res.ms_per_token = 1e3 * median["total"] / args.steps
        res.max_step_ms = max(res.step_ms)
        res.kv_mib = median["mib"]
    return results


def add_ratios(results: list[Result]) -> None:
    by_ctx: dict[int, list[Result]] = {}
    for r in results:
        by_ctx.setdefault(r.context, []).append(r)
    for rows in by_ctx.values():
        dyn = next((r for r in rows if r.family == "dynamic" and r.available), None)
        for r in rows:
            if not r.available:
                continue
            if dyn is not None:
                r.vs_dynamic = r.tokens_per_s / dyn.tokens_per_s
            if r.family == "ratequant":
                for q in rows:
                    if q.family in ("quanto", "hqq") and q.available and q.bits == _closest_int_bits(r.bits, rows):
                        r.vs_quantized[f"{q.family} {q.bits:g}-bit"] = r.tokens_per_s / q.tokens_per_s


def _closest_int_bits(bits: float, rows: list[Result]) -> float | None:
    """The QuantizedCache bits to compare with: the same bits, else (2.5) the lower neighbour (2)."""
    have = sorted({q.bits for q in rows if q.family in ("quanto", "hqq")})
    lower = [b for b in have if b <= bits]
    return lower[-1] if lower else None


# ---- profiling ----------------------------------------------------------------------------------------------------


def profile_step(model, spec: CacheSpec, states, first, context: int, args, device, top: int = 25) -> str:
    """Profile one non-flushing decode step (and time a flushing one) of `spec` at `context` tokens."""
    from torch.profiler import ProfilerActivity, profile

    cache = spec.make()
    with torch.inference_mode():
        fill(cache, states)
    # A few warm-up steps; the profiled step must not be one that quantizes a group (those are timed separately).
    token = first
    with torch.inference_mode():
        for _ in range(3):
            token = _step(model, token, cache)

    # 1. How much of a step is the cache: time every layer's update().
    update_s = []

    def timed(layer):
        inner = layer.update

        def wrapper(*a, **kw):
            _sync(device)
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            _sync(device)
            update_s.append(time.perf_counter() - t0)
            return out

        return wrapper

    originals = [layer.update for layer in cache.layers]
    for layer in cache.layers:
        layer.update = timed(layer)
    # Decode until a step quantizes a group (the window reaches R + G tokens): the steps before it are plain.
    step_s, update_share, flush_step = [], [], None
    wait_for_quiet(args.max_stall, [args.max_wait / 2])
    stall0, wall0 = cpu_stall_us(), time.perf_counter()
    with torch.inference_mode():
        while flush_step is None:
            update_s.clear()
            flushes = cache.layers[0].keys.shape[-2] + 1 - args.residual_length >= args.group_size
            _sync(device)
            t0 = time.perf_counter()
            token = _step(model, token, cache)
            _sync(device)
            dt = time.perf_counter() - t0
            if flushes:
                flush_step = (dt, sum(update_s))
            else:
                step_s.append(dt)
                update_share.append(sum(update_s))
    stall1 = cpu_stall_us()
    stall = None if stall0 is None or stall1 is None else (stall1 - stall0) / 1e6 / (time.perf_counter() - wall0)
    for layer, orig in zip(cache.layers, originals):
        layer.update = orig
    med_step, med_update = statistics.median(step_s), statistics.median(update_share)

    # 2. torch.profiler over one (non-flushing) step.
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities, record_shapes=True) as prof:
        token = _step(model, token, cache)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    op_table = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48)
    shape_table = prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=15, max_name_column_width=40, max_shapes_column_width=70
    )

    # 3. cProfile over one step: which Python functions of the cache cost what.
    pr = cProfile.Profile()
    with torch.inference_mode():
        pr.enable()
        model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
        pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(r"hf_ratequant|cache_utils", 30)
    py_table = buf.getvalue()

    n_layers = len(cache.layers)
    lines = [
        f"# One decode step of {spec.name} at {context} tokens ({device}, {args.dtype})",
        "",
        f"- median step (no flush): {1e3 * med_step:.1f} ms, of which cache.update() in {n_layers} layers: "
        f"{1e3 * med_update:.1f} ms ({100 * med_update / med_step:.0f}%), "
        f"{1e3 * med_update / n_layers:.2f} ms per layer ({len(step_s)} steps; CPU stall during them: "
        f"{'unknown' if stall is None else f'{100 * stall:.0f}%'})",
    ]
    if flush_step is not None:
        lines.append(
            f"- flushing step (a group of {args.group_size} tokens quantized in every layer): "
            f"{1e3 * flush_step[0]:.1f} ms, cache.update() {1e3 * flush_step[1]:.1f} ms"
        )
    lines += [
        "",
        "## torch.profiler, one step, by op (self time)",
        "",
        "```",
        op_table,
        "```",
        "",
        "## torch.profiler, one step, by op and input shape",
        "",
        "```",
        shape_table,
        "```",
        "",
        "## cProfile, one step (functions of hf_ratequant and cache_utils, cumulative)",
        "",
        "```",
        py_table.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


# ---- reporting ----------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def spread(runs: list[float]) -> float:
    """How far the timed runs of one cache spread: (slowest - fastest run) / median run."""
    return (max(runs) - min(runs)) / statistics.median(runs)


def markdown_table(results: list[Result]) -> str:
    head = (
        "| context | cache | bits | tokens/s | best tokens/s | ms/token | spread | CPU stall | max step ms | fill s "
        "| KV MiB | vs DynamicCache (speed) | vs QuantizedCache same bits (speed) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if not r.available:
            lines.append(f"| {r.context} | {r.cache} | {_fmt(r.bits, 'g')} | unavailable: {r.error} |" + " |" * 9)
            continue
        vs_q = ", ".join(f"{k}: {v:.2f}x" for k, v in r.vs_quantized.items())
        stalls = [x for x in r.stall if x is not None]
        stall = f"{100 * max(stalls):.0f}%" if stalls else "?"
        if r.retried:
            stall += f" ({r.retried} re-run)"
        lines.append(
            f"| {r.context} | {r.cache} | {_fmt(r.bits, 'g')} | {r.tokens_per_s:.1f} | {r.best_tokens_per_s:.1f} "
            f"| {r.ms_per_token:.1f} | {spread(r.run_s):.0%} | {stall} | {r.max_step_ms:.1f} | {_fmt(r.fill_s)} "
            f"| {_fmt(r.kv_mib, '.1f')} | {_fmt(r.vs_dynamic)}x | {vs_q} |"
        )
    return "\n".join(lines)


SLOWDOWN = 1.5  # any RateQuantCache at the longest context: at most this many times DynamicCache's time per token
CALIBRATED_SLOWDOWN = 1.2  # a calibrated config of a real model (issue [3 models])


def goals(results: list[Result], max_context: int) -> list[str]:
    out = []
    for r in results:
        if r.family != "ratequant" or not r.available:
            continue
        for k, v in r.vs_quantized.items():
            verdict = "PASS" if v >= 1 else "FAIL"
            out.append(f"- {r.context} tokens, {r.cache} vs QuantizedCache {k}: {v:.2f}x the speed: {verdict}")
        if r.context == max_context and r.vs_dynamic is not None:
            slow = 1 / r.vs_dynamic
            bar = CALIBRATED_SLOWDOWN if "(calibrated" in r.cache else SLOWDOWN
            verdict = "PASS" if slow <= bar else "FAIL"
            out.append(
                f"- {r.context} tokens, {r.cache}: {slow:.2f}x DynamicCache's time per token (<= {bar:g}x): {verdict}"
            )
    return out


def describe(args, info: dict, source: str, model_name: str) -> str:
    """The heading of the report: machine, model, method and how to read the columns."""
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    r = args.residual_length
    sentences = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), device "
        f"{info['device']}{gpu}; torch {info['torch']}, transformers {info.get('transformers')}, optimum-quanto "
        f"{info['optimum-quanto']}, hqq {info['hqq']}.\n\n"
        f"Model: {model_name}, in {args.dtype}; context from {source}; SDPA backend: {args.sdpa}.",
        f"Every cache is filled with the same prefill states, then {args.steps} greedy decode steps are timed;",
        f"median of {args.repeats} interleaved runs.",
        f"RateQuant G={args.group_size}, R={r}, S={args.sink_length} sink tokens, scales in "
        f"{' and '.join(map(str, args.scale_precisions))} bits;",
        f"QuantizedCache q_group_size={args.qc_group_size}, residual_length={r}, no sinks (quanto axis 0/0, hqq",
        "axis 1/1).",
        "'spread' is (slowest - fastest run) / median run.",
        "'CPU stall' is the largest share of a kept run during which some task waited for a CPU (Linux PSI; this",
        f"machine's cores are shared with other work): a run above {100 * args.max_stall:.0f}% is run again, up to",
        f"{args.retries} times.",
        "'fill s' is the time to put the prefill states into the cache (quantization included).",
        "'max step' is the slowest step of the median run: RateQuant quantizes one group of G tokens per layer",
        f"every G steps; QuantizedCache re-quantizes its whole history every R={r} steps, so with --steps < {r}",
        "the timed window does not include that cost.",
        "Speed ratios are tokens/s over the other cache's tokens/s (> 1: faster); the 2.5-bit mix is compared",
        "with QuantizedCache at 2 bits.",
    ]
    return "# Decode speed: RateQuantCache vs DynamicCache and QuantizedCache\n\n" + " ".join(sentences) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help=MODEL_HELP + " (default smollm2)")
    p.add_argument(
        "--sdpa", default="default", choices=["default", "flash", "efficient", "math"],
        help="pin the SDPA backend (default: PyTorch's choice; on an H100 with torch 2.11 that is cuDNN, which\n"
        "spends about 1.5 ms of CPU building a graph for every new context length, whichever cache comes first)",
    )
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="context lengths (default 1024 4096)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per run (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="runs per cache; the median is reported (default 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model/cache dtype (default float32)")
    p.add_argument("--quantizer", default=LAYOUT.quantizer, choices=available_quantizers(),
                   help=f"RateQuantCache quantizer (default {LAYOUT.quantizer})")
    p.add_argument("--ratequant-bits", type=int, nargs="+", default=[4, 2], help="uniform RateQuant bits (4 2)")
    p.add_argument("--configs", nargs="*", default=[],
                   help="saved RateQuantConfig folders (e.g. hub_artifacts/...) timed as calibrated caches too")
    p.add_argument("--quantized-bits", type=int, nargs="+", default=[4, 2], help="QuantizedCache nbits (4 2)")
    p.add_argument("--backends", nargs="*", default=["quanto", "hqq"], help="QuantizedCache backends (quanto hqq)")
    p.add_argument("--group-size", type=int, default=LAYOUT.group_size,
                   help=f"RateQuant G (default {LAYOUT.group_size})")
    p.add_argument("--residual-length", type=int, default=LAYOUT.residual_length,
                   help=f"R of every quantized cache (default {LAYOUT.residual_length})")
    add_sink_length(p, "of every RateQuantCache\n(QuantizedCache has none)")
    p.add_argument("--scale-bits", dest="scale_precisions", type=int, nargs="+", choices=[16, 8],
                   default=[LAYOUT.scale_bits], help="bits of the scales and zero-points of the uniform and mixed "
                   f"RateQuant caches (default {LAYOUT.scale_bits}; '16 8': both, timed in the same interleaved runs)")
    p.add_argument("--qc-group-size", type=int, default=32, help="QuantizedCache q_group_size (default 32)")
    p.add_argument("--text", default="pydoc", help="text for hf_ratequant.data.load_text (default pydoc)")
    p.add_argument("--profile", action="store_true", help="also profile one RateQuantCache step at the max context")
    p.add_argument("--profile-only", action="store_true", help="only the profile (no speed table)")
    p.add_argument(
        "--profile-caches",
        nargs="+",
        default=["4-bit", "per-head"],
        help="RateQuant caches to profile, by part of their name (default: 4-bit per-head)",
    )
    p.add_argument(
        "--max-stall",
        type=float,
        default=0.10,
        help="a run during which tasks waited for a CPU more than this share of the time (Linux PSI) is run again\n"
        "(default 0.10)",
    )
    p.add_argument("--retries", type=int, default=2, help="re-runs of a contended run (default 2)")
    p.add_argument(
        "--max-wait", type=float, default=60, help="seconds, in all, to wait for a quiet CPU before re-runs (60)"
    )
    p.add_argument("--output-dir", default=RESULTS_DIR, help="where the .md/.json results go")
    p.add_argument("--tag", default="", help="suffix of the result files (decode_speed_TAG.md)")
    return resolve_layout(p, p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sdpa == "default":
        return run(args)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}[args.sdpa]
    with sdpa_kernel([backend]):
        return run(args)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = machine(device, packages=("optimum-quanto", "hqq"))
    logger.info("Machine: %s", info)
    start = time.perf_counter()
    model, tokenizer, model_name = load_benchmark_model(args.model, dtype, device)
    logger.info("Loaded %s in %.1f s.", model_name, time.perf_counter() - start)
    ids_all, source = benchmark_ids(tokenizer, model, args.text, max(args.contexts), device)
    specs = cache_specs(model.config, args)

    # Warm-up at a short context: lazy imports of the backends, first-call allocations.
    warm_ids = ids_all[:, : args.residual_length + 2 * args.group_size]
    states, first = prefill(model, warm_ids)
    for spec in specs:
        try:
            cache = spec.make()
            with torch.inference_mode():
                fill(cache, states)
            decode(model, cache, first, 2, device)
        except Exception as err:  # noqa: BLE001 - reported again, with the same error, in the table
            logger.warning("%s is unavailable: %s: %s", spec.name, type(err).__name__, err)

    suffix = f"_{args.tag}" if args.tag else ""
    if args.profile or args.profile_only:
        context = max(args.contexts)
        states, first = prefill(model, ids_all[:, :context])
        chosen = [s for s in specs if s.family == "ratequant" and any(p in s.name for p in args.profile_caches)]
        reports = [profile_step(model, spec, states, first, context, args, device) for spec in chosen]
        del states
        report = "\n".join(reports)
        path = write_markdown(os.path.join(args.output_dir, f"decode_profile{suffix}.md"), report)
        print(report)
        logger.info("Wrote %s.", path)
        if args.profile_only:
            return 0

    results: list[Result] = []
    background: dict[int, float | None] = {}
    quiet_budget = [float(args.max_wait)]
    for context in args.contexts:
        busy = cpu_busy()
        if busy is not None and busy > 0.2:
            logger.warning("Other processes keep %.0f%% of the CPU busy: timings will be noisy.", 100 * busy)
        background[context] = busy
        t0 = time.perf_counter()
        states, first = prefill(model, ids_all[:, :context])
        logger.info("Prefilled %d tokens in %.1f s.", context, time.perf_counter() - t0)
        results.extend(run_context(model, specs, states, first, context, args, device, quiet_budget))
        del states
    add_ratios(results)

    header = describe(args, info, source, model_name)
    md = "\n".join(
        [header, markdown_table(results), "", "## Goals (issue)", "", *goals(results, max(args.contexts)), ""]
    )
    payload = dict(
        machine=info,
        model=model_name,
        text=source,
        args=vars(args),
        background_cpu_busy=background,
        results=[asdict(r) for r in results],
    )
    write_results(f"decode_speed{suffix}", payload, md, args.output_dir)
    print(md)
    logger.info("Wrote %s/decode_speed%s.md and .json.", args.output_dir, suffix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
