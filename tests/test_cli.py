"""The `--cache` grammar (`hf_ratequant.cache_spec`) and the command line: arguments checked before any work, help
text with defaults, what the subcommands print."""

import pytest
import torch
from transformers import LlamaConfig

from hf_ratequant import RateQuantConfig
from hf_ratequant.cache_spec import CacheSpec, parse_cache_spec
from hf_ratequant.settings import CacheLayout


@pytest.fixture
def llama_config():
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, architectures=["LlamaForCausalLM"],
    )


# ---- the cache-spec grammar ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("none", CacheSpec("none", "none")),
    (" FP16 ", CacheSpec("FP16", "none")),
    ("uniform:3", CacheSpec("uniform:3", "uniform", 3, 3)),
    ("kv:3,2", CacheSpec("kv:3,2", "kv", 3, 2)),
    ("kv: 4 , 16", CacheSpec("kv: 4 , 16", "kv", 4, 16)),
    ("user/config", CacheSpec("user/config", "saved", source="user/config")),
])
def test_parse_cache_spec(text, expected):
    assert parse_cache_spec(text) == expected


@pytest.mark.parametrize("bad, error, words", [
    ("bogus", ValueError, "accepted are"),
    ("kv:3", ValueError, "kv:KBITS,VBITS"),
    ("kv:3,2,1", ValueError, "kv:KBITS,VBITS"),
    ("uniform:x", ValueError, "not an integer"),
    ("uniform:9", ValueError, "not a valid bit-width"),
    ("./no/such/folder", FileNotFoundError, "no such folder"),
    (3, TypeError, "string"),
])
def test_malformed_specs_fail_at_parse(bad, error, words):
    with pytest.raises(error, match=words):
        parse_cache_spec(bad)


def test_build_fixed_specs_take_the_default_layout(llama_config):
    assert parse_cache_spec("none").build(llama_config) is None
    uniform = parse_cache_spec("uniform:3").build(llama_config)
    assert uniform.average_bits == 3 and uniform.layout == CacheLayout()
    assert uniform.sink_length == 32  # the same sinks a calibrated config keeps
    split = parse_cache_spec("kv:3,2").build(llama_config, CacheLayout(sink_length=0, quantizer="token"))
    assert split.key_bits[0] == [3, 3] and split.value_bits[0] == [2, 2]
    assert split.sink_length == 0 and split.quantizer == "token"


def test_saved_config_keeps_its_layout_and_refuses_a_contradiction(llama_config, tmp_path):
    RateQuantConfig.uniform(llama_config, bits=4, sink_length=0).save_pretrained(tmp_path)
    spec = parse_cache_spec(str(tmp_path))
    assert spec.kind == "saved"
    assert spec.build(llama_config).sink_length == 0
    # a layout that was not set on purpose does not apply to a saved config
    assert spec.build(llama_config, CacheLayout(), explicit=()).sink_length == 0
    assert spec.build(llama_config, CacheLayout(group_size=64), explicit={"quantizer"}).group_size == 32
    with pytest.raises(ValueError, match=r"sink_length=32 \(--sink-length\) does not apply to the saved config.*"
                                         r"keeps sink_length=0"):
        spec.build(llama_config, CacheLayout(), explicit={"sink_length"})
    with pytest.raises(ValueError, match="sink_length=32"):
        spec.build(llama_config, CacheLayout())  # a layout passed in Python is checked whole


def test_bad_layout_for_a_shorthand_is_refused(llama_config):
    with pytest.raises(ValueError, match="multiple of group_size"):
        parse_cache_spec("kv:3,2").build(llama_config, CacheLayout(sink_length=12))


# ---- what the numbers mean: true bits and bytes by part -------------------------------------------------------------
def test_true_bits_count_scales_and_zero_points(llama_config):
    from hf_ratequant.footprint import true_bits_per_element

    two = RateQuantConfig.uniform(llama_config, bits=2)
    assert true_bits_per_element(two, head_dim=32) == 2 + 2 * 16 / 32  # a 16-bit scale and zero-point per 32
    assert true_bits_per_element(two, head_dim=32, dtype=torch.float32) == 2 + 2 * 32 / 32
    kept = RateQuantConfig.uniform(llama_config, key_bits=16, value_bits=2)
    assert true_bits_per_element(kept, head_dim=32) == (16 + 3) / 2


@pytest.mark.parametrize("quantizer, group_size, head_dim", [("kivi", 32, 64), ("kivi", 64, 64), ("kivi", 16, 32),
                                                             ("token", 32, 64), ("rotated", 32, 256)])
def test_a_true_bits_budget_is_the_code_budget_its_configs_store(quantizer, group_size, head_dim):
    """Every fixed config of the code budget `code_budget` returns stores exactly the true bits asked for."""
    from transformers import LlamaConfig

    from hf_ratequant.footprint import code_budget, true_bits_per_element

    model_config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=2,
                               hidden_size=2 * head_dim, head_dim=head_dim)
    for code_bits in range(1, 7):
        for k, v in ((code_bits, code_bits), (min(code_bits + 1, 6), max(code_bits - 1, 1))):
            config = RateQuantConfig.uniform(model_config, key_bits=k, value_bits=v, quantizer=quantizer,
                                             group_size=group_size)
            true_bits = true_bits_per_element(config, head_dim)
            assert code_budget(true_bits, quantizer, group_size, head_dim, 1, 6) == config.average_bits
    with pytest.raises(ValueError, match=r"budget of 1 true bits per element is outside \[\d[.\d]*, \d"):
        code_budget(1.0, quantizer, group_size, head_dim, 1, 6)
    with pytest.raises(ValueError, match="must be a number of bits per stored element"):
        code_budget(float("nan"), quantizer, group_size, head_dim, 1, 6)


def test_cli_budget_unit():
    from hf_ratequant.cli import _calibration_overrides, build_parser

    parser = build_parser()
    args = parser.parse_args(["calibrate", "-o", "x", "--budget", "6.5", "--budget-unit", "true"])
    assert _calibration_overrides(args)["budget_unit"] == "true"  # 6.5 true bits: checked against the model later
    with pytest.raises(ValueError, match=r"budget=6.5 is outside \[b_min, b_max\]"):
        _calibration_overrides(parser.parse_args(["calibrate", "-o", "x", "--budget", "6.5"]))
    assert parser.parse_args(["calibrate", "-o", "x"]).budget_unit == "code"
    grouped = _calibration_overrides(parser.parse_args(["calibrate", "-o", "x", "--budget-unit", "true",
                                                        "--groups", "128", "64"]))
    assert grouped["groups"] == (128, 64)
    with pytest.raises(ValueError, match="--groups 64 lets every unit choose.*--budget-unit true"):
        _calibration_overrides(parser.parse_args(["calibrate", "-o", "x", "--groups", "64"]))
    with pytest.raises(ValueError, match="groups entry=0 must be an integer"):
        _calibration_overrides(parser.parse_args(["calibrate", "-o", "x", "--budget-unit", "true", "--groups", "0"]))
    assert "budget_context" not in _calibration_overrides(parser.parse_args(["calibrate", "-o", "x"]))  # 4096
    with pytest.raises(ValueError, match="--budget-context 32768 says at which context.*--budget-unit true"):
        _calibration_overrides(parser.parse_args(["calibrate", "-o", "x", "--budget-context", "32768"]))
    served = _calibration_overrides(parser.parse_args(["calibrate", "-o", "x", "--budget-unit", "true",
                                                       "--budget-context", "32768"]))
    assert served["budget_context"] == 32768
    with pytest.raises(ValueError, match="budget_context=-1 must be an integer"):
        _calibration_overrides(parser.parse_args(["calibrate", "-o", "x", "--budget-unit", "true",
                                                  "--budget-context", "-1"]))


@pytest.mark.parametrize("scale_bits", [16, 8])
@pytest.mark.parametrize("quantizer", ["kivi", "token", "rotated"])
@pytest.mark.parametrize("tokens, chunk", [(40, 40), (200, 7), (333, 64), (600, 600)])
def test_cache_bytes_equal_a_real_cache(llama_config, quantizer, tokens, chunk, scale_bits):
    from hf_ratequant import RateQuantCache
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import cache_bytes

    config = RateQuantConfig.from_bits(
        torch.tensor([[[3, 16], [1, 5]], [[2, 2], [8, 4]], [[4, 1], [16, 16]]]),
        CacheLayout(quantizer=quantizer, residual_length=64, scale_bits=scale_bits),
    )
    cache = RateQuantCache(config=llama_config, quant_config=config)
    states = torch.randn(2, 2, tokens, 32, generator=torch.Generator().manual_seed(0))
    for start in range(0, tokens, chunk):
        for layer in range(3):
            cache.update(states[:, :, start:start + chunk], states[:, :, start:start + chunk], layer)
    footprint = cache_bytes(config, ModelFingerprint.from_model_config(llama_config), tokens, batch=2,
                            dtype=torch.float32)
    assert footprint.total == cache.nbytes and footprint.bytes_16bit == cache.nbytes_16bit()
    assert footprint.sinks == (32 * 3 * 2 * 2 * 32 * 2 * 4 if tokens >= 64 + 64 else 0)


@pytest.mark.parametrize("tokens", [10, 99, 100, 101, 130, 140, 200, 333])
def test_cache_bytes_of_sliding_window_layers_equal_a_real_cache(tokens):
    """A sliding layer drops whole groups from the front of its quantized past, sinks first, once it holds more
    than its attention window: 2 sliding layers (window 100) and one full layer, filled by one prefill."""
    from transformers import Gemma3TextConfig

    from hf_ratequant import RateQuantCache
    from hf_ratequant.config import ModelFingerprint
    from hf_ratequant.footprint import cache_bytes

    model_config = Gemma3TextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, sliding_window=100,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    config = RateQuantConfig.from_bits(torch.tensor([[[3, 2], [1, 4]], [[2, 2], [8, 4]], [[4, 1], [16, 3]]]),
                                       CacheLayout(residual_length=16, group_size=8, sink_length=8))
    cache = RateQuantCache(config=model_config, quant_config=config)
    states = torch.randn(1, 2, tokens, 32, generator=torch.Generator().manual_seed(1))
    for layer in range(3):
        cache.update(states, states, layer)
    footprint = cache_bytes(config, ModelFingerprint.from_model_config(model_config), tokens, dtype=torch.float32)
    assert footprint.total == cache.nbytes and footprint.bytes_16bit == cache.nbytes_16bit()
    # sinks leave a sliding layer with the first whole group it drops (8 tokens past its 99)
    assert footprint.sinks == (8 * 2 * 2 * 32 * 4 * (3 if tokens < 99 + 8 else 1) if tokens >= 16 + 8 + 8 else 0)


# ---- the command line: every argument checked before any model loads ----------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """A model loader that fails the test if a subcommand reaches it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("hf_ratequant.models.load_model", refuse)


@pytest.mark.parametrize("argv, words", [
    (["calibrate", "--budget", "9", "-o", "OUT"], r"budget=9 is outside \[b_min, b_max\] = \[1, 6\]"),
    (["calibrate", "--seq-len", "100", "-o", "OUT"], "seq_len=100 is too short"),
    (["calibrate", "--sink-length", "12", "-o", "OUT"], "sink_length=12 must be a multiple of group_size=32"),
    (["calibrate", "--data", "./missing.txt", "-o", "OUT"], "--data ./missing.txt: No such local text file"),
    (["calibrate", "--device", "cuda:7", "-o", "OUT"], "cuda:7"),
    (["calibrate", "--model", "./no/such/model", "-o", "OUT"], "no such folder"),
    (["eval", "--cache", "kv:3"], "kv:KBITS,VBITS"),
    (["eval", "--cache", "none", "./no/such/config"], "no such folder"),
    (["eval", "--windows", "-1"], "n_windows=-1"),
    (["eval", "--cache", "SAVED", "--sink-length", "0"], r"sink_length=0 \(--sink-length\) does not apply"),
    (["demo", "--config", "SAVED", "--residual-length", "64"], r"residual_length=64 \(--residual-length\)"),
    (["demo", "--config", "SAVED", "--bits", "4"], "exclude each other"),
    (["analyze", "--budget", "0.5"], "budget=0.5"),
    (["lm-eval", "--tasks", "x", "--cache", "uniform:9"], "not a valid bit-width"),
])
def test_bad_arguments_fail_before_the_model_loads(no_model, capsys, tmp_path, llama_config, argv, words):
    import time

    from hf_ratequant.cli import main

    if torch.cuda.device_count() > 7 and "cuda:7" in argv:
        pytest.skip("this machine has a cuda:7")
    saved = tmp_path / "saved"
    RateQuantConfig.uniform(llama_config, bits=4).save_pretrained(saved)
    argv = [str(saved) if a == "SAVED" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    # Seconds, not the minutes a model takes (`no_model` refuses to load one): 3 s leaves room for the lm-eval
    # import on a loaded 2-core machine (it took 1.004 s once beside a benchmark).
    assert time.perf_counter() - start < 3.0
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"hf-ratequant {argv[0]}: error:" in err
    import re

    assert re.search(words, err), err


def test_help_shows_every_default_and_the_version(capsys):
    from hf_ratequant import __version__
    from hf_ratequant.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert __version__ in capsys.readouterr().out
    for command in ("demo", "calibrate", "eval", "lm-eval", "analyze"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--dtype {auto,float32,bfloat16,float16}" in text and "--device-map" in text
        assert "(default: 32, the least multiple of G >= 32)" in text  # the sinks every cache gets by default
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 2.5)", "(default: 16)", "(default: 8)", "(default: 512)", "(default: output)",
                    "(default: kivi)", "(default: 128)"):
        assert default in text, default


def test_cli_defaults_are_the_settings_defaults():
    from hf_ratequant.cli import build_parser
    from hf_ratequant.settings import CalibrationSettings, EvaluationSettings

    parser = build_parser()
    calibration, evaluation = CalibrationSettings(), EvaluationSettings()
    cal = parser.parse_args(["calibrate", "-o", "x"])
    assert (cal.budget, cal.samples, cal.validation, cal.seq_len, cal.b_min, cal.b_max, cal.measure) == (
        calibration.budget, calibration.n_samples, calibration.n_validation, calibration.seq_len, calibration.b_min,
        calibration.b_max, calibration.measure)
    ev = parser.parse_args(["eval"])
    assert (ev.window, ev.windows, ev.chunk) == (evaluation.window, evaluation.n_windows, evaluation.chunk)
    for argv in (["calibrate", "-o", "x"], ["eval"], ["demo"], ["analyze"], ["lm-eval", "--tasks", "t"]):
        args = parser.parse_args(argv)
        assert args.sink_length is None and args.group_size is None  # unset: CacheLayout's defaults
        assert (args.device, args.dtype, args.device_map) == ("auto", "auto", None)


def test_candidate_legend():
    from hf_ratequant.cli import candidate_legend

    assert candidate_legend("ratequant-from-K3V2-40") == (
        "40 steps of descent from the K3V2 split towards the measured optimum")
    assert candidate_legend("K3V2") == "fixed split: every key at 3 bits, every value at 2"
    assert "fitted curves" in candidate_legend("ratequant")
    assert "x4" in candidate_legend("ratequant-keys-x4")


def test_load_model_dtype_and_device(monkeypatch):
    from hf_ratequant.models import resolve_device, resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="not one of auto, float32"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")


@pytest.mark.parametrize("validated", [True, False])
def test_calibration_report_says_what_was_chosen(llama_config, capsys, validated):
    from types import SimpleNamespace

    from hf_ratequant.cli import _print_calibration

    config = RateQuantConfig.uniform(llama_config, key_bits=3, value_bits=2)
    scores = {"K3V2": 0.004, "ratequant-from-K3V2-40": 0.002, "K1V4": 0.9} if validated else {}
    config.calibration = {"validation_kl": scores, "winner": "ratequant-from-K3V2-40" if validated else "ratequant",
                          "beta_median": {"key": 3.1, "value": 3.9}, "fit_r2_median": 0.99,
                          "seconds": {"total": 12.0}, "validation_stopped": ["K1V4"] if validated else []}
    _print_calibration(config, SimpleNamespace(config=llama_config, dtype=torch.float32))
    out = capsys.readouterr().out
    if validated:
        assert "40 steps of descent from the K3V2 split towards the measured optimum  <- chosen" in out
        assert f"{'K1V4':<26}     > 0.90000  fixed split" in out and f"{'K3V2':<26}       0.00400" in out
        assert "> x: a lower bound" in out
    else:
        assert "no validation (--validation 0): chose ratequant, closed form" in out
    assert "mean bits per layer (keys / values): 0:3.0/2.0  1:3.0/2.0  2:3.0/2.0" in out
    # 16-bit scales and zero-points per 32 (the unit of a true-bits budget), and this float32 model's
    assert ("average code bits 2.5; true bits per element 3.5 (with 16-bit scales and zero-points; 4.5 with this "
            "float32 model's)") in out
    assert "4096" in out and "vs 16-bit" in out
