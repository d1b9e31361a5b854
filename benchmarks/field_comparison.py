"""RateQuant against the field, in one run: quality, long-context recall, memory, speed and calibration cost.

Every method stores the same default model's keys and values (SmolLM2-135M-Instruct unless `--model` says
otherwise) and is measured the same way:

- perplexity and KL to the full-precision cache on held-out text (WikiText-2 test, or offline the test half of the
  local Python docs: the half calibration never sees), through the real cache: windows of `--window` tokens fed in
  chunks of `--chunk` (hf_ratequant.evaluation.evaluate_quality against one shared full-precision reference);
- passkey retrieval at `--passkey-lengths` x `--passkey-depths` (hf_ratequant.passkey.run_passkey: the context is
  stored in the cache, then the question is fed and the answer generated through it);
- cache bytes holding `--memory-tokens` tokens of real keys and values cast to bfloat16 (the serving dtype), every
  tensor a cache holds counted (codes, scales, zero-points, the full-precision window);
- greedy decode tokens/s at `--decode-context` tokens (benchmarks/decode_speed.py's timing: median of
  `--decode-repeats` runs of `--decode-steps` steps, repeats interleaved, contended runs retried);
- calibration seconds (RateQuant only; read from the config's own record when it comes from `--configs-from`).

Methods: the full-precision `DynamicCache`; transformers' `QuantizedCache` with the quanto (2, 4 bits) and HQQ
(2, 3, 4 bits) backends at transformers' default q_group_size 64 and R = 128; the `kvq` package if it imports and
runs; hf-ratequant's own cache with uniform bits and the usual keys/values splits (K3V2 = 2.5, K4V3 = 3.5 bits) for
each quantizer; kvq's fixed beta = 4 allocation rule on RateQuant's own measurements (recorded by calibration); and
RateQuant for each quantizer at budgets 2, 2.5, 3, 3.5 and 4 (at a budget of `--b-min` bits the only allocation is
uniform, so RateQuant-b_min *is* uniform-b_min and is not calibrated). Every cache of ours, fixed or calibrated, has
the same layout (`--group-size`, `--residual-length`, `--sink-length`; by default the library's: G = 32, R = 128 and
32 sink tokens) and calibration the library's bit range (`--b-min`, `--b-max`: 1 and 6); a saved config whose layout
or range differs is calibrated again rather than reused.

    pip install -e ".[baselines]"                         # optimum-quanto and hqq for QuantizedCache
    python benchmarks/field_comparison.py                 # CPU fp32, default model (~1 h on 2 cores)
    python benchmarks/field_comparison.py --device cuda --dtype bfloat16
    python benchmarks/field_comparison.py --model Qwen/Qwen3-8B --device cuda --dtype bfloat16 \\
        --configs-from none --output-dir results/qwen3-8b      # calibrates every budget; needs the Hub

Writes `field_comparison.md`, `.json` and `field_frontier.png` to `--output-dir`.
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
from typing import Any, Callable

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
    write_results,
)

from hf_ratequant.models import cache_kwargs

logger = logging.getLogger("benchmarks.field_comparison")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = os.path.join(RESULTS_DIR, "ratequant_quality_configs_defaults")  # the library's layout and b range
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPLITS = {2.5: (3, 2), 3.5: (4, 3)}  # the fixed keys/values split at each half-integer budget


@dataclass
class Method:
    name: str
    family: str  # "full", "quanto", "hqq", "kvq", "uniform", "split", "kvq-rule", "ratequant"
    quantizer: str | None
    bits: float | None
    make: Callable[[], Any] | None = field(default=None, repr=False)  # a fresh cache (None: unavailable)
    config: Any = field(default=None, repr=False)  # the RateQuantConfig, when there is one
    calibration_s: float | None = None
    note: str = ""


@dataclass
class Row:
    method: str
    family: str
    quantizer: str | None
    avg_bits: float | None
    available: bool = True
    error: str | None = None
    perplexity: float | None = None
    kl: float | None = None
    passkey: float | None = None
    passkey_by_length: dict = field(default_factory=dict)
    cache_mib: float | None = None  # at --memory-tokens, bfloat16 states
    effective_bits: float | None = None  # bytes * 8 / stored elements, metadata and window included
    decode_tok_s: float | None = None
    decode_vs_dynamic: float | None = None
    calibration_s: float | None = None
    note: str = ""


# ---- methods ----------------------------------------------------------------------------------------------------


def _rows_hqq_layer():
    """transformers' HQQ layer handing HQQ the states as rows of head_dim, `[batch x heads x tokens, head_dim]`.

    HQQ (0.2.8) unpacks 3-bit codes assuming a 2-D tensor (`shape[0] * shape[1] // group_size` groups), so the 4-D
    states transformers passes fail at 3 bits. With `axis=1` HQQ groups consecutive elements of the flattened
    tensor, so the 2-D view forms the very same groups: 2 and 4 bits give the same codes either way (tested).
    """
    from transformers.cache_utils import HQQQuantizedLayer

    class RowsHQQLayer(HQQQuantizedLayer):
        def _quantize(self, tensor, axis):
            qtensor, meta = super()._quantize(tensor.reshape(-1, tensor.shape[-1]), axis)
            meta["states_shape"] = tensor.shape
            return qtensor, meta

        def _dequantize(self, qtensor):
            return super()._dequantize(qtensor).reshape(qtensor[1]["states_shape"])

    return RowsHQQLayer


def quantized_cache(model_config, backend: str, bits: int, group: int, residual: int) -> Callable[[], Any]:
    """A factory of transformers' `QuantizedCache` (quanto on axis 0, HQQ on axis 1, as transformers' documentation
    has them); HQQ at 3 bits through [`_rows_hqq_layer`], which its 3-bit unpacking needs."""
    def make():
        from transformers import QuantizedCache

        axis = 0 if backend == "quanto" else 1
        cache = QuantizedCache(backend=backend, config=model_config, nbits=bits, axis_key=axis, axis_value=axis,
                               q_group_size=group, residual_length=residual)
        if backend == "hqq" and bits == 3:
            layer = _rows_hqq_layer()
            cache.layers = [layer(nbits=bits, axis_key=axis, axis_value=axis, q_group_size=group,
                                  residual_length=residual) for _ in cache.layers]
        return cache

    return make


def kvq_method(model, bits: int, residual: int) -> Method:
    """The `kvq` package's own cache (KVQ), when it imports and generates with this transformers."""
    try:
        from kvq import KVQ, KVQConfig

        def make():
            return KVQ(KVQConfig(nbits={"k": bits, "v": bits}, residual_length=residual, group_size=64,
                                 compute_dtype=model.dtype, device=model.device))

        ids = torch.tensor([[1, 2, 3, 4]], device=model.device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, make()),
                       max_new_tokens=2, do_sample=False)
        return Method(f"kvq package {bits}-bit", "kvq", None, float(bits), make)
    except Exception as err:  # noqa: BLE001 - an unusable third-party package is reported, not fatal
        return Method(f"kvq package {bits}-bit", "kvq", None, float(bits), None,
                      note=f"unavailable: {type(err).__name__}: {err}")


def load_or_calibrate(args, model, tok, quantizer: str, budget: float):
    """The saved RateQuantConfig for (quantizer, budget) from `--configs-from`, else a fresh calibration."""
    from hf_ratequant import RateQuantConfig, calibrate

    layout = layout_from_args(args, quantizer=quantizer)
    folder = os.path.join(args.configs_from, f"{quantizer}-{budget:g}") if args.configs_from else None
    if folder and os.path.isdir(folder):
        cfg = RateQuantConfig.from_pretrained(folder)
        wanted = dict(asdict(layout), b_min=args.b_min, b_max=args.b_max)  # quantizer, G, R, S and the bit range
        differs = [f"{name} {getattr(cfg, name)} instead of {want}" for name, want in wanted.items()
                   if getattr(cfg, name) != want]
        try:
            cfg.check_model(model.config)
            if differs:  # the fixed caches of this run have the layout asked for: so must the calibrated ones
                raise ValueError(", ".join(differs))
        except ValueError as err:
            logger.warning("Not reusing %s (%s): calibrating instead.", folder, err)
        else:
            return cfg, cfg.calibration.get("seconds", {}).get("total"), f"config from {os.path.relpath(folder, HERE)}"
    t0 = time.perf_counter()
    cfg = calibrate(model, tok, args.calib_data, quantizer=quantizer, budget=budget, n_samples=args.samples,
                    n_validation=args.validation, seq_len=args.seq_len, group_size=layout.group_size,
                    residual_length=layout.residual_length, sink_length=layout.sink_length, b_min=args.b_min,
                    b_max=args.b_max)
    seconds = time.perf_counter() - t0
    if args.save_configs:
        cfg.save_pretrained(os.path.join(args.save_configs, f"{quantizer}-{budget:g}"))
    return cfg, seconds, "calibrated in this run"


def build_methods(args, model, tok) -> list[Method]:
    from hf_ratequant import RateQuantCache, RateQuantConfig

    mc, r = model.config, args.residual_length

    def ours(cfg):
        return lambda: RateQuantCache(config=mc, quant_config=cfg)

    def fixed(quantizer, kb, vb):
        layout = layout_from_args(args, quantizer=quantizer)
        return RateQuantConfig.uniform(mc, key_bits=kb, value_bits=vb, layout=layout)

    from transformers import DynamicCache

    methods = [Method("full precision (DynamicCache)", "full", None, None, lambda: DynamicCache(config=mc))]
    for backend, bit_list in (("quanto", args.quanto_bits), ("hqq", args.hqq_bits)):
        for bits in bit_list:
            methods.append(Method(f"QuantizedCache {backend} {bits}-bit", backend, None, float(bits),
                                  quantized_cache(mc, backend, bits, args.qc_group_size, r)))
    for bits in args.kvq_bits:
        methods.append(kvq_method(model, bits, r))
    for q in args.quantizers:
        for b in args.budgets:
            if b == int(b):
                cfg = fixed(q, int(b), int(b))
                methods.append(Method(f"{q} uniform-{b:g}", "uniform", q, b, ours(cfg), cfg))
            elif b in SPLITS:
                kb, vb = SPLITS[b]
                cfg = fixed(q, kb, vb)
                methods.append(Method(f"{q} K{kb}V{vb}", "split", q, b, ours(cfg), cfg))
        for b in args.budgets:
            if b <= args.b_min:
                continue  # the only allocation of b_min bits is uniform-b_min, measured above
            cfg, seconds, source = load_or_calibrate(args, model, tok, q, b)
            note = f"{source}; validation winner {cfg.calibration.get('winner')}"
            methods.append(Method(f"{q} RateQuant-{b:g}", "ratequant", q, b, ours(cfg), cfg, seconds, note))
            rule = (cfg.calibration.get("candidates") or {}).get("kvq-beta4")
            if args.kvq_rule and rule is not None:
                kcfg = RateQuantConfig.from_bits(torch.tensor(rule), cfg.layout, fingerprint=cfg.fingerprint,
                                                 method="kvq-beta4", budget=b)
                methods.append(Method(f"{q} kvq rule beta=4 (b={b:g})", "kvq-rule", q, b, ours(kcfg), kcfg,
                                      note="kvq's fixed beta=4 allocation on RateQuant's measurements"))
    return methods


# ---- measurements -----------------------------------------------------------------------------------------------


def _tensors(obj, seen: set) -> int:
    """Bytes of every distinct tensor reachable from `obj` (tensor subclasses such as quanto's are flattened)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and \
                not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(_tensors(getattr(obj, n), seen) for n in names)
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel()) if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensors(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensors(v, seen) for v in obj)
    return 0


def cache_bytes(cache) -> int:
    """Bytes a filled cache holds: `nbytes` for RateQuantCache, every tensor attribute of its layers otherwise."""
    from hf_ratequant import RateQuantCache

    if isinstance(cache, RateQuantCache):
        return int(cache.nbytes)
    seen: set = set()
    return sum(_tensors(vars(layer), seen) for layer in cache.layers)


def memory(methods: list[Method], rows: list[Row], states_bf16) -> None:
    n_elements = sum(k.numel() + v.numel() for k, v in states_bf16)
    for m, row in zip(methods, rows):
        if not row.available:
            continue
        cache = m.make()
        with torch.inference_mode():
            for i, (k, v) in enumerate(states_bf16):
                cache.update(k, v, i)
        nbytes = cache_bytes(cache)
        row.cache_mib = nbytes / 2**20
        row.effective_bits = 8 * nbytes / n_elements


def decode_speed(args, model, methods: list[Method], rows: list[Row], ids) -> None:
    import decode_speed as ds

    device = model.get_input_embeddings().weight.device
    states, first = ds.prefill(model, ids)
    specs = [ds.CacheSpec(m.name, m.family, m.bits, m.make) for m, r in zip(methods, rows) if r.available]
    ns = argparse.Namespace(steps=args.decode_steps, repeats=args.decode_repeats, retries=2, max_stall=0.3)
    results = ds.run_context(model, specs, states, first, ids.shape[1], ns, device, [args.max_wait])
    by_name = {res.cache: res for res in results}
    dyn = by_name[methods[0].name].tokens_per_s
    for m, row in zip(methods, rows):
        res = by_name.get(m.name)
        if res is None:
            continue
        if not res.available:
            row.available, row.error = False, res.error
            continue
        row.decode_tok_s = res.tokens_per_s
        row.decode_vs_dynamic = res.tokens_per_s / dyn if dyn else None


# ---- report -----------------------------------------------------------------------------------------------------


def _f(x, fmt: str, na: str = "-") -> str:
    return na if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def frontier_verdicts(rows: list[Row]) -> list[str]:
    """For every RateQuant point, the two frontier checks against every method that is not RateQuant: the best
    perplexity at the same or fewer average bits, and the best perplexity with the same or a smaller cache."""
    ok = [r for r in rows if r.available and r.perplexity is not None and r.avg_bits is not None]
    others = [o for o in ok if o.family != "ratequant"]
    lines = []
    for r in (r for r in ok if r.family == "ratequant"):
        checks = []
        for what, fits in (
            (f"at <= {r.avg_bits:g} bits", lambda o: o.avg_bits <= r.avg_bits + 1e-9),
            (f"with a cache <= {r.cache_mib:.2f} MiB", lambda o: o.cache_mib is not None and r.cache_mib is not None
             and o.cache_mib <= r.cache_mib + 1e-6),
        ):
            best = min((o for o in others if fits(o)), key=lambda o: o.perplexity, default=None)
            if best is None:
                checks.append(f"{what}: no other method")
            else:
                verdict = "**below**" if r.perplexity < best.perplexity else "NOT below"
                checks.append(f"{what}: {verdict} the best other, {best.method} ({best.perplexity:.3f})")
        lines.append(f"- {r.method} (ppl {r.perplexity:.3f}, KL {r.kl:.4f}): " + "; ".join(checks))
    return lines


def markdown(payload: dict) -> str:
    s, m = payload["settings"], payload["machine"]
    rows = [Row(**r) for r in payload["rows"]]
    out = [
        "# RateQuant against the field",
        "",
        f"Model {payload['model']} ({payload['geometry']}), {s['dtype']} on {m['device']}; machine: {m['cpu']}, "
        f"{m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}.",
        f"Quality: {payload['eval_tokens']} held-out tokens ({payload['eval_source']}), windows of {s['window']}, "
        f"chunks of {s['chunk']}; full-precision perplexity {payload['full_ppl']:.3f}. Passkey: lengths "
        f"{s['passkey_lengths']} x depths {s['passkey_depths']} ({payload['passkey_trials']} trials per cache). "
        f"Memory: {s['memory_tokens']} tokens, bfloat16 states. Decode: {s['decode_context']}-token context, median "
        f"of {s['decode_repeats']} x {s['decode_steps']} steps. Our cache: G={s['group_size']}, "
        f"R={s['residual_length']}, S={s.get('sink_length', 0)} sink tokens, calibrated with b in "
        f"[{s.get('b_min', 2)}, {s.get('b_max', 6)}]; QuantizedCache: q_group_size={s['qc_group_size']}, "
        f"R={s['residual_length']}.",
        "",
        "| method | avg bits | perplexity | KL | passkey | MiB @ "
        f"{s['memory_tokens'] // 1024}k (eff. bits) | decode tok/s @ {s['decode_context'] // 1024}k (x DynamicCache) "
        "| calibration s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.available:
            why = (r.error or r.note).removeprefix("unavailable: ")
            out.append(f"| {r.method} | {_f(r.avg_bits, 'g')} | unavailable: {why} | | | | | |")
            continue
        out.append(
            f"| {r.method} | {_f(r.avg_bits, 'g', '16')} | {_f(r.perplexity, '.3f')} | {_f(r.kl, '.4f')} | "
            f"{_f(r.passkey, '.0%')} | {_f(r.cache_mib, '.2f')} ({_f(r.effective_bits, '.2f')}) | "
            f"{_f(r.decode_tok_s, '.1f')} ({_f(r.decode_vs_dynamic, '.2f')}x) | {_f(r.calibration_s, '.0f')} |"
        )
    out += ["", "## The goal, checked", ""] + frontier_verdicts(rows)
    notes = [f"- {r.method}: {r.note}" for r in rows if r.note and r.available]
    if notes:
        out += ["", "## Notes", ""] + notes
    out += ["", f"Total run time {payload['total_s'] / 60:.1f} min. Load average at the end "
            f"{m.get('load_average_end')}.", ""]
    return "\n".join(out)


FAMILY_STYLE = {
    "quanto": ("QuantizedCache quanto", "tab:gray", "s", "--"),
    "hqq": ("QuantizedCache HQQ", "tab:brown", "D", "--"),
    "kvq": ("kvq package", "tab:pink", "x", ":"),
}
QUANTIZER_COLOR = {"kivi": "tab:blue", "token": "tab:orange", "rotated": "tab:green"}


def plot_frontier(rows: list[Row], full_ppl: float, path: str, memory_tokens: int, b_min: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.available and r.kl is not None and r.family != "full":
            key = (r.family, r.quantizer) if r.family in ("ratequant", "kvq-rule") else (
                ("fixed", r.quantizer) if r.family in ("uniform", "split") else (r.family, None))
            groups.setdefault(key, []).append(r)
            if r.family == "uniform" and r.avg_bits == b_min:  # RateQuant at b_min bits is uniform-b_min
                groups.setdefault(("ratequant", r.quantizer), []).append(r)
    for (family, q), pts in sorted(groups.items(), key=lambda kv: str(kv[0])):
        pts = sorted(pts, key=lambda r: r.avg_bits)
        if family == "ratequant":
            label, color, marker, ls = f"RateQuant {q}", QUANTIZER_COLOR.get(q, "k"), "o", "-"
        elif family == "fixed":
            label, color, marker, ls = f"{q} uniform / K-V split", QUANTIZER_COLOR.get(q, "k"), "^", ":"
        elif family == "kvq-rule":
            label, color, marker, ls = f"kvq beta=4 rule, {q}", QUANTIZER_COLOR.get(q, "k"), "v", "-."
        else:
            label, color, marker, ls = FAMILY_STYLE.get(family, (family, "k", ".", "-"))
        lw = 2.2 if family == "ratequant" else 1.2
        axes[0].plot([r.avg_bits for r in pts], [r.kl for r in pts], marker=marker, ls=ls, color=color, lw=lw,
                     label=label, alpha=0.9 if family == "ratequant" else 0.6)
        with_mem = [r for r in pts if r.cache_mib is not None]
        axes[1].plot([r.cache_mib for r in with_mem], [r.kl for r in with_mem], marker=marker, ls=ls, color=color,
                     lw=lw, alpha=0.9 if family == "ratequant" else 0.6)
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel("KL to the full-precision cache (nats/token, log)")
    axes[0].set_xlabel("average bits per key/value element")
    axes[1].set_xlabel(f"cache MiB holding {memory_tokens} tokens (bfloat16 states; scales and window included)")
    axes[0].set_title("quality against bits (lower-left is better)")
    axes[1].set_title("quality against memory")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"KV-cache quantizers on the same model, held-out text (full-precision perplexity {full_ppl:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quantizers", nargs="+", default=["kivi", "token", "rotated"])
    p.add_argument("--budgets", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5, 4.0])
    p.add_argument("--configs-from", default=DEFAULT_CONFIGS,
                   help="folder of saved <quantizer>-<budget> configs to reuse ('none': calibrate every budget)")
    p.add_argument("--save-configs", metavar="DIR", help="save configs calibrated here as DIR/<quantizer>-<budget>")
    p.add_argument("--calib-data", default=None, help="calibration text (default: WikiText-2 train)")
    p.add_argument("--eval-data", default=None, help="held-out text (default: WikiText-2 test)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--validation", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=CALIBRATION.seq_len)
    p.add_argument("--b-min", type=int, default=CALIBRATION.b_min, help="fewest bits of a calibrated unit")
    p.add_argument("--b-max", type=int, default=CALIBRATION.b_max, help="most bits of a calibrated unit")
    p.add_argument("--group-size", type=int, default=LAYOUT.group_size, help="G of our caches")
    p.add_argument("--residual-length", type=int, default=LAYOUT.residual_length,
                   help="R of our caches and of QuantizedCache")
    add_sink_length(p, "of our caches (QuantizedCache has none)")
    p.add_argument("--qc-group-size", type=int, default=64, help="QuantizedCache q_group_size (transformers' default)")
    p.add_argument("--quanto-bits", type=int, nargs="*", default=[2, 4])
    p.add_argument("--hqq-bits", type=int, nargs="*", default=[2, 3, 4])
    p.add_argument("--kvq-bits", type=int, nargs="*", default=[2, 4], help="the kvq package's own cache")
    p.add_argument("--no-kvq-rule", dest="kvq_rule", action="store_false", help="skip kvq's beta=4 rule rows")
    p.add_argument("--window", type=int, default=EVALUATION.window)
    p.add_argument("--windows", type=int, default=EVALUATION.n_windows)
    p.add_argument("--chunk", type=int, default=EVALUATION.chunk)
    p.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 6144])
    p.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--memory-tokens", type=int, default=4096)
    p.add_argument("--decode-context", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds the decode timing may wait for quiet")
    p.add_argument("--output-dir", default=RESULTS_DIR)
    p.add_argument("--from-json", metavar="PATH", help="only redraw the table and plot of a finished run's JSON")
    args = resolve_layout(p, p.parse_args(argv))
    if args.configs_from in ("", "none"):
        args.configs_from = None
    return args


def write_report(payload: dict, output_dir: str) -> str:
    """field_comparison.md, .json and field_frontier.png in `output_dir`; returns the markdown."""
    os.makedirs(output_dir, exist_ok=True)
    rows = [Row(**r) for r in payload["rows"]]
    settings = payload["settings"]
    plot_frontier(rows, payload["full_ppl"], os.path.join(output_dir, "field_frontier.png"),
                  settings["memory_tokens"], settings.get("b_min", 2))  # runs before --b-min: b_min = 2
    md = markdown(payload)
    write_results("field_comparison", payload, md, output_dir)
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.from_json:  # redraw the table and the plot of a finished run
        with open(args.from_json, encoding="utf-8") as f:
            print(write_report(json.load(f), args.output_dir))
        return 0
    sys.path.insert(0, HERE)
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.data import load_text, tokenize_windows
    from hf_ratequant.evaluation import evaluate_quality, evaluation_windows, reference_logprobs
    from hf_ratequant.passkey import passkey_trials, run_passkey

    start = time.perf_counter()
    device = torch.device(args.device)
    info = machine(device, packages=("optimum-quanto", "hqq", "kvq", "accelerate"))
    model, tok, _ = load_benchmark_model(args.model, DTYPES[args.dtype], device)
    if tok is None:
        raise SystemExit("--model: this benchmark needs real text, so a model with a tokenizer (not random:).")
    fp = ModelFingerprint.from_model_config(model.config)

    methods = build_methods(args, model, tok)
    rows = [Row(m.name, m.family, m.quantizer, m.bits, available=m.make is not None, calibration_s=m.calibration_s,
                note=m.note, error=None if m.make else m.note) for m in methods]
    logger.info("%d methods: %s", len(methods), ", ".join(m.name for m in methods))

    # Quality: every cache against one shared full-precision reference, window by window.
    windows = evaluation_windows(tok, args.eval_data, window=args.window, max_windows=args.windows)
    _, eval_source = load_text(args.eval_data, split="test")
    refs = reference_logprobs(model, windows, batch_size=1)
    for m, row in zip(methods, rows):
        if not row.available:
            continue
        t0 = time.perf_counter()
        try:
            measured = m.config if m.config is not None else m.make
            res = [evaluate_quality(model, windows[i : i + 1], measured, chunk=args.chunk, batch_size=1,
                                    progress=False, reference=[refs[i]]) for i in range(len(refs))]
        except Exception as err:  # noqa: BLE001 - a backend that fails is reported, not fatal
            row.available, row.error = False, f"{type(err).__name__}: {err}"
            logger.warning("%s failed: %s", m.name, row.error)
            continue
        tokens = sum(r.tokens for r in res)
        row.perplexity = math.exp(sum(math.log(r.perplexity) * r.tokens for r in res) / tokens)
        row.kl = max(sum((r.kl or 0.0) * r.tokens for r in res) / tokens, 0.0)  # full precision: -1e-9 rounding
        logger.info("%-40s ppl %.3f KL %.4f (%.0f s)", m.name, row.perplexity, row.kl, time.perf_counter() - t0)
    full_ppl = rows[0].perplexity

    # Passkey retrieval, every cache on the same trials (one shared prefill per trial).
    trials = passkey_trials(tok, args.passkey_lengths, args.passkey_depths,
                            max_positions=getattr(model.config, "max_position_embeddings", None)) \
        if args.passkey_lengths else []
    if trials:
        live = {m.name: m.make for m, r in zip(methods, rows) if r.available}
        for name, res in run_passkey(model, tok, trials, live).items():
            row = next(r for r in rows if r.method == name)
            row.passkey, row.passkey_by_length = res.accuracy, res.by_length

    # Memory and speed at the long context: real states of held-out text.
    text, _ = load_text(args.eval_data, split="test")
    need = max(args.memory_tokens, args.decode_context)
    long_ids = tokenize_windows(tok, text, seq_len=need, n_windows=1).to(model.device)
    from transformers import DynamicCache

    ref = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=long_ids[:, : args.memory_tokens], **cache_kwargs(model, ref), use_cache=True,
              logits_to_keep=1)
    states = [(layer.keys.to(torch.bfloat16), layer.values.to(torch.bfloat16)) for layer in ref.layers]
    del ref
    memory(methods, rows, states)
    del states
    decode_speed(args, model, methods, rows, long_ids[:, : args.decode_context])

    info["load_average_end"] = load_average()
    payload = dict(
        settings=vars(args), machine=info, model=model.config._name_or_path, geometry=fp.describe(),
        eval_source=eval_source, eval_tokens=int(windows.shape[0] * (windows.shape[1] - 1)), full_ppl=full_ppl,
        passkey_trials=len(trials), rows=[asdict(r) for r in rows], total_s=time.perf_counter() - start,
    )
    print(write_report(payload, args.output_dir))
    logger.info("wrote field_comparison.md/.json and field_frontier.png to %s (%.1f min)", args.output_dir,
                payload["total_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
