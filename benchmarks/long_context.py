"""Long contexts: bytes held and decode speed of `RateQuantCache` against `DynamicCache` up to the default model's
8192-token limit, and one real `model.generate()` over an 8k-token prompt.

For every context length the default model prefills the context once with a `DynamicCache`; every cache under test
is filled with those states through its own `update(k, v, layer_idx)` and `--steps` greedy decode steps are timed
(the machinery of `decode_speed.py`, imported from it: prefill, fill, decode, interleaved repeats, runs disturbed by
other load repeated). Reported per length and cache:

- bytes held right after the fill (`cache.nbytes`; `DynamicCache`: its tensors), per token, and the *marginal*
  bytes per token between consecutive lengths: constant marginal bytes per token is linear growth;
- the median time of one decode step (median run) and its ratio to `DynamicCache`'s at the same length, and the
  mean time per token (which includes the steps that quantize a group of G tokens).

Caches: `DynamicCache` (model dtype), `RateQuantCache` kivi at uniform `--uniform-bits` (default 2), every calibrated
config in `--configs` (default: the published kivi 2.5-bit allocation for this model, in `hub_artifacts/`), and with
`--per-head-mix` the synthetic 2/3-bit per-head mix of `decode_speed.py`.

Finally `model.generate(prompt of --generate-context tokens, past_key_values=RateQuantCache(...),
max_new_tokens=min_new_tokens=--generate-tokens)` runs once (default 8064 + 128 = 8192 tokens, the model's limit)
and its time to first token, decode speed and bytes held are reported.

    python benchmarks/long_context.py                                     # 1k, 2k, 4k, 8k: minutes (8k prefills)
    python benchmarks/long_context.py --contexts 256 512 --steps 4 --repeats 1 --generate-context 512 \\
        --generate-tokens 8 --output-dir /tmp/long_context                # a quick check that it runs
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

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
    write_results,
)
from decode_speed import (
    DTYPES,
    CacheSpec,
    Result,
    cache_mib,
    cpu_busy,
    decode,
    fill,
    per_head_mix,
    prefill,
    run_context,
)
from transformers.generation.streamers import BaseStreamer

from hf_ratequant.models import cache_kwargs
from hf_ratequant.quantizers import available_quantizers

logger = logging.getLogger("benchmarks.long_context")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = [os.path.join(HERE, "..", "hub_artifacts", "SmolLM2-135M-Instruct-ratequant-kivi-2.5")]


@dataclass
class Row:
    context: int
    cache: str
    family: str
    bits: float | None
    nbytes: int | None = None  # held right after the fill
    bytes_per_token: float | None = None
    marginal_bytes_per_token: float | None = None  # from the previous context length
    vs_16bit: float | None = None  # bytes over a 16-bit DynamicCache holding the same tokens
    median_step_ms: float | None = None
    mean_ms_per_token: float | None = None
    max_step_ms: float | None = None
    step_vs_dynamic: float | None = None  # median step time over DynamicCache's (> 1: slower)
    fill_s: float | None = None
    stall: list[float | None] = field(default_factory=list)
    retried: int = 0
    error: str | None = None


# ---- caches -----------------------------------------------------------------------------------------------------


def cache_specs(model_config, args) -> list[CacheSpec]:
    from transformers import DynamicCache

    from hf_ratequant import RateQuantCache, RateQuantConfig

    def ratequant(qc: RateQuantConfig):
        return lambda: RateQuantCache(config=model_config, quant_config=qc)

    layout = layout_from_args(args)
    specs = [CacheSpec(f"DynamicCache ({args.dtype})", "dynamic", None, lambda: DynamicCache(config=model_config))]
    for bits in args.uniform_bits:
        qc = RateQuantConfig.uniform(model_config, bits=bits, layout=layout)
        specs.append(CacheSpec(f"RateQuantCache {args.quantizer} {bits}-bit", "ratequant", bits, ratequant(qc)))
    if args.per_head_mix:
        fingerprint = RateQuantConfig.uniform(model_config, bits=2, layout=layout).fingerprint
        kb, vb = per_head_mix(fingerprint.num_layers, fingerprint.num_kv_heads)
        qc = RateQuantConfig.from_bits(bits_table(kb, vb), layout, fingerprint=fingerprint, method="per-head-mix",
                                       budget=2.5)
        specs.append(CacheSpec(f"RateQuantCache {args.quantizer} per-head 2/3 (2.5)", "ratequant", 2.5, ratequant(qc)))
    for path in args.configs:
        qc = RateQuantConfig.from_pretrained(path)
        qc.check_model(model_config)
        name = f"RateQuantCache {qc.quantizer} calibrated {qc.average_bits:g}"
        specs.append(CacheSpec(name, "ratequant", qc.average_bits, ratequant(qc)))
    return specs


def held_bytes(cache) -> tuple[int, int]:
    """`(bytes held, bytes of a 16-bit DynamicCache holding the same tokens)`."""
    from hf_ratequant import RateQuantCache

    nbytes = round(cache_mib(cache) * 2**20)
    if isinstance(cache, RateQuantCache):
        return nbytes, cache.nbytes_16bit()
    elements = sum(t.numel() for layer in cache.layers for t in (layer.keys, layer.values))
    return nbytes, 2 * elements


# ---- generate() over a long prompt ---------------------------------------------------------------------------------


class _Clock(BaseStreamer):
    """Records when generate() hands over the prompt and then every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_generate(model, ids: torch.Tensor, spec: CacheSpec, new_tokens: int) -> dict:
    """`model.generate` over `ids` with a fresh cache of `spec`, forced to produce `new_tokens` tokens."""
    cache = spec.make()
    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(model, cache),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
        )
    total = time.perf_counter() - start
    generated = out.shape[1] - ids.shape[1]
    first = clock.times[1] - start if len(clock.times) > 1 else None  # times[0]: the prompt
    decode_s = clock.times[-1] - clock.times[1] if len(clock.times) > 2 else None
    nbytes, bytes16 = held_bytes(cache)
    return dict(
        cache=spec.name,
        prompt_tokens=ids.shape[1],
        generated_tokens=generated,
        cache_tokens=cache.get_seq_length(),
        total_s=total,
        time_to_first_token_s=first,
        decode_tokens_per_s=(generated - 1) / decode_s if decode_s else None,
        nbytes=nbytes,
        vs_16bit=nbytes / bytes16,
    )


# ---- reporting ----------------------------------------------------------------------------------------------------


def linearity(rows: list[Row]) -> dict[str, dict]:
    """Per cache: the marginal bytes per token between consecutive lengths and their relative spread."""
    out = {}
    for name in dict.fromkeys(r.cache for r in rows):
        marginal = [r.marginal_bytes_per_token for r in rows if r.cache == name and r.marginal_bytes_per_token]
        if marginal:
            mean = statistics.fmean(marginal)
            out[name] = dict(marginal_bytes_per_token=marginal, spread=(max(marginal) - min(marginal)) / mean)
    return out


def step_growth(rows: list[Row]) -> dict[str, dict]:
    """Per cache: how fast the median decode step grows with the context, the least-squares slope in ms per 1k
    tokens over every measured length, and that slope over `DynamicCache`'s (<= 1: grows no faster)."""
    out = {}
    for name in dict.fromkeys(r.cache for r in rows):
        pts = [(r.context, r.median_step_ms) for r in rows if r.cache == name and r.median_step_ms is not None]
        if len(pts) < 2:
            continue
        mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts) * 1000
        out[name] = dict(ms_per_1k_tokens=slope, family=next(r.family for r in rows if r.cache == name))
    base = next((g["ms_per_1k_tokens"] for g in out.values() if g["family"] == "dynamic"), None)
    for g in out.values():
        g["vs_dynamic"] = g["ms_per_1k_tokens"] / base if base else None
    return out


def _f(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(
    rows: list[Row], linear: dict, growth: dict, generated: list[dict], args, info: dict, source: str, model
) -> str:
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    configs = [os.path.relpath(os.path.normpath(p), os.path.join(HERE, "..")) for p in args.configs]
    head = [
        "# Long contexts: RateQuantCache vs DynamicCache up to the model's limit",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), device "
        f"{info['device']}{gpu}; torch {info['torch']}, transformers {info.get('transformers')}; load average at "
        f"the start {info.get('load_average_start')}.",
        "",
        f"Model ({model.config._name_or_path}, {model.config.max_position_embeddings} positions) in "
        f"{args.dtype}; context from {source}. Every cache is filled with the same prefill states, then "
        f"{args.steps} greedy decode steps are timed, {args.repeats} interleaved runs; 'median step' is the median "
        f"step of the median run, 'mean ms/token' that run's total over its steps (it includes the steps that "
        f"quantize a group of G tokens in every layer). Bytes are measured right after the fill: 'marginal' is "
        f"(bytes - bytes at the previous length) / (tokens - previous tokens), constant for linear growth; 'vs "
        f"16-bit' is over a 16-bit DynamicCache holding the same tokens. RateQuant uniform: G={args.group_size}, "
        f"R={args.residual_length}, S={args.sink_length} sink tokens; calibrated configs (their own G, R and S): "
        f"{', '.join(configs) or 'none'}.",
        "",
        "| context | cache | bits | MiB held | bytes/token | marginal bytes/token | vs 16-bit | median step ms "
        "| vs DynamicCache (step time) | mean ms/token | max step ms | fill s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            head.append(f"| {r.context} | {r.cache} | {_f(r.bits, 'g')} | failed: {r.error} |" + " |" * 8)
            continue
        head.append(
            f"| {r.context} | {r.cache} | {_f(r.bits, 'g')} | {_f(r.nbytes / 2**20, '.2f')} "
            f"| {_f(r.bytes_per_token, ',.0f')} | {_f(r.marginal_bytes_per_token, ',.1f')} | {_f(r.vs_16bit, '.3f')} "
            f"| {_f(r.median_step_ms, '.1f')} | {_f(r.step_vs_dynamic, '.2f')}x | {_f(r.mean_ms_per_token, '.1f')} "
            f"| {_f(r.max_step_ms, '.1f')} | {_f(r.fill_s, '.2f')} |"
        )
    head += ["", "## Linear growth of the bytes held", ""]
    for name, lin in linear.items():
        rates = ", ".join(f"{x:,.1f}" for x in lin["marginal_bytes_per_token"])
        verdict = "linear" if lin["spread"] <= 1e-3 else "NOT linear"
        head.append(f"- {name}: marginal bytes/token {rates} (spread {100 * lin['spread']:.2f}%): {verdict}")
    head += ["", "## Growth of the decode step with the context", ""]
    for name, g in growth.items():
        ratio = "" if g["vs_dynamic"] is None else f" ({g['vs_dynamic']:.2f}x DynamicCache's growth)"
        head.append(f"- {name}: +{g['ms_per_1k_tokens']:.2f} ms per 1k tokens of context{ratio}")
    if generated:
        head += [
            "",
            "## `model.generate()` over a long prompt",
            "",
            "| cache | prompt tokens | generated | tokens in cache | total s | time to first token s "
            "| decode tokens/s | MiB held | vs 16-bit |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g in generated:
            if "error" in g:
                head.append(f"| {g['cache']} | {g['prompt_tokens']} | failed: {g['error']} |" + " |" * 6)
                continue
            head.append(
                f"| {g['cache']} | {g['prompt_tokens']} | {g['generated_tokens']} | {g['cache_tokens']} "
                f"| {g['total_s']:.1f} | {_f(g['time_to_first_token_s'], '.1f')} "
                f"| {_f(g['decode_tokens_per_s'], '.1f')} | {g['nbytes'] / 2**20:.2f} | {g['vs_16bit']:.3f} |"
            )
    return "\n".join(head) + "\n"


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8064], help="context lengths (1024 2048 4096\n"
        "8064: with the decode steps the longest stays within the model's 8192 positions)"
    )
    p.add_argument("--model", default="smollm2", help=MODEL_HELP + " (default smollm2)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per run (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="runs per cache; the median is reported (default 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model/cache dtype (default float32)")
    p.add_argument("--quantizer", default=LAYOUT.quantizer, choices=available_quantizers(),
                   help=f"quantizer of the uniform caches (default {LAYOUT.quantizer})")
    p.add_argument("--uniform-bits", type=int, nargs="*", default=[2], help="uniform RateQuant bits (default 2)")
    p.add_argument("--per-head-mix", action="store_true", help="also the synthetic per-head 2/3-bit mix (2.5 bits)")
    p.add_argument(
        "--configs", nargs="*", default=DEFAULT_CONFIGS, help="calibrated configs (folders or Hub ids); default: the\n"
        "published kivi 2.5-bit config of the default model in hub_artifacts/"
    )
    p.add_argument("--group-size", type=int, default=LAYOUT.group_size,
                   help=f"G of the uniform caches (default {LAYOUT.group_size})")
    p.add_argument("--residual-length", type=int, default=LAYOUT.residual_length,
                   help=f"R of the uniform caches (default {LAYOUT.residual_length})")
    add_sink_length(p, "of the uniform caches\n(a calibrated config keeps its own)")
    p.add_argument("--generate-context", type=int, default=8064, help="prompt tokens of the generate() run (8064;\n"
                   "0 skips it)")
    p.add_argument("--generate-tokens", type=int, default=128, help="tokens the generate() run must produce (128)")
    p.add_argument(
        "--generate-caches", nargs="+", default=["calibrated"],
        help="RateQuant caches to run generate() with, by part of their name (default: calibrated)",
    )
    p.add_argument("--text", default="pydoc", help="text for hf_ratequant.data.load_text (default pydoc)")
    p.add_argument("--max-stall", type=float, default=0.10, help="re-run a run with more CPU stall than this (0.10)")
    p.add_argument("--retries", type=int, default=2, help="re-runs of a contended run (default 2)")
    p.add_argument("--max-wait", type=float, default=60, help="seconds, in all, to wait for a quiet CPU (60)")
    p.add_argument("--output-dir", default=RESULTS_DIR, help="where long_context.md/.json go")
    p.add_argument("--tag", default="", help="suffix of the result files (long_context_TAG.md)")
    return resolve_layout(p, p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = machine(device)
    logger.info("Machine: %s", info)
    start = time.perf_counter()
    model, tokenizer, model_name = load_benchmark_model(args.model, dtype, device)
    logger.info("Loaded %s in %.1f s.", model_name, time.perf_counter() - start)
    limit = model.config.max_position_embeddings
    contexts = sorted(args.contexts)
    for what, tokens in (("--contexts + --steps", contexts[-1] + args.steps),
                         ("--generate-context + --generate-tokens", args.generate_context + args.generate_tokens)):
        if tokens > limit:
            raise SystemExit(f"{what} = {tokens} tokens exceeds the model's {limit} positions: lower them.")
    longest = max(contexts[-1], args.generate_context)
    ids_all, source = benchmark_ids(tokenizer, model, args.text, longest, device)
    specs = cache_specs(model.config, args)

    # Warm-up at a short context: first-call allocations, lazy imports.
    states, first = prefill(model, ids_all[:, : args.residual_length + 2 * args.group_size])
    for spec in specs:
        cache = spec.make()
        with torch.inference_mode():
            fill(cache, states)
        decode(model, cache, first, 2, device)

    rows: list[Row] = []
    quiet_budget = [float(args.max_wait)]
    for context in contexts:
        busy = cpu_busy()
        if busy is not None and busy > 0.2:
            logger.warning("Other processes keep %.0f%% of the CPU busy: timings will be noisy.", 100 * busy)
        t0 = time.perf_counter()
        states, first = prefill(model, ids_all[:, :context])
        logger.info("Prefilled %d tokens in %.1f s.", context, time.perf_counter() - t0)
        held = {}
        for spec in specs:
            cache = spec.make()
            with torch.inference_mode():
                fill(cache, states)
            held[spec.name] = held_bytes(cache)
            del cache
        results: list[Result] = run_context(model, specs, states, first, context, args, device, quiet_budget)
        del states
        dyn = next((r for r in results if r.family == "dynamic" and r.available), None)
        dyn_step = statistics.median(dyn.step_ms) if dyn is not None else None
        for spec, res in zip(specs, results):
            nbytes, bytes16 = held[spec.name]
            row = Row(context=context, cache=spec.name, family=spec.family, bits=spec.bits, nbytes=nbytes)
            row.bytes_per_token = nbytes / context
            row.vs_16bit = nbytes / bytes16
            previous = next((r for r in reversed(rows) if r.cache == spec.name and r.nbytes is not None), None)
            if previous is not None:
                row.marginal_bytes_per_token = (nbytes - previous.nbytes) / (context - previous.context)
            if not res.available:
                row.error = res.error
            else:
                row.median_step_ms = statistics.median(res.step_ms)
                row.mean_ms_per_token, row.max_step_ms, row.fill_s = res.ms_per_token, res.max_step_ms, res.fill_s
                row.stall, row.retried = res.stall, res.retried
                if dyn_step:
                    row.step_vs_dynamic = row.median_step_ms / dyn_step
            rows.append(row)
            logger.info(
                "%-60s ctx %5d: %.2f MiB, %s ms/step (%sx DynamicCache)", spec.name, context, nbytes / 2**20,
                _f(row.median_step_ms, ".1f"), _f(row.step_vs_dynamic, ".2f"),
            )

    generated = []
    if args.generate_context:
        ids = ids_all[:, : args.generate_context]
        chosen = [s for s in specs if s.family == "ratequant" and any(p in s.name for p in args.generate_caches)]
        if not chosen:
            logger.warning("No RateQuant cache matches --generate-caches %s: no generate() run.", args.generate_caches)
        for spec in chosen:
            logger.info("generate(): %d prompt tokens + %d with %s ...", ids.shape[1], args.generate_tokens, spec.name)
            try:
                generated.append(run_generate(model, ids, spec, args.generate_tokens))
            except Exception as err:  # noqa: BLE001 - reported in the table, and the exit status says it failed
                logger.exception("generate() with %s failed", spec.name)
                error = f"{type(err).__name__}: {err}"
                generated.append(dict(cache=spec.name, prompt_tokens=ids.shape[1], error=error))

    linear, growth = linearity(rows), step_growth(rows)
    md = markdown(rows, linear, growth, generated, args, info, source, model)
    suffix = f"_{args.tag}" if args.tag else ""
    payload = dict(
        machine=info,
        model=model.config._name_or_path,
        max_position_embeddings=limit,
        text=source,
        args=vars(args),
        rows=[asdict(r) for r in rows],
        linearity=linear,
        step_growth=growth,
        generate=generated,
    )
    write_results(f"long_context{suffix}", payload, md, args.output_dir)
    print(md)
    logger.info("Wrote %s/long_context%s.md and .json.", args.output_dir, suffix)
    failed = any(r.error for r in rows) or any("error" in g for g in generated)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
