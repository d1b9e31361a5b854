"""The one place for defaults (`hf_ratequant.settings`): checked when built, and the same at every entry point."""

import dataclasses
import time

import pytest
from transformers import LlamaConfig

from hf_ratequant import RateQuantConfig
from hf_ratequant.settings import (
    CacheLayout,
    CalibrationSettings,
    EvaluationSettings,
    default_sink_length,
    layout_with,
    split_settings,
)


def _llama():
    return LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=128)


def test_defaults_are_kivi_with_32_sinks_and_frozen():
    layout = CacheLayout()
    assert (layout.quantizer, layout.group_size, layout.residual_length, layout.sink_length) == ("kivi", 32, 128, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.sink_length = 0
    assert CalibrationSettings().bit_grid == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("group_size, sinks", [(8, 32), (32, 32), (48, 48), (64, 64), (128, 128)])
def test_default_sinks_are_whole_groups_of_at_least_32_tokens(group_size, sinks):
    assert default_sink_length(group_size) == sinks
    assert layout_with(group_size=group_size, residual_length=0).sink_length == sinks


def test_explicit_sinks_are_kept_when_the_group_size_changes():
    assert layout_with(CacheLayout(sink_length=0), group_size=64).sink_length == 0
    assert layout_with(CacheLayout(sink_length=64), group_size=64).sink_length == 64


@pytest.mark.parametrize("fields, match", [
    (dict(quantizer="nope"), "Unknown quantizer 'nope'"),
    (dict(group_size=0), "group_size=0 must be an integer in 1"),
    (dict(residual_length=100), "residual_length=100 must be a multiple of group_size=32"),
    (dict(sink_length=16), "sink_length=16 must be a multiple of group_size=32"),
    (dict(sink_length=True), "sink_length=True"),
])
def test_bad_layouts_name_the_value_and_the_fix(fields, match):
    with pytest.raises(ValueError, match=match):
        CacheLayout(**fields)


@pytest.mark.parametrize("fields, match", [
    (dict(budget=9.5), r"budget=9.5 is outside \[b_min, b_max\] = \[1, 6\]"),
    (dict(budget=0.5), r"budget=0.5 is outside"),
    (dict(budget=float("nan")), "budget=nan"),
    (dict(budget="2.5"), "budget='2.5'"),
    (dict(b_min=4, b_max=4, budget=4), "b_min=4 and b_max=4"),
    (dict(b_max=16), "b_max=16"),
    (dict(n_samples=0), "n_samples=0"),
    (dict(measure="fisher"), "Unknown measure 'fisher'"),
    (dict(residual_aware="yes"), "residual_aware='yes'"),
])
def test_bad_calibration_settings_fail_at_once(fields, match):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        CalibrationSettings(**fields)
    assert time.perf_counter() - start < 0.1


def test_a_window_must_reach_past_sinks_residual_and_one_group():
    with pytest.raises(ValueError, match="seq_len=192 is too short.*seq_len > 192"):
        split_settings({"seq_len": 192})  # 32 sinks + 128 recent + 32 for one group
    layout, settings = split_settings({"seq_len": 193})
    assert settings.seq_len == 193 and layout == CacheLayout()
    split_settings({"seq_len": 64, "residual_aware": False})  # the plain measure reads every token


def test_split_settings_routes_names_keeps_defaults_for_none_and_refuses_unknown_ones():
    layout, settings = split_settings({"quantizer": "token", "budget": 3.0, "sink_length": None, "b_min": None})
    assert layout == CacheLayout(quantizer="token") and settings == CalibrationSettings(budget=3.0)
    with pytest.raises(TypeError, match=r"Unknown calibration setting\(s\) \['n_sample'\].*n_samples"):
        split_settings({"n_sample": 4})


def test_uniform_configs_get_the_calibration_layout():
    """A fixed cache and a calibrated one get the same sinks and window unless told otherwise."""
    config = RateQuantConfig.uniform(_llama(), key_bits=3, value_bits=2)
    assert config.layout == CacheLayout()
    assert RateQuantConfig.uniform(_llama(), bits=4, sink_length=0).sink_length == 0
    assert RateQuantConfig.uniform(_llama(), bits=4, layout=CacheLayout(quantizer="token")).quantizer == "token"


def test_evaluation_settings_are_checked():
    assert EvaluationSettings().window * EvaluationSettings().n_windows == 8192
    with pytest.raises(ValueError, match="window=1"):
        EvaluationSettings(window=1)


def test_every_python_entry_point_defaults_to_the_settings():
    """A setting's default in a public function is None (resolved from the settings) or the settings' own value."""
    import inspect

    from hf_ratequant import analysis, calibrate, evaluate_kl, evaluate_perplexity, evaluation
    from hf_ratequant.settings import CacheLayout, CalibrationSettings, EvaluationSettings

    layout, calibration, ev = CacheLayout(), CalibrationSettings(), EvaluationSettings()
    expected = {"quantizer": layout.quantizer, "group_size": layout.group_size, "residual_length":
                layout.residual_length, "sink_length": layout.sink_length, "budget": calibration.budget,
                "n_samples": calibration.n_samples, "n_validation": calibration.n_validation,
                "seq_len": calibration.seq_len, "b_min": calibration.b_min, "b_max": calibration.b_max,
                "window": ev.window, "max_windows": ev.n_windows, "chunk": ev.chunk, "batch_size": ev.batch_size}
    entry_points = [calibrate, RateQuantConfig.uniform, evaluate_kl, evaluate_perplexity, evaluation.evaluate_quality,
                    evaluation.evaluation_windows, evaluation.reference_logprobs, evaluation.shared_prefix,
                    analysis.fit_quantizer_curves, analysis.mismatch_study]
    checked = 0
    for fn in entry_points:
        for name, parameter in inspect.signature(fn).parameters.items():
            if name in expected and parameter.default is not inspect.Parameter.empty:
                assert parameter.default in (None, expected[name]), f"{fn.__qualname__}({name}={parameter.default!r})"
                checked += 1
    assert checked >= 15
