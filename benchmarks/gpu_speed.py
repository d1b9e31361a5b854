"""GPU speed of `RateQuantCache` (fused decode attention, and dequantize-then-sdpa) against `DynamicCache`.

The figures of the GPU issue, for the Qwen3-8B architecture with random weights, in bfloat16, on one GPU:

1. decode tokens/s at batch 1, contexts 4096 and 32768: `DynamicCache`; RateQuant uniform 2 bits, uniform 4 bits
   and a per-head 2/3-bit mix (2.5 bits on average), each on the fused path (the default on CUDA) and on the
   dequantize path (`attention="dequantize"`); ratio to `DynamicCache` (goal >= 0.95x) and mix vs uniform.
2. decode tokens/s at batch 16, context 32768: `DynamicCache` vs the 2.5-bit mix (goal >= 1.5x).
3. the largest batch whose cache fits at 32k and decodes one step: `DynamicCache` vs the mix (goal >= 4x).
4. time to first token of a 32k prompt, batch 1 (`model(ids, past_key_values=cache)`; goal <= 1.1x).
5. peak GPU memory (`torch.cuda.max_memory_allocated`) of `generate()` of a 32k prompt + 32 new tokens.
6. the fused kernel alone, one layer at 32k, batch 1 and 16: bytes read (packed codes, scales, zero-points, sinks,
   window) per second of kernel time, against the bandwidth of a large `Tensor.copy_` measured in the same run.

Method, as in `decode_speed.py`: one prefill with a `DynamicCache` gives the states of every layer; every cache under
test is filled through `cache.update(k, v, layer_idx)` with them (a batch > 1 repeats that filled batch-1 cache,
layer by layer, with the caches' own `batch_repeat_interleave`: the same bytes a batched prefill would leave, without
quantizing B identical copies), then greedy decode steps are timed (a CUDA sync around every step; `--warmup`
untimed steps first; median of `--repeats` runs, interleaved across caches). The timed window is `--steps` = 32
steps = one group G, so RateQuant quantizes exactly one group per layer in it. Every row is printed as soon as it is
measured, the result files are rewritten after every row, and the summary table is printed last. A cache that cannot
be built or run (an API not there yet, an OOM) gives an "unavailable" row with the error, never a crash.

    python benchmarks/gpu_speed.py --tag h200                              # everything (about 3-4 min on an H200)
    python benchmarks/gpu_speed.py --quick                                 # 32k only, 2 repeats
    python benchmarks/gpu_speed.py --sections 1 6                          # some figures only
    python benchmarks/gpu_speed.py --smoke --device cpu --dtype float32    # CPU rehearsal with a tiny Qwen3
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
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
    bits_table,
    layout_from_args,
    load_benchmark_model,
    machine,
    write_results,
)

from hf_ratequant.models import cache_kwargs

logger = logging.getLogger("benchmarks.gpu_speed")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTION_ORDER = (4, 1, 2, 6, 5, 3)  # 4 first: its DynamicCache prefill gives the states every other figure uses
SECTION_MIN_S = {4: 15, 1: 15, 2: 15, 6: 8, 5: 10, 3: 20}  # below this much time left, a section is skipped
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class Interrupted(BaseException):
    """SIGTERM (the `timeout` of gpu_check.sh): stop measuring, still write the files and print the table."""


class SimulatedOOM(RuntimeError):
    """`--smoke` on the CPU: a cache larger than `--smoke-capacity-mib` 'does not fit' (rehearses section 3)."""


@dataclass
class Spec:
    """One cache under test."""

    label: str
    kind: str  # "dynamic" or "ratequant"
    bits: float | None = None
    path: str = "sdpa"  # what is asked: "sdpa" (DynamicCache), "fused" or "dequantize"
    make: Callable[[], object] = field(default=None, repr=False)


@dataclass
class Row:
    section: int
    setting: str
    cache: str
    path: str = ""  # what actually ran
    value: float | None = None
    unit: str = ""
    result: str = ""  # the value as shown
    vs_dynamic: float | None = None
    vs_text: str = ""
    goal: str = ""
    verdict: str = ""
    notes: str = ""
    error: str | None = None
    details: dict = field(default_factory=dict)


def short_error(err: BaseException, limit: int = 160) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0] if str(err) else type(err).__name__
    return (text[: limit - 3] + "...") if len(text) > limit else text


def per_head_mix(num_layers: int, num_heads: int) -> tuple[list[list[int]], list[list[int]]]:
    """(layer, head) units alternating 2 and 3 bits, keys and values out of phase: 2.5 bits on average (the same mix
    as decode_speed.py's "per-head 2/3 (2.5)")."""
    keys = [[2 + (layer * num_heads + h) % 2 for h in range(num_heads)] for layer in range(num_layers)]
    values = [[3 - (layer * num_heads + h) % 2 for h in range(num_heads)] for layer in range(num_layers)]
    return keys, values


def gbs(bytes_per_s: float) -> str:
    x = bytes_per_s / 1e9
    return f"{x:.0f} GB/s" if x >= 100 else f"{x:.3g} GB/s"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PathProbe:
    """What ran while active: the `hf_ratequant::decode_attention` / `::dequantize_layer` op calls (seen by
    torch.profiler, CPU activity only), and the `"ratequant"` attention calls that ran the fused op or were handed a
    tagged past but dequantized it (a mask or query the op does not serve). Only around untimed warm-up steps."""

    OPS = ("decode_attention", "dequantize_layer")

    def __init__(self, profile: bool = True):
        self.fused = self.declined = 0
        self.ops = dict.fromkeys(self.OPS, 0)
        self._saved = None
        self._prof = None
        self._profile = profile

    def __enter__(self):
        try:
            if not self._profile:
                raise RuntimeError("not asked")
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU])
            self._prof.__enter__()
        except Exception as err:  # noqa: BLE001 - the attention counts still tell
            logger.debug("no profiler for the path probe: %s", err)
            self._prof = None
        try:
            from hf_ratequant import attention as fa
        except ImportError:
            return self
        past_cls = getattr(fa, "FusedPast", None)
        if past_cls is None or not hasattr(past_cls, "attend") or not hasattr(past_cls, "dequantize"):
            return self
        attend, dequantize = past_cls.attend, past_cls.dequantize
        probe = self

        def counted_attend(past, *args, **kwargs):
            probe.fused += 1
            return attend(past, *args, **kwargs)

        def counted_dequantize(past, *args, **kwargs):
            probe.declined += 1
            return dequantize(past, *args, **kwargs)

        self._saved = (past_cls, attend, dequantize)
        past_cls.attend, past_cls.dequantize = counted_attend, counted_dequantize
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            past_cls, attend, dequantize = self._saved
            past_cls.attend, past_cls.dequantize = attend, dequantize
        if self._prof is not None:
            try:
                self._prof.__exit__(None, None, None)
                for evt in self._prof.events():
                    for op in self.OPS:
                        if evt.name == f"hf_ratequant::{op}":
                            self.ops[op] += 1
            except Exception as err:  # noqa: BLE001
                logger.debug("path probe profiler: %s", err)
                self._prof = None
        return False

    @property
    def ran_fused(self) -> bool:
        return self.fused > 0 or self.ops["decode_attention"] > 0


def _ops():
    try:
        from hf_ratequant import ops
    except ImportError:
        return None
    return ops


def broken_kernels() -> dict:
    ops = _ops()
    return dict(getattr(ops, "_broken", {}) or {}) if ops is not None else {}


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_s
        self.rows: list[Row] = []
        self.section_s: dict[int, float] = {}
        self.notes: list[str] = []
        self.states = None  # [(keys, values)] per layer, (1, kv_heads, long, head_dim), on the device
        self.states_cpu = None
        self.first = None  # (1, 1) the first greedy token after the prompt
        self.info = machine(self.device, packages=("triton", "accelerate", "huggingface_hub"))
        self.interrupted = None
        suffix = f"_{args.tag}" if args.tag else ""
        os.makedirs(args.output_dir, exist_ok=True)
        self.stem = f"gpu_speed{suffix}"
        self.md_path = os.path.join(args.output_dir, f"{self.stem}.md")
        self.json_path = os.path.join(args.output_dir, f"{self.stem}.json")
        self.layout = None  # the RateQuant caches' CacheLayout (the library's sinks for G), once built

    # ---- time -------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- model and caches ---------------------------------------------------------------------------------------
    def load(self) -> None:
        args = self.args
        t0 = time.perf_counter()
        if args.smoke:
            from transformers import AutoModelForCausalLM, Qwen3Config

            config = Qwen3Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                 max_position_embeddings=8192, tie_word_embeddings=False)
            torch.manual_seed(0)
            with torch.device(self.device):
                self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
            self.model_name = "tiny Qwen3 (4 layers, 8 q-heads, 4 kv-heads, head_dim 64), random weights (--smoke)"
        else:
            self.model, _, self.model_name = load_benchmark_model(args.model, self.dtype, self.device)
        cfg = self.model.config
        if getattr(cfg, "_attn_implementation", None) != "sdpa":
            self.notes.append(f"The model loaded with attention {cfg._attn_implementation!r}; set to 'sdpa'.")
            cfg._attn_implementation = "sdpa"
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.q_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.load_s = time.perf_counter() - t0
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.emit_line(f"Loaded {self.model_name} ({weights / 2**30:.1f} GiB of weights) in {self.load_s:.1f} s.")
        gen = torch.Generator().manual_seed(0)
        self.long = max(args.contexts)
        self.ids = torch.randint(100, cfg.vocab_size, (1, self.long), generator=gen).to(self.device)
        self.build_specs()

    def build_specs(self) -> None:
        from transformers import DynamicCache

        args, cfg = self.args, self.model.config
        self.qc = {}
        try:
            from hf_ratequant import RateQuantConfig

            # quantizer, G and R from the flags, the sinks a calibrated config has by default (32 tokens for G = 32)
            self.layout = layout_from_args(args)
            self.qc = {b: RateQuantConfig.uniform(cfg, bits=b, layout=self.layout) for b in (2, 4)}
            kb, vb = per_head_mix(self.num_layers, self.kv_heads)
            self.qc[2.5] = RateQuantConfig.from_bits(bits_table(kb, vb), self.layout, method="per-head-mix",
                                                     fingerprint=self.qc[2].fingerprint, budget=2.5)
        except Exception as err:  # noqa: BLE001 - every RateQuant row then reports it
            self.qc_error = short_error(err)
            logger.warning("RateQuantConfig unavailable: %s", self.qc_error)

        def dynamic():
            # The baseline runs plain sdpa: a fused RateQuantCache switches the model's config to "ratequant"
            # (sdpa plus the fused op, the same for other caches, but switched back here all the same).
            cfg._attn_implementation = "sdpa"
            return DynamicCache(config=cfg)

        def ratequant(bits, path):
            def make():
                from hf_ratequant import RateQuantCache

                if bits not in self.qc:
                    raise RuntimeError(f"no RateQuantConfig: {getattr(self, 'qc_error', '?')}")
                kwargs = {}
                if path == "dequantize":
                    kwargs["attention"] = "dequantize"
                elif not self.cuda:
                    kwargs["attention"] = "fused"  # the CPU rehearsal: the op's PyTorch reference
                return RateQuantCache(config=cfg, quant_config=self.qc[bits], **kwargs)

            return make

        names = {2: "RQ uniform 2", 4: "RQ uniform 4", 2.5: "RQ mix 2/3 (2.5)"}
        self.dyn = Spec(f"DynamicCache ({self.args.dtype})", "dynamic", 16, "sdpa", dynamic)
        self.rq = {
            (b, p): Spec(names[b], "ratequant", b, p, ratequant(b, p))
            for b in (2, 4, 2.5)
            for p in ("fused", "dequantize")
        }

    def kv_bytes(self, cache) -> int:
        if hasattr(cache, "nbytes"):
            return int(cache.nbytes)
        return sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in (layer.keys, layer.values)
            if isinstance(t, torch.Tensor)
        )

    def fill(self, cache, states, batch: int = 1, capacity: int | None = None) -> None:
        """`cache.update` with every layer's states (moved to the device layer by layer), each layer then repeated
        to `batch` rows; with `capacity` (CPU rehearsal), a simulated OOM once the cache holds more bytes."""
        for i, (k, v) in enumerate(states):
            if k.device != self.device:
                k, v = k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)
            cache.update(k, v, i)
            if batch > 1:
                cache.layers[i].batch_repeat_interleave(batch)
            if capacity is not None and self.kv_bytes(cache) > capacity:
                raise SimulatedOOM(f"simulated: the cache passed {capacity / 2**20:.0f} MiB at layer {i}")

    def step(self, token, cache):
        out = self.model(input_ids=token, **cache_kwargs(self.model, cache), use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def kernel_impl(self, op: str) -> tuple[str, str]:
        """(short, reason) of what serves `hf_ratequant::op` here: Triton or the PyTorch reference."""
        ops = _ops()
        if ops is None:
            return "?", "hf_ratequant.ops missing"
        if not self.cuda:
            backend = ops.cpu_backend() if hasattr(ops, "cpu_backend") else "reference"
            return ("triton-interp", "") if backend == "triton" else ("torch-ref", "CPU")
        reason = None
        if hasattr(ops, "triton_unavailable_reason"):
            reason = ops.triton_unavailable_reason(self.device.index)
        if reason:
            return "torch-ref", reason
        broken = broken_kernels().get(op)
        if broken:
            return "torch-ref", f"Triton {op} failed: {broken}"
        return "triton", ""

    def path_of(self, spec: Spec, probe: PathProbe, cache) -> tuple[str, str]:
        """(path that ran, note)."""
        if spec.kind == "dynamic":
            return "sdpa", ""
        notes = []
        if probe.ran_fused:
            impl, why = self.kernel_impl("decode_attention")
            path = f"fused/{impl}"
            if probe.declined:
                notes.append(f"{probe.declined} attention calls declined the fused op")
        else:
            impl, why = self.kernel_impl("dequantize_layer")
            path = f"dequantize/{impl}" if probe.ops["dequantize_layer"] or probe._prof is None else "dequantize?"
            if probe.declined:
                notes.append("the fused op declined every call")
            if spec.path == "fused":
                flags = [getattr(layer, "fused", None) for layer in cache.layers]
                notes.append(f"asked fused, ran dequantize (layer.fused={flags[0]}, attention "
                             f"{getattr(self.model.config, '_attn_implementation', None)!r})")
        if why and why != "CPU":
            notes.append(why)
        return path, "; ".join(notes)

    # ---- output -----------------------------------------------------------------------------------------------
    def emit_line(self, text: str) -> None:
        print(text, flush=True)

    def add(self, row: Row) -> Row:
        if row.error and not row.result:
            row.result = "unavailable"
        self.rows.append(row)
        self.emit_line("ROW " + self.md_row(row))
        self.write()
        return row

    @staticmethod
    def md_row(r: Row) -> str:
        def cell(x) -> str:
            return str(x).replace("|", "/").replace("\n", " ")

        notes = r.notes
        if r.error:
            notes = f"{r.error}" + (f"; {notes}" if notes else "")
        cells = [r.section, r.setting, r.cache, r.path, r.result, r.vs_text, r.goal, r.verdict, notes]
        return "| " + " | ".join(cell(c) for c in cells) + " |"

    def table(self) -> str:
        head = "| # | setting | cache | path | result | vs DynamicCache | goal | verdict | notes |"
        order = {s: i for i, s in enumerate((1, 2, 3, 4, 5, 6))}
        rows = sorted(self.rows, key=lambda r: order.get(r.section, 9))  # stable: measured order within a section
        return "\n".join([head, "|" + "---|" * 9, *(self.md_row(r) for r in rows)])

    def header(self) -> str:
        a, info = self.args, self.info
        gpu = info.get("gpu", info["device"])
        ops = _ops()
        triton_state = "?"
        if ops is not None and self.cuda and hasattr(ops, "triton_unavailable_reason"):
            triton_state = ops.triton_unavailable_reason(self.device.index) or "available"
        lines = [
            f"# GPU speed: RateQuantCache vs DynamicCache ({gpu})",
            "",
            f"{self.model_name if hasattr(self, 'model_name') else a.model}, {a.dtype}; torch {info['torch']}, "
            f"transformers {info.get('transformers')}, triton {info.get('triton')} (kernels: {triton_state}); "
            f"sdpa backends: {a.sdpa}. RateQuant {a.quantizer}, G={a.group_size}, R={a.residual_length}, "
            f"S={self.layout.sink_length if self.layout else '?'} sink tokens. "
            f"Decode: {a.warmup} warm-up + {a.steps} timed greedy steps, median of {a.repeats} interleaved runs; "
            f"caches filled by update() from one DynamicCache prefill (batch > 1: the filled batch-1 cache "
            f"repeated). 'path' is what ran: fused/triton = the fused decode-attention kernel, dequantize/* = the "
            f"past dequantized every step then sdpa. Ratios: speed = tokens/s over DynamicCache's, time = seconds "
            f"over DynamicCache's, batch = largest fitting batch over DynamicCache's, memory = peak over "
            f"DynamicCache's. Total wall time {self.elapsed():.0f} s"
            + (f" (stopped early: {self.interrupted})" if self.interrupted else "")
            + ".",
        ]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        broken = broken_kernels()
        if broken:
            lines += ["", *(f"- Triton kernel {k} failed and fell back to PyTorch: {v}" for k, v in broken.items())]
        return "\n".join(lines)

    def markdown(self) -> str:
        return self.header() + "\n\n" + self.table() + "\n"

    def write(self) -> None:
        try:
            payload = dict(
                machine=self.info, model=getattr(self, "model_name", self.args.model), args=vars(self.args),
                wall_s=self.elapsed(), section_s=self.section_s, notes=self.notes, broken_kernels=broken_kernels(),
                interrupted=self.interrupted, rows=[asdict(r) for r in self.rows],
            )
            write_results(self.stem, payload, self.markdown(), self.args.output_dir)
        except OSError as err:
            logger.warning("Could not write the results: %s", err)

    # ---- shared states ------------------------------------------------------------------------------------------
    def ensure_states(self) -> None:
        """The states of a `long`-token prefill (section 4 leaves them; otherwise one untimed prefill, or random
        states if even that fails)."""
        if self.states is not None:
            return
        if self.states_cpu is not None:
            self.states = [(k.to(self.device), v.to(self.device)) for k, v in self.states_cpu]
            return
        try:
            cache = self.dyn.make()
            out = self.model(input_ids=self.ids, **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1)
            self.first = out.logits[:, -1].argmax(-1, keepdim=True)
            self.states = [(layer.keys, layer.values) for layer in cache.layers]
        except Exception as err:  # noqa: BLE001
            msg = short_error(err)
            self.notes.append(f"The {self.long}-token prefill failed ({msg}): caches are filled with random states.")
            cache = None
            free_memory()
            shape = (1, self.kv_heads, self.long, self.head_dim)
            self.states = [(torch.randn(shape, dtype=self.dtype, device=self.device),
                            torch.randn(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
            self.first = self.ids[:, -1:]

    def states_at(self, context: int):
        return [(k[:, :, :context].contiguous(), v[:, :, :context].contiguous()) for k, v in self.states]

    def states_to_cpu(self) -> None:
        """Free the device of the shared states (sections 5 and 3 measure memory)."""
        if self.states is None:
            return
        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.cpu()
            if self.cuda:
                try:
                    t = t.pin_memory()  # faster copies back, once per try of section 3
                except RuntimeError:
                    pass
            return t

        self.states_cpu = [(host(k), host(v)) for k, v in self.states]
        self.states = None
        free_memory()

    # ---- warm-up ------------------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Every cache once at a short context (Triton compiles, first-call allocations), batch 1 and `--batch`."""
        t0 = time.perf_counter()
        n = min(self.long, self.args.residual_length + 4 * self.args.group_size + 128)
        cache = self.dyn.make()
        out = self.model(input_ids=self.ids[:, :n], **cache_kwargs(self.model, cache), use_cache=True,
                         logits_to_keep=1)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        states = [(layer.keys, layer.values) for layer in cache.layers]
        del cache
        for spec in [self.dyn, *self.rq.values()]:
            for batch in (1, self.args.batch) if spec.bits in (16, 2.5) else (1,):
                try:
                    cache = spec.make()
                    self.fill(cache, states, batch)
                    token = first.repeat(batch, 1)
                    for _ in range(3):
                        token = self.step(token, cache)
                    self.sync()
                except Exception as err:  # noqa: BLE001 - reported again by the rows themselves
                    logger.warning("warm-up of %s (%s, batch %d) failed: %s", spec.label, spec.path, batch,
                                   short_error(err))
                cache = None
        free_memory()
        self.warmup_s = time.perf_counter() - t0
        self.emit_line(f"Warm-up (every cache at {n} tokens; Triton compiles) took {self.warmup_s:.1f} s.")

    # ---- sections 1 and 2: decode speed -------------------------------------------------------------------------
    def decode_run(self, spec: Spec, states, context: int, batch: int) -> dict:
        args = self.args
        cache = spec.make()
        self.sync()
        t0 = time.perf_counter()
        self.fill(cache, states, batch)
        self.sync()
        fill_s = time.perf_counter() - t0
        token = self.first.repeat(batch, 1)
        with PathProbe() as probe:
            token = self.step(token, cache)
        for _ in range(args.warmup - 1):
            token = self.step(token, cache)
        self.sync()
        times = []
        for _ in range(args.steps):
            self.sync()
            t = time.perf_counter()
            token = self.step(token, cache)
            self.sync()
            times.append(time.perf_counter() - t)
        length = cache.get_seq_length()
        if length != context + args.warmup + args.steps:
            raise RuntimeError(f"the cache holds {length} tokens, expected {context + args.warmup + args.steps}")
        path, note = self.path_of(spec, probe, cache)
        return dict(total=sum(times), steps=times, fill_s=fill_s, path=path, note=note, kv=self.kv_bytes(cache))

    def decode_rows(self, section: int, context: int, batch: int, specs: list[Spec], goal: float) -> None:
        """Measure, compute the ratios and add the rows; interrupted (SIGTERM), add the runs measured so far."""
        partial: dict = {}
        try:
            rows = self.decode_section(section, context, batch, specs, partial)
        except Interrupted:
            if partial:
                rows = self.finish_rows(batch, **partial)
                for r in rows:
                    if r.value is None:
                        r.error = "interrupted before its first run"
                    else:
                        r.notes += "; interrupted"
                self.ratios(rows, specs, goal)
                for r in rows:
                    self.add(r)
            raise
        self.ratios(rows, specs, goal)
        for r in rows:
            self.add(r)

    def decode_section(self, section: int, context: int, batch: int, specs: list[Spec], partial: dict) -> list[Row]:
        args = self.args
        setting = f"B={batch}, ctx {context}"
        rows = [Row(section, setting, s.label + ("" if s.kind == "dynamic" else f" [{s.path}]")) for s in specs]
        runs: list[list[dict]] = [[] for _ in specs]
        partial.update(rows=rows, runs=runs)
        spent = [0.0] * len(specs)
        try:
            states = self.states_at(context)
        except Exception as err:  # noqa: BLE001
            for r in rows:
                r.error = f"states: {short_error(err)}"
            return rows
        for rep in range(args.repeats):
            for i, spec in enumerate(specs):
                row = rows[i]
                if row.error:
                    continue
                if spent[i] > args.row_timeout_s:
                    row.details["stopped"] = f"row guard ({args.row_timeout_s:.0f} s) after {len(runs[i])} runs"
                    continue
                estimate = spent[i] / len(runs[i]) if runs[i] else 5.0
                if self.left() < estimate + args.reserve_s:
                    row.details["stopped"] = f"time budget after {len(runs[i])} runs"
                    continue
                t0 = time.perf_counter()
                err_text = None
                try:
                    run = self.decode_run(spec, states, context, batch)
                except Exception as err:  # noqa: BLE001 - an unavailable cache is a row, not a crash
                    err_text = short_error(err)
                if err_text is not None:
                    row.error = err_text
                    free_memory()
                    logger.warning("%s %s at %s failed: %s", spec.label, spec.path, setting, err_text)
                    continue
                spent[i] += time.perf_counter() - t0
                runs[i].append(run)
                self.emit_line(
                    f"  [{section}] {setting} {row.cache:<32} run {rep + 1}/{args.repeats}: "
                    f"{batch * args.steps / run['total']:8.1f} tok/s, fill {run['fill_s']:.2f} s, {run['path']}"
                )
                if batch > 1:
                    free_memory()
        del states
        return self.finish_rows(batch, rows, runs)

    def finish_rows(self, batch: int, rows: list[Row], runs: list[list[dict]]) -> list[Row]:
        args = self.args
        for row, spec_runs in zip(rows, runs):
            if not spec_runs:
                if not row.error:
                    row.error = row.details.get("stopped", "not run")
                continue
            totals = sorted(r["total"] for r in spec_runs)
            median = statistics.median(totals)
            last = spec_runs[-1]
            row.value = batch * args.steps / median
            row.unit = "tok/s"
            row.result = f"{row.value:.1f} tok/s"
            row.path = last["path"]
            step_ms = [1e3 * t for r in spec_runs for t in r["steps"]]
            row.details.update(
                runs_s=[r["total"] for r in spec_runs], fill_s=[r["fill_s"] for r in spec_runs],
                ms_per_step_median=1e3 * median / args.steps, max_step_ms=max(step_ms), kv_bytes=last["kv"],
                spread=(totals[-1] - totals[0]) / median if len(totals) > 1 else 0.0,
            )
            row.notes = f"KV {last['kv'] / 2**20:.0f} MiB, {1e3 * median / args.steps:.1f} ms/step"
            if len(spec_runs) < args.repeats:
                row.notes += f", {len(spec_runs)} of {args.repeats} runs ({row.details.get('stopped', '')})"
            if last["note"]:
                row.notes += f"; {last['note']}"
        return rows

    def ratios(self, rows: list[Row], specs: list[Spec], goal: float | None) -> None:
        dyn = next((r for r, s in zip(rows, specs) if s.kind == "dynamic" and r.value), None)
        by = {(s.bits, s.path): r for r, s in zip(rows, specs)}
        for row, spec in zip(rows, specs):
            if spec.kind == "dynamic" or not row.value:
                continue
            if dyn is not None:
                row.vs_dynamic = row.value / dyn.value
                row.vs_text = f"{row.vs_dynamic:.2f}x speed"
            if spec.path == "fused" and goal is not None:
                row.goal = f">= {goal:g}x"
                if row.vs_dynamic is not None:
                    row.verdict = "PASS" if row.vs_dynamic >= goal else "FAIL"
                    if not row.path.startswith("fused"):
                        row.verdict += " (not fused)"
            elif spec.path == "dequantize":
                row.goal = "(comparison)"
            if spec.bits == 2.5:
                parts = []
                for b in (2, 4):
                    other = by.get((b, spec.path))
                    if other is not None and other.value:
                        parts.append(f"mix/u{b} {row.value / other.value:.2f}x")
                if parts:
                    row.notes = ", ".join(parts) + "; " + row.notes

    def section1(self) -> None:
        specs = [self.dyn] + [self.rq[(b, p)] for p in ("fused", "dequantize") for b in (2, 4, 2.5)]
        for context in self.args.contexts:
            if self.left() < SECTION_MIN_S[1]:
                self.skip(1, f"B=1, ctx {context}", "time budget")
                continue
            self.decode_rows(1, context, 1, specs, 0.95)

    def section2(self) -> None:
        specs = [self.dyn, self.rq[(2.5, "fused")], self.rq[(2.5, "dequantize")]]
        self.decode_rows(2, self.long, self.args.batch, specs, 1.5)

    # ---- section 3: the largest batch ---------------------------------------------------------------------------
    def try_batch(self, spec: Spec, batch: int, capacity: int | None) -> tuple[str, dict]:
        """("fit" | "oom" | "error", info) of a `batch`-row cache of `self.long` tokens and one decode step."""
        cache = None
        info: dict = dict(batch=batch)
        t0 = time.perf_counter()
        err_text = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            cache = spec.make()
            self.fill(cache, self.states_cpu, batch, capacity)
            token = self.first.repeat(batch, 1)
            with PathProbe() as probe:
                token = self.step(token, cache)  # the step that proves it runs
            self.sync()
            t = time.perf_counter()
            token = self.step(token, cache)
            self.sync()
            info.update(step_ms=1e3 * (time.perf_counter() - t), kv_bytes=self.kv_bytes(cache))
            info["path"], info["note"] = self.path_of(spec, probe, cache)
            if self.cuda:
                info["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        except (OOM, SimulatedOOM) as err:
            err_text, status = short_error(err, 100), "oom"
        except Exception as err:  # noqa: BLE001 - an allocation failure reported otherwise counts as not fitting
            err_text = short_error(err, 100)
            status = "oom" if any(w in err_text.lower() for w in ("out of memory", "alloc_failed")) else "error"
        finally:
            cache = None
        ok = err_text is None
        if not ok:
            info["error"], info["status"] = err_text, status
        free_memory()
        info["s"] = time.perf_counter() - t0
        self.emit_line(f"  [3] {spec.label} [{spec.path}] batch {batch}: {'fits' if ok else 'does not fit'} "
                       f"({info['s']:.1f} s{'' if ok else ', ' + err_text})")
        return ("fit" if ok else status), info

    def max_batch(self, spec: Spec) -> Row:
        args = self.args
        row = Row(3, f"ctx {self.long}, max batch", spec.label + ("" if spec.kind == "dynamic" else f" [{spec.path}]"))
        self.ensure_states_cpu()
        # Bytes per batch row: a batch-1 cache, measured.
        seed = spec.make()
        self.fill(seed, self.states_cpu, 1)
        per_row = self.kv_bytes(seed)
        seed = None
        free_memory()
        if self.cuda:
            capacity = None
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            capacity = int(args.smoke_capacity_mib * 2**20)
            free = capacity
        hi = int(free // per_row) + 1  # a cache of this many rows alone exceeds the free memory
        lo, best, tries = 0, None, []
        probe = max(1, int(args.first_probe * (hi - 1)))
        for _ in range(args.max_tries):
            if hi - lo <= 1 or self.left() < args.reserve_s + 5:
                break
            # (CPU rehearsal: 15% of the simulated memory is taken by other things, so that some tries fail.)
            status, info = self.try_batch(spec, probe, None if capacity is None else int(0.85 * capacity))
            tries.append(info)
            if status == "fit":
                lo, best = probe, info
            elif status == "oom":
                hi = probe
            else:  # not a matter of memory: more tries would not tell more
                row.details["stopped"] = info.get("error")
                break
            # Bisect once a batch fits; until then step down geometrically (the bound is usually close).
            probe = (lo + hi) // 2 if lo else max(1, min(hi - 1, int(args.first_probe * hi)))
            if probe <= lo:
                break
        row.details.update(tries=tries, bytes_per_row=per_row, free_bytes_at_start=free, lo=lo, hi=hi)
        if best is None:
            row.error = f"no batch fitted in {len(tries)} tries" + (f" ({tries[-1].get('error')})" if tries else "")
            return row
        if row.details.get("stopped"):
            row.notes = f"search stopped: {row.details['stopped']}; "
        row.value, row.unit = float(lo), "batch"
        exact = hi - lo <= 1
        row.result = f"B={lo}" + (f" ({hi} fails)" if exact else f" (<{hi}; search capped)")
        row.path = best.get("path", "")
        tok_s = lo / (best["step_ms"] / 1e3)
        row.notes += (f"{per_row / 2**20:.0f} MiB/row, {len(tries)} tries; step at B={lo}: {best['step_ms']:.0f} "
                      f"ms = {tok_s:.0f} tok/s")
        if best.get("note"):
            row.notes += f"; {best['note']}"
        return row

    def ensure_states_cpu(self) -> None:
        if self.states_cpu is None:
            self.ensure_states()
            self.states_to_cpu()

    def section3(self) -> None:
        rows = []
        for spec in (self.dyn, self.rq[(2.5, "fused")]):
            err_text = None
            try:
                rows.append(self.max_batch(spec))
            except Exception as err:  # noqa: BLE001
                err_text = short_error(err)
            if err_text is not None:
                free_memory()
                rows.append(Row(3, f"ctx {self.long}, max batch", spec.label, error=err_text))
        dyn, rq = rows
        if dyn.value and rq.value:
            rq.vs_dynamic = rq.value / dyn.value
            rq.vs_text = f"{rq.vs_dynamic:.2f}x batch"
            rq.verdict = "PASS" if rq.vs_dynamic >= 4 else "FAIL"
        rq.goal = ">= 4x"
        for r in rows:
            self.add(r)

    # ---- section 4: time to first token -------------------------------------------------------------------------
    def section4(self) -> None:
        args = self.args
        rows = []
        for spec in (self.dyn, self.rq[(2.5, "fused")]):
            name = spec.label + ("" if spec.kind == "dynamic" else f" [{spec.path}]")
            row = Row(4, f"B=1, prefill {self.long}", name)
            times, err_text = [], None
            try:
                for i in range(1 + args.prefill_repeats):  # the first one warms up
                    if i > 1 and self.left() < args.reserve_s + 2 * max(times):
                        row.details["stopped"] = "time budget"
                        break
                    cache = spec.make()
                    self.sync()
                    t0 = time.perf_counter()
                    out = self.model(input_ids=self.ids, **cache_kwargs(self.model, cache), use_cache=True,
                                     logits_to_keep=1)
                    first = out.logits[:, -1].argmax(-1, keepdim=True)
                    self.sync()
                    dt = time.perf_counter() - t0
                    if i:
                        times.append(dt)
                    if spec.kind == "dynamic":
                        self.first = first
                        self.states = [(layer.keys, layer.values) for layer in cache.layers]
                    else:
                        row.details["kv_bytes"] = self.kv_bytes(cache)
                    out = cache = None
            except Exception as err:  # noqa: BLE001
                err_text = short_error(err)
            cache = out = None
            if err_text is not None:
                row.error = err_text
                free_memory()
            if times:
                row.value, row.unit = statistics.median(times), "s"
                row.result = f"{row.value:.3f} s"
                row.path = "sdpa" if spec.kind == "dynamic" else "prefill: sdpa + quantize"
                row.details["times_s"] = times
                row.notes = f"median of {len(times)} (+1 warm-up)"
            rows.append(row)
        dyn, rq = rows
        if dyn.value and rq.value:
            rq.vs_dynamic = rq.value / dyn.value
            rq.vs_text = f"{rq.vs_dynamic:.2f}x time"
            rq.verdict = "PASS" if rq.vs_dynamic <= 1.1 else "FAIL"
        rq.goal = "<= 1.1x"
        for r in rows:
            self.add(r)

    # ---- section 5: peak memory of generate() -------------------------------------------------------------------
    def section5(self) -> None:
        args = self.args
        self.ensure_states_cpu()  # the shared states leave the device: the baseline is the weights
        rows = []
        n = args.new_tokens
        for spec in (self.dyn, self.rq[(2.5, "fused")]):
            row = Row(5, f"B=1, generate {self.long}+{n}", spec.label + ("" if spec.kind == "dynamic"
                                                                             else f" [{spec.path}]"))
            err_text = None
            try:
                free_memory()
                cache = spec.make()
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)
                    base = torch.cuda.memory_allocated(self.device)
                self.sync()
                t0 = time.perf_counter()
                with PathProbe(profile=False) as probe:  # no profiler: it would slow the whole generate()
                    out = self.model.generate(
                        input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                        **cache_kwargs(self.model, cache),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                    )
                self.sync()
                wall = time.perf_counter() - t0
                row.path, note = self.path_of(spec, probe, cache)
                generated = out.shape[1] - self.ids.shape[1]
                row.details.update(wall_s=wall, generated=generated, kv_bytes=self.kv_bytes(cache))
                row.notes = f"{wall:.2f} s for {generated} tokens" + (f"; {note}" if note else "")
                if self.cuda:
                    peak = torch.cuda.max_memory_allocated(self.device)
                    row.value, row.unit = peak / 2**30, "GiB"
                    row.result = f"{row.value:.2f} GiB peak"
                    row.details.update(peak_bytes=peak, base_bytes=base)
                    row.notes = f"+{(peak - base) / 2**30:.2f} GiB over weights; " + row.notes
                else:
                    row.result = "n/a (no CUDA)"
                    row.details["above_base"] = None
            except Exception as err:  # noqa: BLE001
                err_text = short_error(err)
            cache = out = None
            if err_text is not None:
                row.error = err_text
            free_memory()
            rows.append(row)
        dyn, rq = rows
        rq.goal = "(report)"
        if dyn.value and rq.value:
            rq.vs_dynamic = rq.value / dyn.value
            over = [r.details["peak_bytes"] - r.details["base_bytes"] for r in rows]
            rq.vs_text = f"{rq.vs_dynamic:.2f}x memory"
            rq.notes = f"over weights {over[1] / max(over[0], 1):.2f}x; " + rq.notes
        for r in rows:
            self.add(r)

    # ---- section 6: the kernel alone ----------------------------------------------------------------------------
    def time_call(self, fn, iters: int) -> dict:
        """Seconds per call: wall (CUDA events around `iters` back-to-back calls, median of 3) and, on CUDA, the
        GPU time of the kernels alone (torch.profiler: the sum of their durations)."""
        for _ in range(3):
            fn()
        self.sync()
        walls = []
        for _ in range(3):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                walls.append(start.elapsed_time(end) / 1e3 / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                walls.append((time.perf_counter() - t0) / iters)
        res = dict(wall_s=statistics.median(walls), kernel_s=None)
        if self.cuda:
            try:
                from torch.autograd import DeviceType
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(iters):
                        fn()
                    self.sync()
                total_us = 0.0
                for evt in prof.events():
                    if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False):
                        t = getattr(evt, "self_device_time_total", None)
                        total_us += evt.self_cuda_time_total if t is None else t
                if total_us > 0:
                    res["kernel_s"] = total_us / 1e6 / iters
            except Exception as err:  # noqa: BLE001 - the wall time stands
                res["profiler_error"] = short_error(err)
        return res

    def copy_bandwidth(self) -> float:
        n = (self.args.copy_mib * 2**20) // 2
        src = torch.empty(n, dtype=torch.bfloat16, device=self.device).normal_()
        dst = torch.empty_like(src)
        t = self.time_call(lambda: dst.copy_(src), iters=10)
        return 2 * n * 2 / t["wall_s"]  # bytes read + written per second

    def section6(self) -> None:
        args = self.args
        self.ensure_states()
        try:
            copy_bw = self.copy_bandwidth()
            self.add(Row(6, f"{args.copy_mib} MiB bf16", "Tensor.copy_", "", copy_bw / 1e9, "GB/s",
                         gbs(copy_bw), notes="(read + write bytes) / time"))
        except Exception as err:  # noqa: BLE001
            copy_bw = None
            self.add(Row(6, f"{args.copy_mib} MiB bf16", "Tensor.copy_", error=short_error(err)))
            free_memory()
        try:
            from hf_ratequant import triton_kernels

            kernel = getattr(triton_kernels, "decode_attention")
            kernel_error = None
        except Exception as err:  # noqa: BLE001
            kernel, kernel_error = None, short_error(err)
        for batch in sorted({1, args.batch}):
            if self.left() < args.reserve_s + 5:
                self.skip(6, f"B={batch}, ctx {self.long}, layer 0", "time budget")
                continue
            err_text = None
            try:
                self.kernel_rows(batch, kernel, kernel_error, copy_bw)
            except Exception as err:  # noqa: BLE001
                err_text = short_error(err)
            if err_text is not None:
                self.add(Row(6, f"B={batch}, ctx {self.long}, layer 0", "fused kernel", error=err_text))
            free_memory()

    def kernel_rows(self, batch: int, kernel, kernel_error: str | None, copy_bw: float | None) -> None:
        from hf_ratequant import ops

        args = self.args
        setting = f"B={batch}, ctx {self.long}, layer 0"
        cache = self.rq[(2.5, "fused")].make()
        self.fill(cache, self.states, batch)
        layer = cache.layers[0]
        query = torch.randn(batch, self.q_heads, 1, self.head_dim, dtype=self.dtype, device=self.device)
        scaling = self.head_dim**-0.5
        rotated = bool(getattr(layer.quantizer, "rotates", False))
        quantizer = layer.quantizer.name
        window = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        parts = layer.past_parts() if hasattr(layer, "past_parts") else None

        def part_bytes(p) -> int:
            return sum(t.numel() * t.element_size() for t in (p.sink, *p.data, *p.scale, *p.zero, *p.ranges))

        packed = part_bytes(parts[0]) + part_bytes(parts[1]) + window if parts is not None else layer.nbytes
        # DynamicCache's layer for the same tokens: sdpa over the 16-bit past, GQA in the kernel.
        tokens = layer.get_seq_length()
        dk = torch.randn(batch, self.kv_heads, tokens, self.head_dim, dtype=self.dtype, device=self.device)
        dv = torch.randn_like(dk)
        dense = 2 * dk.numel() * dk.element_size()
        sdpa = torch.nn.functional.scaled_dot_product_attention

        ref_s = None  # seconds of the DynamicCache layer's sdpa: the speed ratios' reference

        def row_for(label: str, path: str, fn, nbytes: int, note: str, goal: str = "(report)") -> float | None:
            err_text = None
            try:
                t = self.time_call(fn, args.kernel_iters)
            except Exception as err:  # noqa: BLE001 - one measurement that fails is one row
                err_text = short_error(err)
            if err_text is not None:
                self.add(Row(6, setting, label, path, error=err_text, notes=note.lstrip("; ")))
                free_memory()
                return None
            secs = t["kernel_s"] or t["wall_s"]
            bw = nbytes / secs
            row = Row(6, setting, label, path, value=bw / 1e9, unit="GB/s", details=dict(t, bytes=nbytes))
            share = f" ({100 * bw / copy_bw:.0f}% of copy)" if copy_bw else ""
            row.result = f"{gbs(bw)}{share}"
            if ref_s is not None:
                row.vs_dynamic = ref_s / secs
                row.vs_text = f"{row.vs_dynamic:.2f}x speed"
            row.goal = goal
            timing = "kernel" if t["kernel_s"] else "wall"
            row.notes = (f"{nbytes / 2**20:.1f} MiB in {1e6 * secs:.1f} us ({timing}; wall {1e6 * t['wall_s']:.1f} "
                         f"us/call){note}")
            self.add(row)
            return secs

        ref_s = row_for("sdpa over bf16 (DynamicCache)", "sdpa",
                        lambda: sdpa(query, dk, dv, scale=scaling, enable_gqa=True), dense, "", goal="")
        dk = dv = None
        if parts is None:
            self.add(Row(6, setting, "fused kernel", error="RateQuantLayer.past_parts() missing"))
            return
        k_part, v_part = parts
        impl, _ = self.kernel_impl("decode_attention")
        if kernel is not None and (self.cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            row_for("triton_kernels.decode_attention", "triton",
                    lambda: kernel(query, None, k_part, v_part, layer.keys, layer.values, scaling, rotated),
                    packed, "")
        else:
            # No Triton module (or the CPU): the op the model calls, whatever implements it here.
            def op():
                return torch.ops.hf_ratequant.decode_attention(
                    query, None, *ops.part_args(k_part, layer.key_bits, layer.past_keys.groups),
                    *ops.part_args(v_part, layer.value_bits, layer.past_values.groups), layer.keys, layer.values,
                    quantizer, scaling)

            why = kernel_error or "the Triton kernel runs on CUDA (or under TRITON_INTERPRET=1)"
            row_for("op hf_ratequant::decode_attention", impl, op, packed, f"; triton_kernels: {why}")

        def dequantize_then_sdpa():
            keys, values = ops.dequantize_layer(k_part, v_part, layer.keys, layer.values, layer.key_bits,
                                                layer.value_bits, layer.past_keys.groups, layer.past_values.groups,
                                                quantizer)
            return sdpa(query, keys, values, scale=scaling, enable_gqa=True)

        impl, _ = self.kernel_impl("dequantize_layer")
        row_for("dequantize_layer + sdpa", f"dequantize/{impl}", dequantize_then_sdpa, packed,
                "; bytes: the packed layer")

    # ---- driver -------------------------------------------------------------------------------------------------
    def skip(self, section: int, setting: str, why: str) -> None:
        self.add(Row(section, setting, "(all)", result="skipped", error=f"skipped: {why}"))

    def run(self) -> None:
        self.load()
        self.warmup()
        for section in SECTION_ORDER:
            if section not in self.args.sections:
                continue
            if self.left() < SECTION_MIN_S[section]:
                self.skip(section, "", f"time budget ({self.left():.0f} s left)")
                continue
            t0 = time.perf_counter()
            if section in (1, 2, 6):
                self.ensure_states()
            getattr(self, f"section{section}")()
            self.section_s[section] = time.perf_counter() - t0
            self.emit_line(f"Section {section} took {self.section_s[section]:.1f} s ({self.elapsed():.0f} s in all).")
            free_memory()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="random:qwen3-8b", help=MODEL_HELP + " (default random:qwen3-8b)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="default bfloat16")
    p.add_argument("--device", default="cuda", help="default cuda")
    p.add_argument("--contexts", type=int, nargs="+", help="batch-1 decode contexts (default 4096 32768); the "
                   "largest is also the context of sections 2-6")
    p.add_argument("--steps", type=int, help="timed decode steps per run (default 32 = one group G)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    p.add_argument("--repeats", type=int, help="runs per decode row, median reported (default 3)")
    p.add_argument("--prefill-repeats", type=int, help="timed prefills per cache, after one warm-up (default 2)")
    p.add_argument("--batch", type=int, help="batch of section 2 and of the second kernel row (default 16)")
    p.add_argument("--new-tokens", type=int, help="generate() new tokens of section 5 (default 32)")
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="figures to measure")
    p.add_argument("--max-tries", type=int, default=6, help="section 3: batches tried per cache (default 6)")
    p.add_argument("--first-probe", type=float, default=0.9,
                   help="section 3: first batch tried, as a share of the batch whose cache alone fills the free "
                   "memory (default 0.9)")
    p.add_argument("--kernel-iters", type=int, default=50, help="section 6: calls per timing (default 50)")
    p.add_argument("--copy-mib", type=int, help="section 6: size of the copy_ (default 2048; --smoke 64)")
    p.add_argument("--sdpa", default="nocudnn", choices=["default", "nocudnn", "flash", "efficient", "math"],
                   help="SDPA backends allowed (default nocudnn: flash, efficient, math; torch 2.11's cuDNN\n"
                   "attention rebuilds a graph for every new context length, see decode_speed.py)")
    p.add_argument("--quantizer", default=LAYOUT.quantizer, help=f"RateQuant quantizer (default {LAYOUT.quantizer})")
    p.add_argument("--group-size", type=int, default=LAYOUT.group_size,
                   help=f"RateQuant G (default {LAYOUT.group_size}; the sinks: the least multiple of G >= 32)")
    p.add_argument("--residual-length", type=int, default=LAYOUT.residual_length,
                   help=f"RateQuant R (default {LAYOUT.residual_length})")
    p.add_argument("--budget-s", type=float, help="wall-clock budget of the whole run (default 300; --smoke 100)")
    p.add_argument("--row-timeout-s", type=float, default=45, help="no more runs of a row past this (default 45)")
    p.add_argument("--reserve-s", type=float, default=10, help="time kept for writing the results (default 10)")
    p.add_argument("--quick", action="store_true", help="32k only, 2 repeats, 1 timed prefill, 4 tries")
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: a tiny Qwen3, short contexts")
    p.add_argument("--smoke-capacity-mib", type=float, default=48, help="--smoke: the simulated memory (48)")
    p.add_argument("--output-dir", default=RESULTS_DIR, help="where gpu_speed_TAG.md/.json go")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args(argv)
    defaults = dict(contexts=[4096, 32768], steps=32, repeats=3, prefill_repeats=2, batch=16, new_tokens=32,
                    copy_mib=2048, budget_s=300.0)
    if args.quick:
        defaults.update(contexts=[32768], repeats=2, prefill_repeats=1)
        args.max_tries = min(args.max_tries, 4)
    if args.smoke:
        defaults.update(contexts=[256, 512], repeats=2, prefill_repeats=1, batch=4, new_tokens=8, copy_mib=64,
                        budget_s=100.0)
        args.kernel_iters = min(args.kernel_iters, 10)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.contexts = sorted(set(args.contexts))
    args.warmup = max(1, args.warmup)  # the warm-up steps are also where the path that ran is observed
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_ratequant.attention").setLevel(logging.WARNING)  # "attention now runs as ..." per cache
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here (use --smoke --device cpu --dtype float32).")
        return 2

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    bench.emit_line(f"gpu_speed: {bench.info}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "nocudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "flash": [SDPBackend.FLASH_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }.get(args.sdpa)
    code = 0
    try:
        with torch.inference_mode():
            if backends is None:
                bench.run()
            else:
                with sdpa_kernel(backends):
                    bench.run()
    except (Interrupted, KeyboardInterrupt) as err:
        bench.interrupted = str(err) or type(err).__name__
        code = 124
    except Exception as err:  # noqa: BLE001 - whatever was measured is still written and printed
        bench.interrupted = short_error(err)
        logger.exception("gpu_speed stopped")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        bench.write()
        logger.info("Wrote %s and %s.", bench.md_path, bench.json_path)
        sys.stderr.flush()
        print("\n" + bench.markdown(), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
