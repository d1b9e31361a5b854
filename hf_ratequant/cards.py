"""The model card of a config repo: YAML metadata, what the allocation is, its heatmap, calibration and quality
tables, and a usage snippet that runs as written. Everything here takes a config object and only reads it."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .storage import CONFIG_NAME, curves_file_for

if TYPE_CHECKING:
    from .config import RateQuantConfig

__all__ = ["CARD_NAME", "HEATMAP_NAME", "model_card", "usage_snippet"]

CARD_NAME = "README.md"
HEATMAP_NAME = "allocation.png"
LIBRARY_NAME = "hf-ratequant"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _base_model(config: RateQuantConfig) -> str | None:
    name = config.fingerprint.name_or_path if config.fingerprint else None
    if not name:
        return None
    name = name.split(" (", 1)[0]  # a model loaded from a GGUF describes itself with a suffix: "<hub id> (GGUF ...)"
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def usage_snippet(config: RateQuantConfig, repo_id: str) -> str:
    """Python that loads the model and generates with this config from the Hub, as written."""
    base = _base_model(config)
    if base == DEFAULT_MODEL_ID:
        load = "from hf_ratequant import load_default_model\n\nmodel, tokenizer = load_default_model()  # " \
               "SmolLM2-135M-Instruct, embedded in hf-ratequant"
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{base or "<the base model>"}", dtype="auto", '
            'device_map="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base or "<the base model>"}")'
        )
    return (
        f"{load}\nfrom hf_ratequant import RateQuantCache\n\n"
        f'cache = RateQuantCache.from_pretrained("{repo_id}", model=model)\n'
        'inputs = tokenizer("The key idea of mixed-precision KV caches is", return_tensors="pt").to(model.device)\n'
        "out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)\n"
        "print(tokenizer.decode(out[0], skip_special_tokens=True))\n"
        'print(f"cache: {cache.nbytes} bytes, {cache.nbytes_16bit()} in 16-bit")\n'
    )


def model_card(
    config: RateQuantConfig, repo_id: str, *, license: str = "apache-2.0", evaluation: list[dict] | None = None
) -> str:
    """The README.md of a config repo: YAML metadata (`library_name`, `base_model`, `tags`, `license`), what the
    config is, the allocation heatmap, calibration and quality tables, and a usage snippet that runs as written.

    Args:
        evaluation (`list[dict]`, *optional*): held-out quality rows, each with `cache`, `avg_bits`, `perplexity`
            and `kl` (e.g. the `rows` of `hf-ratequant eval --json`), shown as a table.
    """
    from huggingface_hub import ModelCardData

    bits = config.bits_tensor().double()
    base = _base_model(config)
    data = ModelCardData(
        library_name=LIBRARY_NAME, license=license, base_model=base,
        tags=["kv-cache", "quantization", "mixed-precision", "ratequant", f"{config.quantizer}"],
    )
    fp = config.fingerprint
    curves_name = curves_file_for(config.curves)
    files = f"one small file (`{CONFIG_NAME}`)"
    if curves_name:
        files = f"two small files (`{CONFIG_NAME}`, `{curves_name}`)"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {base or (fp.name_or_path if fp else 'Model')}: RateQuant KV-cache allocation, {config.quantizer}, "
        f"{config.average_bits:g} average bits", "",
        f"A calibrated per-(layer, kv-head) bit allocation for `hf_ratequant.RateQuantCache`: keys and values of "
        f"every kv-head are stored at their own bit-width (packed codes, {config.quantizer} quantizer, group size "
        f"{config.group_size}, the last {config.residual_length} tokens"
        f"{f' and the first {config.sink_length}' if config.sink_length else ''} kept in full precision). Keys get "
        f"{bits[..., 0].mean():.2f} bits on average, values {bits[..., 1].mean():.2f}; method: `{config.method}`.", "",
        *_memory_lines(config),
        f"Model geometry: {fp.describe() if fp else 'not recorded'}. The cache refuses a model of another "
        "architecture or geometry.", "",
        f"![bits per layer and kv-head]({HEATMAP_NAME})", "",
        "## Usage", "", "```python", usage_snippet(config, repo_id).rstrip(), "```", "",
        f"`pip install hf-ratequant`; the config is {files}; nothing else is downloaded or executed.", "",
    ]
    if evaluation:
        lines += _quality_section(evaluation)
    if (config.calibration or {}).get("validation_kl"):
        lines += _calibration_section(config.calibration, curves_name)
    return "\n".join(lines)


def _memory_lines(config: RateQuantConfig) -> list[str]:
    """What the config stores: code bits, true bits per element, and the bytes of a 16-bit model's cache at
    [`REPORT_TOKENS`] tokens against a 16-bit `DynamicCache` (when the model's geometry is recorded)."""
    from .footprint import REPORT_TOKENS, cache_bytes, layer_weights, true_bits_per_element

    fp = config.fingerprint
    if fp is None or not fp.head_dim:
        return []
    true_bits = true_bits_per_element(config, fp.head_dim)
    held = ""
    context = (config.calibration or {}).get("budget_context") or REPORT_TOKENS  # the context a budget counted at
    if len(set(layer_weights(config, fp, context))) > 1:
        held = (f" ({true_bits_per_element(config, fp.head_dim, fingerprint=fp, tokens=context):.4g} per element "
                f"held at {context} tokens, where the sliding-window layers hold fewer tokens than the others)")
    f = cache_bytes(config, fp, REPORT_TOKENS)
    scales = ("16-bit scales and zero-points" if config.scale_bits == 16 else
              "8-bit scales and zero-points (one byte each, relative to three 16-bit numbers per super-block of 32 "
              "tokens)")
    return [f"Storage: {config.average_bits:.4g} average code bits, {true_bits:.4g} bits per stored element with the "
            f"{scales}{held}; at {REPORT_TOKENS} tokens a bf16/fp16 model's cache holds "
            f"{f.total / 2**20:.2f} MiB against {f.bytes_16bit / 2**20:.2f} MiB at 16 bits ({f.vs_16bit:.3f}x, the "
            f"full-precision window and sinks included).{_window_sentence(config)}", "", *_group_lines(config)]


def _window_sentence(config: RateQuantConfig) -> str:
    tokens = (config.calibration or {}).get("window_tokens")
    if not tokens:
        return ""
    return (f" The calibration budget of {config.calibration['true_budget']:g} true bits per element also paid for "
            f"the longer full-precision window of layers whose keys use larger token groups, counted at {tokens} "
            "tokens.")


def _group_lines(config: RateQuantConfig) -> list[str]:
    """How many units use each group size, when the config sets them per unit."""
    if not config.has_unit_groups:
        return []
    parts = []
    for kind, table in (("keys", config.key_groups), ("values", config.value_groups)):
        counts: dict[int, int] = {}
        for row in table:
            for g in row:
                counts[g] = counts.get(g, 0) + 1
        parts.append(f"{kind} " + ", ".join(f"{n} units at {g}" for g, n in sorted(counts.items())))
    return [f"Group sizes per unit (elements per scale and zero-point; kivi keys: tokens, otherwise channels): "
            f"{'; '.join(parts)}.", ""]


def _quality_section(evaluation: list[dict]) -> list[str]:
    lines = ["## Quality on held-out text", "", "| cache | avg bits | perplexity | KL to full precision |",
             "|---|---|---|---|"]
    for r in evaluation:
        kl = "0" if not r.get("kl") else f"{r['kl']:.4f}"
        lines.append(f"| {r['cache']} | {r['avg_bits']:g} | {r['perplexity']:.3f} | {kl} |")
    return [*lines, ""]


def _calibration_section(cal: dict[str, Any], curves_name: str | None) -> list[str]:
    """The calibration text and the table of the candidates' validation KL."""
    lines = ["## Calibration", "",
             f"Calibrated on {cal.get('source', 'unrecorded text')} ({cal.get('fit_tokens', '?')} tokens for the "
             f"fit, {cal.get('validation_tokens', '?')} held back for validation). Measure: {cal.get('measure')}."
             " Every candidate below was evaluated through the real cache on held-back windows (KL to the "
             "full-precision cache); the best one is this config.", ""]
    scored = cal.get("validation_windows") or {}
    if scored:  # successive halving: KLs over different numbers of windows are not comparable with each other
        lines[-1:] = [f" Successive halving: every candidate was scored on the first {min(scored.values())} "
                      f"windows, the best ones on more; this config is the best of those scored on all "
                      f"{max(scored.values())}.", ""]
        lines += ["| candidate | validation KL | windows scored |", "|---|---|---|"]
        order = sorted(cal["validation_kl"].items(), key=lambda kv: (-scored.get(kv[0], 0), kv[1]))
    else:
        lines += ["| candidate | validation KL |", "|---|---|"]
        order = sorted(cal["validation_kl"].items(), key=lambda kv: kv[1])
    stopped = set(cal.get("validation_stopped") or [])
    for name, kl in order:
        mark = " (this config)" if name == cal.get("winner") else ""
        windows = f" {scored[name]} |" if name in scored else (" |" if scored else "")
        lines.append(f"| {name}{mark} | {'> ' if name in stopped else ''}{kl:.5f} |{windows}")
    if stopped:
        lines += ["", "A KL marked > is a lower bound: the race stopped that candidate early, once it could no longer "
                      "stay in the race."]
    beta = cal.get("beta_median") or {}
    if beta:
        where = f"`{curves_name}`" if curves_name else "the curves file"
        lines += ["", f"Fitted distortion curves D(b) = alpha * beta^(-b): median beta {beta['key']:.2f} (keys), "
                      f"{beta['value']:.2f} (values), median fit R^2 {cal.get('fit_r2_median', float('nan')):.3f}"
                      f"; per-unit alpha and beta are in {where}."]
    return [*lines, ""]
