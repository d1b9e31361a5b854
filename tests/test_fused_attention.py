"""The fused decode-attention path: the `hf_ratequant` ops, the `"ratequant"` attention implementation, and the
cache's `attention` modes. On the CPU the ops run their PyTorch reference (and, in the tests named "triton", the
Triton kernels under Triton's interpreter); the same tests run on CUDA where a GPU is present."""

import copy
import importlib.util
import warnings

import pytest
import torch
from conftest import TINY_LLAMA, build_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_ratequant import RateQuantCache, RateQuantConfig, ops
from hf_ratequant import attention as fused_attention
from hf_ratequant.quantizers import available_quantizers

QUANTIZERS = available_quantizers()
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def model(tiny_llama, device):
    """A copy of `tiny_llama` on `device`: the fused path switches the config's attention implementation."""
    return copy.deepcopy(tiny_llama).to(device)


def mixed_config(model, quantizer="kivi", sink_length=8, residual_length=16, group_size=8):
    """Keys 2/3/16 bits and values 4/2 bits across the two layers' two kv-heads."""
    return RateQuantConfig(
        key_bits=[[2, 3], [16, 2]], value_bits=[[4, 2], [2, 2]], quantizer=quantizer, group_size=group_size,
        residual_length=residual_length, sink_length=sink_length,
    )


def prompt(length, batch=1, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, TINY_LLAMA["vocab_size"], (batch, length), generator=gen).to(device)


class Spy:
    """Counts fused and dequantizing calls of the `"ratequant"` attention implementation."""

    def __init__(self, monkeypatch):
        self.fused = self.dequantized = 0
        attend, dequantize = fused_attention.FusedPast.attend, fused_attention.FusedPast.dequantize

        def counted_attend(past, *args):
            self.fused += 1
            return attend(past, *args)

        def counted_dequantize(past):
            self.dequantized += 1
            return dequantize(past)

        monkeypatch.setattr(fused_attention.FusedPast, "attend", counted_attend)
        monkeypatch.setattr(fused_attention.FusedPast, "dequantize", counted_dequantize)


def generate(model, ids, cache, new_tokens=24, **kwargs):
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def dequantized_and_fused(model, ids, quant_config=None, **kwargs):
    """Tokens generated with the dequantize path and with the fused path, the same config for both."""
    quant_config = quant_config or mixed_config(model)
    return [generate(model, ids, RateQuantCache(config=model.config, quant_config=quant_config, attention=mode),
                     **kwargs) for mode in ("dequantize", "fused")]


def logits_in_chunks(model, ids, cache, chunk):
    out = [model(input_ids=ids[:, i : i + chunk], past_key_values=cache).logits for i in range(0, ids.shape[1], chunk)]
    return torch.cat(out, dim=1)


# ---- the same tokens as the dequantize path ---------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_fused_greedy_equals_dequantize(model, device, quantizer, monkeypatch):
    spy = Spy(monkeypatch)
    ids = prompt(40, device=device)
    want = generate(model, ids, RateQuantCache(config=model.config, quant_config=mixed_config(model, quantizer),
                                               attention="dequantize"))
    assert spy.fused == 0
    got = generate(model, ids, RateQuantCache(config=model.config, quant_config=mixed_config(model, quantizer),
                                              attention="fused"))
    assert model.config._attn_implementation == "ratequant"
    assert spy.fused > 0 and spy.dequantized == 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_fused_logits_match_dequantize_step_by_step(model, device, quantizer):
    """Every decode step's logits, through flushes, sinks and mixed heads, within float rounding."""
    ids = prompt(70, device=device)
    caches = [RateQuantCache(config=model.config, quant_config=mixed_config(model, quantizer), attention=mode)
              for mode in ("dequantize", "fused")]
    want, got = (logits_in_chunks(model, ids, cache, 1) for cache in caches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_left_padded_batch_equals_dequantize(model, device, monkeypatch):
    spy = Spy(monkeypatch)
    ids = prompt(36, batch=2, device=device)
    mask = torch.ones_like(ids)
    ids[0, :7], mask[0, :7] = 0, 0  # row 0 is left-padded by 7 tokens
    kwargs = dict(attention_mask=mask)
    want, got = dequantized_and_fused(model, ids, **kwargs)
    assert spy.fused > 0
    assert torch.equal(got, want)


def test_fused_beam_search_equals_dequantize(model, device):
    ids = prompt(30, device=device)
    kwargs = dict(num_beams=3, num_return_sequences=2)
    want, got = dequantized_and_fused(model, ids, **kwargs)
    assert torch.equal(got, want)


def test_fused_assisted_decoding_equals_dequantize(model, device, monkeypatch):
    """Prompt-lookup decoding verifies several candidate tokens at once (q_len > 1, causal among them)."""
    spy = Spy(monkeypatch)
    ids = prompt(12, device=device).repeat(1, 4)  # repetitive, so that prompt lookup finds candidates
    kwargs = dict(prompt_lookup_num_tokens=4)
    want, got = dequantized_and_fused(model, ids, **kwargs)
    assert spy.fused > 0
    assert torch.equal(got, want)


# ---- every fallback gives the same result --------------------------------------------------------------------------
def test_prefill_chunks_longer_than_the_fused_query_fall_back(model, device, monkeypatch):
    spy = Spy(monkeypatch)
    ids = prompt(100, device=device)
    chunk = ops.FUSED_MAX_QUERY + 4
    caches = [RateQuantCache(config=model.config, quant_config=mixed_config(model), attention=mode)
              for mode in ("dequantize", "fused")]
    want = logits_in_chunks(model, ids, caches[0], chunk)
    got = logits_in_chunks(model, ids, caches[1], chunk)
    assert spy.fused == 0 and spy.dequantized > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_float_mask_falls_back(model, device, monkeypatch):
    """A 4D float mask (what some callers pass) is not what the fused op reads: dequantize and sdpa, same result."""
    spy = Spy(monkeypatch)
    caches = [RateQuantCache(config=model.config, quant_config=mixed_config(model), attention=mode)
              for mode in ("dequantize", "fused")]
    ids = prompt(41, device=device)
    outs = []
    for cache in caches:
        model(input_ids=ids[:, :40], past_key_values=cache)
        mask = torch.zeros(1, 1, 1, 41, device=device)
        mask[..., 3] = torch.finfo(torch.float32).min
        outs.append(model(input_ids=ids[:, 40:], past_key_values=cache, attention_mask=mask).logits)
    assert spy.fused == 0 and spy.dequantized == model.config.num_hidden_layers
    assert torch.equal(outs[0], outs[1])


def test_unsupported_attention_arguments_fall_back():
    past = fused_attention.FusedPast((), (), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), "kivi")
    query = torch.zeros(1, 4, 1, 4)
    assert fused_attention.unfused_reason(past, query, None, 0.0, {"output_attentions": True}) == "output_attentions"
    assert fused_attention.unfused_reason(past, query, None, 0.1, {}) == "dropout"
    assert fused_attention.unfused_reason(past, query, None, 0.0, {"softcap": 30.0}) == "softcap"
    assert fused_attention.unfused_reason(past, query, None, 0.0, {}) is None


def test_sliding_window_layers_fused_equal_dequantize(device, monkeypatch):
    """A Mistral-style sliding window (masks built from absolute positions, old groups dropped)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{k: v for k, v in TINY_LLAMA.items()}, sliding_window=24)
    model = build_model(MistralForCausalLM, config, seed=3).to(device)
    spy = Spy(monkeypatch)
    ids = prompt(50, device=device)
    qc = RateQuantConfig.uniform(model.config, bits=3, group_size=8, residual_length=8)
    want, got = dequantized_and_fused(model, ids, qc)
    assert spy.fused > 0
    assert torch.equal(got, want)


def test_auto_on_the_cpu_dequantizes_and_leaves_the_model_alone(tiny_llama, monkeypatch):
    model = copy.deepcopy(tiny_llama)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spy = Spy(monkeypatch)
    cache = RateQuantCache(config=model.config, quant_config=mixed_config(model))
    generate(model, prompt(40), cache)
    assert model.config._attn_implementation == "sdpa"
    assert spy.fused == 0 and not any(layer.fused for layer in cache.layers)


def test_a_config_switched_back_to_sdpa_gets_the_dequantized_history(model, device, monkeypatch):
    """The fused tag is only returned while the model's attention is "ratequant": no silent wrong attention."""
    ids = prompt(40, device=device)
    want = generate(model, ids, RateQuantCache(config=model.config, quant_config=mixed_config(model),
                                               attention="dequantize"))
    cache = RateQuantCache(config=model.config, quant_config=mixed_config(model), attention="fused")
    model.set_attn_implementation("sdpa")
    got = generate(model, ids, cache)
    assert torch.equal(got, want)


def test_the_ratequant_implementation_equals_sdpa_for_other_caches(model, device):
    ids = prompt(30, device=device)
    want = generate(model, ids, DynamicCache(config=model.config))
    RateQuantCache(config=model.config, quant_config=mixed_config(model), attention="fused")
    assert model.config._attn_implementation == "ratequant"
    assert torch.equal(generate(model, ids, DynamicCache(config=model.config)), want)


def test_fused_needs_sdpa_or_a_config(tiny_llama):
    eager = build_model(LlamaForCausalLM, LlamaConfig(**TINY_LLAMA, attn_implementation="eager"), seed=0)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        RateQuantCache(config=eager.config, quant_config=mixed_config(eager), attention="fused")
    with pytest.raises(ValueError, match="needs the model's config"):
        RateQuantCache(quant_config=mixed_config(tiny_llama), attention="fused")
    with pytest.raises(ValueError, match="must be one of"):
        RateQuantCache(config=tiny_llama.config, quant_config=mixed_config(tiny_llama), attention="fast")


def test_deepcopy_of_a_fused_cache_follows_the_model(model, device):
    ids = prompt(40, device=device)
    cache = RateQuantCache(config=model.config, quant_config=mixed_config(model), attention="fused")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    copied = copy.deepcopy(cache)
    assert copied.layers[0].attn_config is cache.layers[0].attn_config


# ---- the ops themselves -----------------------------------------------------------------------------------------
def _filled_layer(device, quantizer="kivi", dtype=torch.float32):
    model = build_model(LlamaForCausalLM, LlamaConfig(**TINY_LLAMA), seed=0, dtype=dtype).to(device)
    cache = RateQuantCache(config=model.config, quant_config=mixed_config(model, quantizer), attention="dequantize")
    with torch.no_grad():
        model(input_ids=prompt(45, device=device), past_key_values=cache)
    return cache.layers[0]


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_ops_pass_opcheck(device, quantizer):
    """Schemas, fake (meta) implementations and dispatch agree (`torch.library.opcheck`)."""
    layer = _filled_layer(device, quantizer)
    args = layer._op_args()
    torch.library.opcheck(torch.ops.hf_ratequant.dequantize_layer.default,
                          (*args, layer.keys, layer.values, quantizer))
    query = torch.randn(1, 4, 1, 32, device=device)
    mask = torch.ones(1, 1, 1, layer.get_seq_length(), dtype=torch.bool, device=device)
    for m in (None, mask):
        torch.library.opcheck(torch.ops.hf_ratequant.decode_attention.default,
                              (query, m, *args, layer.keys, layer.values, quantizer, 32**-0.5))


def test_dequantize_layer_op_is_what_iter_yields(device):
    layer = _filled_layer(device)
    keys, values = layer._history()
    assert keys.shape == (1, 2, 45, 32)
    assert torch.equal(keys[:, :, -layer.keys.shape[2]:], layer.keys)
    assert torch.equal(values[:, :, :8], layer.past_values.sink)


def test_torch_compile_traces_a_fused_decode_step(model, device):
    """The fake implementations let `torch.compile` trace a decode step that runs the fused op (AOT autograd traces
    the op with fake tensors; the op is in the captured graph, not left behind a graph break)."""
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def record(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    ids = prompt(41, device=device)
    caches = [RateQuantCache(config=model.config, quant_config=mixed_config(model), attention="fused")
              for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(input_ids=ids[:, :40], past_key_values=cache)
        want = model(input_ids=ids[:, 40:], past_key_values=caches[0]).logits
        torch._dynamo.reset()
        step = torch.compile(lambda x, c: model(input_ids=x, past_key_values=c).logits,
                             backend=aot_autograd(fw_compiler=record))
        got = step(ids[:, 40:], caches[1])
    torch._dynamo.reset()
    assert any("hf_ratequant.decode_attention" in target for target in seen), sorted(set(seen))[:20]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- failures are loud -----------------------------------------------------------------------------------------
def test_a_failing_triton_kernel_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setenv("HF_RATEQUANT_STRICT_KERNELS", "0")
    monkeypatch.setattr(ops, "_broken", {})

    def broken():
        raise RuntimeError("compile error: no such instruction")

    with pytest.warns(RuntimeWarning, match="compile error: no such instruction"):
        assert ops._run_triton("decode_attention", broken, lambda: "reference") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops._run_triton("decode_attention", broken, lambda: "reference") == "reference"  # no second warning


def test_out_of_memory_in_a_triton_kernel_is_raised_not_a_fallback(monkeypatch):
    monkeypatch.setenv("HF_RATEQUANT_STRICT_KERNELS", "0")
    monkeypatch.setattr(ops, "_broken", {})

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        ops._run_triton("decode_attention", oom, lambda: "reference")
    assert ops._broken == {}


def test_a_failing_triton_kernel_raises_under_strict(monkeypatch):
    monkeypatch.setenv("HF_RATEQUANT_STRICT_KERNELS", "1")
    monkeypatch.setattr(ops, "_broken", {})
    with pytest.raises(RuntimeError, match="boom"):
        ops._run_triton("dequantize_layer", lambda: (_ for _ in ()).throw(RuntimeError("boom")), lambda: None)


def test_no_triton_is_a_named_reason(monkeypatch):
    import sys

    ops.triton_unavailable_reason.cache_clear()
    monkeypatch.setitem(sys.modules, "triton", None)
    try:
        assert "pip install 'hf-ratequant[gpu]'" in ops.triton_unavailable_reason()
    finally:
        ops.triton_unavailable_reason.cache_clear()
    assert "CUDA" in ops.fused_unavailable_reason(torch.device("cpu"), torch.float32, 64)


# ---- the Triton kernels end to end, under the interpreter on the CPU --------------------------------------------
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_triton_backend_generates_the_reference_tokens(model, device, quantizer, monkeypatch):
    spy = Spy(monkeypatch)
    if device == "cpu":
        monkeypatch.setattr(ops, "_CPU_BACKEND", {"name": "triton"})
    ids = prompt(40, device=device)
    want = generate(model, ids, RateQuantCache(config=model.config, quant_config=mixed_config(model, quantizer),
                                               attention="dequantize"), new_tokens=12)
    got = generate(model, ids, RateQuantCache(config=model.config, quant_config=mixed_config(model, quantizer),
                                              attention="fused"), new_tokens=12)
    assert spy.fused > 0
    assert torch.equal(got, want)


def test_auto_on_a_gpu_without_the_kernel_warns_once_and_dequantizes(tiny_llama, monkeypatch):
    """On CUDA, "auto" takes the fused path where the kernel can run; where it cannot (no Triton, an old GPU, an
    unsupported head_dim or dtype) one warning names the reason and the layer dequantizes."""
    from types import SimpleNamespace

    from hf_ratequant import cache as cache_module

    monkeypatch.setattr(cache_module, "_WARNED", set())
    layer = RateQuantCache(quant_config=mixed_config(tiny_llama)).layers[0]
    states = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16, shape=(1, 2, 5, 32))
    monkeypatch.setattr(ops, "fused_unavailable_reason", lambda *a: "Triton is not installed (pip install x)")
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        assert layer._use_fused(states) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer._use_fused(states) is False  # once per reason
    monkeypatch.setattr(ops, "fused_unavailable_reason", lambda *a: None)
    assert layer._use_fused(states) is True
