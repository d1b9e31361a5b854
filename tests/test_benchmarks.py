"""The benchmark scripts: every one's `--help` runs, their defaults are the library's settings (hf_ratequant.settings),
the fixed caches they build have a calibrated config's sinks, and the one results writer writes both files atomically.

Fast (well under 30 s on 2 cores): no model is loaded. Starting Python and importing `hf_ratequant` costs about 10 s
of CPU a process, so on Linux each `--help` runs in a child forked from this process, which has imported it already:
the child runs the script exactly as `python benchmarks/x.py --help` would (as `__main__`, with `benchmarks/` first on
`sys.path` and none of the benchmark modules imported) and its exit status is checked. Elsewhere each is a plain
`python benchmarks/x.py --help` subprocess.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from hf_ratequant.settings import CacheLayout, CalibrationSettings, EvaluationSettings

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
LAYOUT, CALIBRATION, EVALUATION = CacheLayout(), CalibrationSettings(), EvaluationSettings()

# Every option of the shared settings, by argparse dest, and the library default it must have, whichever script.
SHARED = {
    "quantizer": LAYOUT.quantizer,
    "group_size": LAYOUT.group_size,
    "residual_length": LAYOUT.residual_length,
    "sink_length": LAYOUT.sink_length,
    "b_min": CALIBRATION.b_min,
    "b_max": CALIBRATION.b_max,
    "budget": CALIBRATION.budget,
    "seq_len": CALIBRATION.seq_len,
    "measure": CALIBRATION.measure,
    "window": EVALUATION.window,
    "windows": EVALUATION.n_windows,
    "chunk": EVALUATION.chunk,
}
SHARED_FLAGS = ("--quantizer", "--group-size", "--residual-length", "--sink-length", "--b-min", "--b-max",
                "--window", "--chunk")
# What each script must have (a renamed option would otherwise drop out of the check unnoticed), and the options
# that default to a calibration setting in that script only (elsewhere `--samples 8` is a deliberately smaller run).
EXPECTED = {
    "allocation_path": dict(quantizer=LAYOUT.quantizer, budget=CALIBRATION.budget),
    "allocation_neighbourhood": dict(seq_len=CALIBRATION.seq_len, samples=CALIBRATION.n_samples),
    "byte_frontier": dict(b_min=CALIBRATION.b_min, b_max=CALIBRATION.b_max, window=EVALUATION.window,
                          windows=EVALUATION.n_windows, chunk=EVALUATION.chunk),
    "calibration_scaling": dict(quantizer=LAYOUT.quantizer, budget=CALIBRATION.budget),
    "calibration_speed": dict(quantizer=LAYOUT.quantizer, budget=CALIBRATION.budget, seq_len=CALIBRATION.seq_len,
                              sink_length=LAYOUT.sink_length, samples=CALIBRATION.n_samples,
                              validation=CALIBRATION.n_validation, batch_size=CALIBRATION.batch_size,
                              scale_bits=LAYOUT.scale_bits),
    "decode_speed": dict(quantizer=LAYOUT.quantizer, group_size=LAYOUT.group_size,
                         residual_length=LAYOUT.residual_length, sink_length=LAYOUT.sink_length),
    "dequantize_kernel": dict(quantizer=LAYOUT.quantizer, group_size=LAYOUT.group_size),
    "field_comparison": dict(group_size=LAYOUT.group_size, residual_length=LAYOUT.residual_length,
                             sink_length=LAYOUT.sink_length, b_min=CALIBRATION.b_min, b_max=CALIBRATION.b_max,
                             seq_len=CALIBRATION.seq_len, window=EVALUATION.window, windows=EVALUATION.n_windows,
                             chunk=EVALUATION.chunk),
    "group_options": dict(seq_len=CALIBRATION.seq_len, samples=CALIBRATION.n_samples),
    "gpu_speed": dict(quantizer=LAYOUT.quantizer, group_size=LAYOUT.group_size,
                      residual_length=LAYOUT.residual_length),
    "lm_eval_table": dict(chunk=EVALUATION.chunk),
    "table_transfer": dict(quantizer=LAYOUT.quantizer, budget=CALIBRATION.budget),
    "verified_moves": dict(quantizer=LAYOUT.quantizer, budget=CALIBRATION.budget),
    "long_context": dict(quantizer=LAYOUT.quantizer, group_size=LAYOUT.group_size,
                         residual_length=LAYOUT.residual_length, sink_length=LAYOUT.sink_length),
    "memory": dict(group_size=LAYOUT.group_size, residual_length=LAYOUT.residual_length,
                   sink_length=LAYOUT.sink_length),
    "ratequant_quality": dict(group_size=LAYOUT.group_size, residual_length=LAYOUT.residual_length,
                              sink_length=LAYOUT.sink_length, b_min=CALIBRATION.b_min, b_max=CALIBRATION.b_max,
                              seq_len=CALIBRATION.seq_len, measure=CALIBRATION.measure, window=EVALUATION.window,
                              windows=EVALUATION.n_windows, chunk=EVALUATION.chunk, samples=CALIBRATION.n_samples,
                              validation=CALIBRATION.n_validation, batch_size=CALIBRATION.batch_size),
}
REQUIRED_ARGS = {"allocation_neighbourhood": ["--config", "unused"], "allocation_path": ["--run", "m", "a"],
                 "table_transfer": ["--run", "m", "a", "b"], "verified_moves": ["--run", "m", "a"]}

def _forked_help(name: str, output: Path, timeout: float = 60.0) -> int:
    """Run `benchmarks/<name> --help` in a child forked from this process (which has imported `hf_ratequant` and
    torch already) exactly as `python benchmarks/<name> --help` runs it; its output goes to `output`. The exit
    status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            with open(output, "w", encoding="utf-8") as f:
                os.dup2(f.fileno(), 1)
                os.dup2(f.fileno(), 2)
                sys.stdout = sys.stderr = f
                for module in [p[:-3] for p in SCRIPTS] + ["_common"]:
                    sys.modules.pop(module, None)  # each script imports what it needs itself
                path = str(BENCHMARKS / name)
                sys.argv = [path, "--help"]
                sys.path.insert(0, str(BENCHMARKS))
                try:
                    runpy.run_path(path, run_name="__main__")
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    traceback.print_exc()
                f.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """`{script: (exit status, output)}` of `python benchmarks/<script> --help` for every script."""
    out = tmp_path_factory.mktemp("help")
    if sys.platform.startswith("linux"):
        codes = {name: _forked_help(name, out / f"{name}.txt") for name in SCRIPTS}
        return {name: (codes[name], (out / f"{name}.txt").read_text(encoding="utf-8")) for name in SCRIPTS}
    runs = {}
    for name in SCRIPTS:
        proc = subprocess.run([sys.executable, str(BENCHMARKS / name), "--help"], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        runs[name] = (proc.returncode, proc.stdout + proc.stderr)
    return runs


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(help_runs, script):
    code, output = help_runs[script]
    assert code == 0, output
    assert "usage:" in output, output


@pytest.fixture(scope="module")
def bench_modules():
    """Import benchmark scripts as modules, as they import one another (`benchmarks/` on `sys.path`)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _defaults(module, name: str):
    if hasattr(module, "parse_args"):
        return module.parse_args(REQUIRED_ARGS.get(name, []))
    return module.build_parser().parse_args(REQUIRED_ARGS.get(name, []))


def test_every_script_with_shared_options_is_checked():
    """A script that takes a layout, calibration or evaluation option has its defaults checked below."""
    for name in SCRIPTS:
        source = (BENCHMARKS / name).read_text()
        if any(f'"{flag}"' in source for flag in SHARED_FLAGS):
            assert name[:-3] in EXPECTED, f"{name} takes shared settings: add it to EXPECTED"
            assert "def parse_args(" in source or "def build_parser(" in source, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_defaults_are_the_library_settings(bench_modules, name):
    args = _defaults(bench_modules(name), name)
    wanted = {**{k: v for k, v in SHARED.items() if hasattr(args, k)}, **EXPECTED[name]}
    got = {k: getattr(args, k, "<missing>") for k in wanted}
    assert got == wanted


@pytest.mark.parametrize("name", ["decode_speed", "long_context", "memory", "field_comparison", "ratequant_quality"])
def test_sinks_follow_the_group_size_and_bad_layouts_fail_early(bench_modules, name, capsys):
    module = bench_modules(name)
    extra = REQUIRED_ARGS.get(name, [])
    assert module.parse_args([*extra, "--group-size", "64"]).sink_length == 64  # least multiple of G >= 32
    assert module.parse_args([*extra, "--sink-length", "0"]).sink_length == 0
    with pytest.raises(SystemExit) as e:
        module.parse_args([*extra, "--sink-length", "16"])  # not a multiple of G = 32
    assert e.value.code == 2
    assert "sink_length=16 must be a multiple of group_size=32" in capsys.readouterr().err


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)


@pytest.mark.parametrize("name", ["decode_speed", "long_context"])
def test_fixed_caches_have_the_calibrated_sinks(bench_modules, name):
    """The uniform caches and the per-head mix get CacheLayout's layout (32 sinks), as a calibrated config."""
    module = bench_modules(name)
    argv = ["--backends"] if name == "decode_speed" else ["--per-head-mix", "--configs"]
    specs = module.cache_specs(_tiny_config(), module.parse_args(argv))
    caches = [s.make() for s in specs if s.family == "ratequant"]
    assert any("per-head" in s.name for s in specs) and len(caches) >= 2  # uniform ones and the mix
    for cache in caches:
        assert cache.quant_config.layout == LAYOUT


def test_decode_speed_times_both_scale_precisions_in_one_run(bench_modules):
    module = bench_modules("decode_speed")
    specs = module.cache_specs(_tiny_config(), module.parse_args(["--backends", "--scale-bits", "16", "8"]))
    precisions = {s.name: s.make().quant_config.scale_bits for s in specs if s.family == "ratequant"}
    assert sorted(precisions.values()) == [8] * 3 + [16] * 3  # uniform 4 and 2 bits and the mix, per precision
    assert all(name.endswith("8-bit scales") == (bits == 8) for name, bits in precisions.items())


def test_memory_breakdown_counts_the_sinks(bench_modules):
    memory = bench_modules("memory")
    gen = torch.Generator().manual_seed(0)
    states = [tuple(torch.randn(1, 2, 300, 32, generator=gen).to(torch.bfloat16) for _ in range(2)) for _ in range(2)]
    ref = memory.reference_bytes(states, _tiny_config())
    rows = memory.measure(states, _tiny_config(), LAYOUT, ref)  # raises if the parts do not add up to nbytes
    assert {r.sink_tokens for r in rows} == {LAYOUT.sink_length}
    assert all(r.sinks == 2 * 2 * 2 * LAYOUT.sink_length * 32 * 2 for r in rows)  # K+V, layers, heads, S, d, bf16
    assert all(r.quantized_tokens + r.sink_tokens + r.window_tokens == 300 for r in rows)
    # 2.5 true bits (kivi G = 32: 1 and 2 code bits alternating): the bytes held are the arithmetic's, exactly.
    (true_row,) = [r for r in rows if r.arithmetic is not None]
    assert true_row.allocation == "2.5 true bits (1.5 code)" and true_row.true_bits == 2.5
    assert abs(true_row.nbytes - true_row.arithmetic) <= 1 and "| PASS |" in "\n".join(memory.true_budget_lines(rows))


def test_memory_per_unit_group_row_holds_the_arithmetic(bench_modules):
    from transformers import LlamaConfig

    memory = bench_modules("memory")
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    gen = torch.Generator().manual_seed(0)
    states = [tuple(torch.randn(1, 2, 700, 64, generator=gen).to(torch.bfloat16) for _ in range(2)) for _ in range(2)]
    for quantizer in ("kivi", "token"):
        layout = dataclasses.replace(LAYOUT, quantizer=quantizer)
        rows = memory.measure(states, config, layout, memory.reference_bytes(states, config))
        (grouped,) = [r for r in rows if r.allocation.endswith("per-unit groups")]
        assert grouped.true_bits == 2.5 and abs(grouped.nbytes - grouped.arithmetic) <= 2


def test_byte_frontier_lists_every_fixed_configuration_at_its_true_rate(bench_modules):
    from transformers import LlamaConfig

    from hf_ratequant.footprint import true_bits_per_element

    frontier = bench_modules("byte_frontier")
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    for design in ("kivi", "rotated"):
        listed = frontier.fixed_configs(config, design, 2.0, 5.0, 1, 6)
        names = [name for name, _, _ in listed]
        assert len(set(names)) == len(names)
        for name, cfg, true in listed:
            assert abs(true - true_bits_per_element(cfg, 64)) < 1e-9 and 2.0 <= true <= 5.0, name
            kb, vb = cfg.bits_tensor()[0, 0].tolist()
            kg, vg = cfg.groups_tensor(64)[0, 0].tolist()
            assert abs(kb - vb) <= 1 and (design == "kivi" or kg == vg), name
        groups = {tuple(cfg.groups_tensor(64)[0, 0].tolist()) for _, cfg, _ in listed}
        assert groups == ({(k, v) for k in (32, 64, 128) for v in (32, 64)} if design == "kivi"
                          else {(g, g) for g in (16, 32, 64)})
    assert any(name == "kivi K2g128V2g64" for name, _, _ in frontier.fixed_configs(config, "kivi", 2.0, 5.0, 1, 6))


def test_byte_frontier_lists_8_bit_scales_apart_and_cheaper(bench_modules):
    from transformers import LlamaConfig

    from hf_ratequant.footprint import true_bits_per_element

    frontier = bench_modules("byte_frontier")
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    for design in ("kivi", "token"):
        wide = {name: true for name, _, true in frontier.fixed_configs(config, design, 1.0, 9.0, 1, 6)}
        listed = frontier.fixed_configs(config, design, 1.0, 9.0, 1, 6, scale_bits=8)
        assert len(listed) == len(wide)
        for name, cfg, true in listed:
            assert name.endswith(", 8-bit scales") and cfg.scale_bits == 8, name
            assert abs(true - true_bits_per_element(cfg, 64)) < 1e-9
            assert true < wide[name.removesuffix(", 8-bit scales")], name


def test_byte_frontier_merges_only_a_run_of_the_same_protocol(bench_modules, tmp_path):
    frontier = bench_modules("byte_frontier")
    args = frontier.parse_args(["--merge", str(tmp_path / "run.json")])
    P = frontier.Point
    full = P("full precision (DynamicCache)", "full", None, perplexity=10.0, kl=0.0, window_nll=[2.0, 2.5],
             window_kl=[0.0, 0.0])
    fixed = P("kivi K2g32V2g32", "fixed", "kivi", true_bits=3.0, mib=20.0, perplexity=11.0, kl=0.1,
              window_nll=[2.1, 2.6], window_kl=[0.1, 0.1])
    run = dict(settings={k: getattr(args, k) for k in frontier.MERGE_KEYS},
               points=[dataclasses.asdict(full), {k: v for k, v in dataclasses.asdict(fixed).items()
                                                  if k != "scale_bits"}])  # written before scale_bits existed
    (tmp_path / "run.json").write_text(json.dumps(run))
    _, points = frontier.load_merge(args.merge, args)
    assert [p.method for p in points] == [full.method, fixed.method] and points[1].scale_bits == 16
    assert frontier.same_figures(fixed, points[1]) == 0.0
    moved = dataclasses.replace(fixed, window_nll=[2.1, 2.7])
    with pytest.raises(SystemExit, match="kivi K2g32V2g32 measures 1.00e-01 away"):
        frontier.same_figures(moved, points[1])
    with pytest.raises(SystemExit, match=r"windows 2 vs 1"):
        frontier.same_figures(dataclasses.replace(fixed, window_nll=[2.1], window_kl=[0.1]), points[1])
    run["settings"]["chunk"] = 128
    (tmp_path / "run.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit, match=r"chunk 128 instead of 64"):
        frontier.load_merge(args.merge, args)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a byte_frontier result"):
        frontier.load_merge(args.merge, args)


def test_ratequant_quality_evaluates_only_configs_of_the_same_calibration(bench_modules, tmp_path):
    """`--configs-from` takes an earlier run's configs only when it calibrated with this run's settings (a setting
    an older file lacks is the default), for every quantizer and budget asked, before any model work."""
    from transformers import LlamaConfig

    from hf_ratequant import RateQuantConfig

    quality = bench_modules("ratequant_quality")
    path = str(tmp_path / "run.json")
    args = quality.parse_args(["--quantizers", "kivi", "--budgets", "2.5", "--configs-from", path])
    model_config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    config = RateQuantConfig.uniform(model_config, key_bits=3, value_bits=2)
    settings = {k: getattr(args, k) for k in quality.CALIBRATION_KEYS if k not in ("model", "scale_bits")}
    run = dict(settings=settings, calib_sha256="abc", blocks=[dict(
        summary=dict(quantizer="kivi", budget=2.5, calibration_wall_s=100.0, calibration_cpu_s=180.0),
        config=config.to_dict())])
    (tmp_path / "run.json").write_text(json.dumps(run))
    source = quality.load_calibrated(path, args)  # model and scale_bits absent: an older file, the defaults
    block = source["blocks_by_key"][("kivi", 2.5)]
    assert RateQuantConfig.from_dict(block["config"]).bits_tensor().equal(config.bits_tensor())
    with pytest.raises(SystemExit, match=r"no config for kivi 3, token 2.5, token 3 \(it has kivi 2.5\)"):
        quality.load_calibrated(path, quality.parse_args(["--quantizers", "kivi", "token", "--budgets", "2.5", "3"]))
    run["settings"]["seq_len"] = 1024
    (tmp_path / "run.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit, match=r"seq_len 1024 instead of 512"):
        quality.load_calibrated(path, args)
    del run["blocks"][0]["config"]["key_bits"]
    run["settings"]["seq_len"] = 512
    (tmp_path / "run.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="not a ratequant_quality result with its configs"):
        quality.load_calibrated(path, args)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_quantized_cache_runs_at_every_width_with_hqqs_own_groups(bench_modules, bits):
    """HQQ's 3-bit unpacking needs 2-D tensors: the benchmarks hand it rows of head_dim, which at 2 and 4 bits
    gives exactly what transformers' own 4-D path gives."""
    pytest.importorskip("hqq")
    from transformers import LlamaConfig

    field = bench_modules("field_comparison")
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)

    def decoded(cache):
        cache.update(k, v, 0)  # past the residual window: quantized
        return cache.update(k[:, :, :1], v[:, :, :1], 0)

    keys, values = decoded(field.quantized_cache(config, "hqq", bits, 64, 128)())
    assert keys.shape == (1, 2, 301, 64)
    error = (keys[:, :, :300] - k).abs().mean()
    assert 0 < error < {2: 0.5, 3: 0.25, 4: 0.12}[bits]
    if bits == 3:  # the factory's own path is the rows one: transformers' 4-D path fails here
        return
    rows = field.quantized_cache(config, "hqq", bits, 64, 128)()
    rows.layers = [field._rows_hqq_layer()(nbits=bits, axis_key=1, axis_value=1, q_group_size=64,
                                           residual_length=128)]
    rows_keys, rows_values = decoded(rows)
    assert torch.equal(rows_keys, keys) and torch.equal(rows_values, values)


def test_byte_frontier_checks_compare_with_what_fits_in_the_bytes(bench_modules):
    frontier = bench_modules("byte_frontier")
    P = frontier.Point

    def pt(name, family, mib, kl, true=None, budget=None):
        return P(name, family, "kivi" if family in ("fixed", "ratequant") else None, true_bits=true, budget=budget,
                 mib=mib, perplexity=10 + kl, kl=kl, window_nll=[kl, 2 * kl], window_kl=[kl, 2 * kl])

    points = [pt("rq", "ratequant", 10.0, 0.010, 2.9, 3.0), pt("cheap", "fixed", 9.0, 0.020, 2.75),
              pt("dear but good", "fixed", 10.5, 0.001, 3.0), pt("same bits", "fixed", 10.4, 0.015, 3.0),
              pt("hqq", "hqq", 12.0, 0.0001)]
    (v,) = frontier.verdicts(points)
    assert v["checks"]["fixed, bytes held <="]["best"] == "cheap" and v["checks"]["fixed, bytes held <="]["below"]
    assert v["checks"]["fixed, true bits <="]["best"] == "dear but good"
    assert not v["checks"]["fixed, true bits <="]["below"]
    assert v["checks"]["QuantizedCache, bytes held <="] is None
    xs, ys = frontier._envelope([p for p in points if p.family != "ratequant"], "kl")
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True) and ys[-1] == 0.0001


# ---- the results writer -------------------------------------------------------------------------------------------
@pytest.fixture
def common(bench_modules):
    return bench_modules("_common")


def test_write_results_writes_both_files_and_no_temporary(common, tmp_path):
    out = tmp_path / "new" / "folder"
    payload = {"rows": [1, 2], "layout": LAYOUT}
    json_path, md_path = common.write_results("stem_x", payload, "# title", str(out))
    assert (json_path, md_path) == (str(out / "stem_x.json"), str(out / "stem_x.md"))
    assert sorted(os.listdir(out)) == ["stem_x.json", "stem_x.md"]
    data = json.loads(Path(json_path).read_text())
    assert data["rows"] == [1, 2] and data["layout"] == str(LAYOUT)  # default=str
    assert data["machine"]["cores"] == os.cpu_count()  # added when missing
    assert "machine" not in payload  # the caller's dict is left as it was
    assert Path(json_path).read_text().startswith('{\n "rows"')  # indent=1
    assert Path(md_path).read_text() == "# title\n"

    common.write_results("stem_x", {"machine": "given", "v": 2}, "second\n", str(out))
    assert json.loads(Path(json_path).read_text()) == {"machine": "given", "v": 2}
    assert Path(md_path).read_text() == "second\n"
    assert sorted(os.listdir(out)) == ["stem_x.json", "stem_x.md"]

    common.write_results("meta_only", {"meta": {"machine": {}}}, "x", str(out), add_machine=False)
    assert json.loads((out / "meta_only.json").read_text()) == {"meta": {"machine": {}}}


def test_write_results_failure_keeps_the_old_file_and_leaves_no_temporary(common, tmp_path, monkeypatch):
    common.write_results("r", {"v": 1}, "old", str(tmp_path))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(common.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        common.write_results("r", {"v": 2}, "new", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.md"]
    assert json.loads((tmp_path / "r.json").read_text())["v"] == 1
    assert (tmp_path / "r.md").read_text() == "old\n"


def test_group_options_analysis_is_consistent(bench_modules):
    """The exact allocation over every (bits, group) option is never worse than bits alone at one group size, nor
    than the best fixed option pair, at no more true bits per element; the rates are the packer's."""
    module = bench_modules("group_options")
    opts, pairs, rates = module.options("kivi", [32, 64, 128], [1, 2, 3, 4], head_dim=64)
    assert rates["key"][:4] == [2.0, 3.0, 4.0, 5.0] and rates["key"][4] == 1.5 and rates["key"][8] == 1.25
    assert all(r != r for r in rates["value"][8:])  # 128 channels do not fit head_dim 64
    g = torch.Generator().manual_seed(0)
    bits = torch.tensor([b for _, b in opts], dtype=torch.float64)
    group_cost = torch.tensor([{"32": 1.0, "64": 1.4, "128": 2.0}[grp] for grp, _ in opts], dtype=torch.float64)
    scale = torch.rand(3, 2, 2, 1, generator=g, dtype=torch.float64) + 0.1
    table = scale * group_cost * 4.0 ** -bits  # (layers, heads, K/V, options)
    result = module.analyse("kivi", opts, table, rates, 6)
    assert [r["budget"] for r in result["rows"]] == [2.5, 3.0, 3.5, 4.0, 5.0]
    for r in result["rows"]:
        assert r["all_options"] <= r["best_fixed"] * (1 + 1e-12) and r["all_options"] <= r["bits_only"] * (1 + 1e-12)
        assert r["all_options_rate"] <= r["budget"] + 1e-9 and sum(r["used"].values()) == 12
    assert "token" in module.markdown(dict(model="m", source="s", tokens=1, seconds=1.0, n_designs=1,
                                           designs=[dict(result, design="token")]))


def test_group_options_with_coded_scales(bench_modules):
    """Options with 8-bit scales and zero-points (the library's, `scale_bits=8`) cost their codes, 16 bits per
    group and the super-block's share, and the analysis over them is never worse than over the 16-bit options
    alone."""
    module = bench_modules("group_options")
    opts, pairs, rates = module.options("token", [32, 64], [1, 2, 3], head_dim=64, scale_bits=(16, 8))
    assert [g for g, _ in opts[::3]] == ["32", "64", "32s8", "64s8"]
    assert rates["key"][6] == 1 + 16 / 32 + 48 / (32 * 32)  # a super-block: one place in the row, 32 tokens
    kivi_opts, _, kivi_rates = module.options("kivi", [32, 64], [2], head_dim=64, scale_bits=(16, 8))
    assert kivi_rates["key"][2] == 2 + 16 / 32 + 48 / (32 * 64)  # one super-block: a block of tokens
    assert pairs["64s8"][0].token_block("value") == 32 and pairs["64"][0].token_block("value") == 1
    g = torch.Generator().manual_seed(1)
    table = torch.rand(3, 2, 2, len(opts), generator=g, dtype=torch.float64) * 4.0 ** -torch.tensor(
        [b for _, b in opts], dtype=torch.float64)
    result = module.analyse("token", opts, table, rates, 6)
    assert result["rows"]
    for r in result["rows"]:
        assert r["all_options"] <= r["all_options_16"] * (1 + 1e-12)
        assert r["all_options"] <= r["all_options_8"] * (1 + 1e-12)
        assert r["best_fixed"] <= r["best_fixed_16"] * (1 + 1e-12)
    eight_only = [r["all_options_8"] for r in result["rows"]]
    table[..., [i for i, (grp, _) in enumerate(opts) if "s8" not in grp]] = float("inf")  # 8-bit options alone
    assert [r["all_options"] for r in module.analyse("token", opts, table, rates, 6)["rows"]] == eight_only
    text = module.markdown(dict(model="m", source="s", tokens=1, seconds=1.0, n_designs=4, designs=[result]))
    assert "16- or 8-bit scales" in text and "scale_bits=8" in text and "all options, 8-bit scales" in text


def test_decode_speed_fills_sliding_layers_with_the_whole_context(bench_modules):
    """A sliding-window model's caches are filled with every context token (each keeping its own window) and count
    them all, as after a real prefill: decoding continues at the right position."""
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM

    from hf_ratequant import RateQuantCache, RateQuantConfig

    decode_speed = bench_modules("decode_speed")
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=32, sliding_window=64)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 300))
    states, first = decode_speed.prefill(model, ids)
    assert all(k.shape[2] == 300 for k, _ in states)
    for cache in (DynamicCache(config=config), RateQuantCache(config=config,
                                                               quant_config=RateQuantConfig.uniform(config, bits=4))):
        with torch.inference_mode():
            decode_speed.fill(cache, states)
        decode_speed.decode(model, cache, first, 2, torch.device("cpu"))
        assert cache.get_seq_length() == 302
    with torch.inference_mode():  # the first decoded token is the model's own next token after the whole context
        assert int(model(ids).logits[0, -1].argmax()) == int(first)


def test_budget_context_moves_bits_to_the_sliding_layers(bench_modules, tmp_path):
    """On Gemma 3's published table, the allocation by bytes at 32768 tokens keeps the budget there and gives the
    sliding layers (an 85th of a global layer's bytes per element) more bits than at 4096; no model is loaded."""
    module = bench_modules("budget_context")
    assert module.main(["--budgets", "3", "--contexts", "4096", "32768", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "budget_context.json").read_text())["rows"]
    assert [r["weights"] for r in rows] == [[4, 41], [12, 1019]]
    for r in rows:
        assert r["allocation"]["held"] <= 3.0 + 1e-9 and r["allocation_4096"]["held"] <= 3.0 + 1e-9
    near, far = rows[0]["allocation"]["sliding_mean"], rows[1]["allocation"]["sliding_mean"]
    assert far["key"] > near["key"] + 1 and far["value"] > near["value"] + 1


def test_table_transfer_scores_allocations_on_both_tables(bench_modules):
    """The arithmetic of the measure-across-texts study: a fixed split's bits, a config's unit order (keys then
    values per layer and head), rank correlation, and each allocation's predicted distortion against the split."""
    module = bench_modules("table_transfer")
    assert module.split_bits("K3V2", 2, 1, 2.5).tolist() == [3, 2, 3, 2]
    assert module.split_bits("uniform-3", 1, 2, 3.0).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="not a fixed split"):
        module.split_bits("ratequant", 1, 1, 2.5)
    assert module.unit_bits([[4], [2]], [[3], [1]]).tolist() == [4, 3, 2, 1]
    assert module.rank_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1)
    assert module.rank_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1)
    grid = [1, 2, 3, 4]
    a = torch.tensor([[8.0, 4.0, 2.0, 1.0], [80.0, 40.0, 20.0, 10.0]])  # unit 1 ten times as important
    b = torch.tensor([[80.0, 40.0, 20.0, 10.0], [8.0, 4.0, 2.0, 1.0]])  # and on the other text, unit 0
    fixed, winner = torch.tensor([2, 2]), torch.tensor([1, 3])  # the winner of the first text
    out = module.compare({"docs": a, "news": b}, grid, 2.0, winner, fixed)
    assert out["rank_correlation"] == pytest.approx(-1)
    assert out["ratio_median"] == pytest.approx(1) and out["ratio_range"] == pytest.approx([0.1, 10])
    assert out["predicted_vs_fixed"]["docs"]["winner"] == pytest.approx((8 + 20) / 44 - 1)
    assert out["predicted_vs_fixed"]["news"]["winner"] == pytest.approx((80 + 2) / 44 - 1)  # +86%: it inverts
    assert out["optima"] == {"docs": [1, 3], "news": [3, 1]}


def test_table_transfer_needs_the_same_allocation_in_both_runs(bench_modules, tmp_path):
    """The real KL is taken from an in-domain run and the cross-domain run of its configs: refused, before any model
    loads, when the two runs hold different allocations; a run older than `--calib-data` counts as the docs text."""
    module = bench_modules("table_transfer")
    summary = dict(quantizer="kivi", budget=2.5, winner="ratequant", chosen_kl=0.5, best_fixed_by_kl="K3V2",
                   best_fixed_kl_min=1.0)
    config = dict(key_bits=[[3], [3]], value_bits=[[2], [2]])
    inside = dict(settings={}, calib_source="pydoc_data.topics (...)", eval_source="pydoc_data.topics (...)",
                  blocks=[dict(summary=summary, config=config)])
    cross = dict(settings=dict(calib_data="pydoc", eval_data="bbc"),
                 blocks=[dict(summary={**summary, "chosen_kl": 1.2}, config=config)])
    a, b = tmp_path / "in.json", tmp_path / "cross.json"
    a.write_text(json.dumps(inside))
    b.write_text(json.dumps(cross))
    cell = module.real_cell(str(a), str(b), "kivi", 2.5)
    assert cell["texts"] == ["pydoc", "bbc"] and cell["model"] == "smollm2"  # no --model recorded: the default
    with pytest.raises(SystemExit, match="its quality runs are of --model smollm2"):
        module.main(["--run", "gemma3-270m", str(a), str(b), "--output-dir", str(tmp_path)])
    assert cell["real_kl_vs_fixed"] == pytest.approx({"pydoc": -0.5, "bbc": 0.2})
    assert set(cell["settings"].values()) == {None}  # the tables are measured with the run's settings: defaults
    inside["settings"] = dict(seq_len=1024, plain_measure=True)
    a.write_text(json.dumps(inside))
    cell = module.real_cell(str(a), str(b), "kivi", 2.5)
    assert cell["settings"]["seq_len"] == 1024 and cell["settings"]["residual_aware"] is False
    with pytest.raises(SystemExit, match="no kivi 3 cell"):
        module.real_cell(str(a), str(b), "kivi", 3.0)
    cross["blocks"][0]["config"] = dict(key_bits=[[4], [2]], value_bits=[[2], [2]])
    b.write_text(json.dumps(cross))
    with pytest.raises(SystemExit, match="do not hold the same kivi 2.5 allocation"):
        module.real_cell(str(a), str(b), "kivi", 2.5)


def test_allocation_path_separates_units_from_their_sum(bench_modules):
    """The path from a fixed split to a winner: one allocation per differing unit each way, and the decomposition of
    the winner's change into the table's per-unit predictions and the real one-unit changes (relative to the split)."""
    module = bench_modules("allocation_path")
    fixed, winner = torch.tensor([3, 2, 3, 2]), torch.tensor([4, 1, 3, 2])
    paths = module.path_allocations(fixed, winner)
    assert {k: v.tolist() for k, v in paths.items()} == {
        "fixed": [3, 2, 3, 2], "winner": [4, 1, 3, 2], "+0": [4, 2, 3, 2], "-0": [3, 1, 3, 2],
        "+1": [3, 1, 3, 2], "-1": [4, 2, 3, 2]}
    assert [module.unit_name(1, 1), module.unit_name(5, 2), module.unit_name(6, 2)] == ["L0 V", "L1h0 V", "L1h1 K"]
    grid = [1, 2, 3, 4]
    table = torch.tensor([[8.0, 4.0, 2.0, 1.0], [16.0, 8.0, 4.0, 2.0], [8.0, 4.0, 2.0, 1.0], [8.0, 4.0, 2.0, 1.0]])
    # predicted at the split: 2 + 8 + 2 + 4 = 16; the winner 1 + 16 + 2 + 4 = 23: unit 0 saves 1, unit 1 costs 8
    kl = {"fixed": 1.0, "winner": 1.5, "+0": 0.9, "+1": 1.4, "-0": 1.4, "-1": 1.2}
    out = module.decompose(table, grid, fixed, winner, kl)
    units = {x["unit"]: x for x in out["units"]}
    assert units[0]["bits"] == [3, 4] and units[0]["predicted"] == pytest.approx(-1 / 16)
    assert units[1]["predicted"] == pytest.approx(8 / 16)
    assert units[0]["from_fixed"] == pytest.approx(-0.1) and units[1]["from_fixed"] == pytest.approx(0.4)
    assert units[0]["at_winner"] == pytest.approx(0.1) and units[1]["at_winner"] == pytest.approx(0.3)
    assert out["totals"] == pytest.approx(dict(predicted=7 / 16, real=0.5, sum_from_fixed=0.3, sum_at_winner=0.4))
    assert out["rank_correlation"] is None  # two units: no correlation to speak of


def test_allocation_path_checks_its_run_before_any_model(bench_modules, tmp_path):
    """A `--run` must be of the model named and hold per-window KLs of the split and the winner for the windows
    asked; the run's own figures over those windows are what this run's evaluation is checked against."""
    module = bench_modules("allocation_path")
    summary = dict(quantizer="kivi", budget=2.5, winner="ratequant-keys-x4", best_fixed_by_kl="K3V2")
    rows = [dict(cache="K3V2", window_kl=[0.2, 0.4, 9.0], window_tokens=[10, 30, 10]),
            dict(cache="chosen (ratequant-keys-x4)", window_kl=[0.1, 0.1, 9.0], window_tokens=[10, 30, 10])]
    run = dict(settings=dict(model="gemma3-270m", calib_data="pydoc", eval_data="bbc", seq_len=1024),
               blocks=[dict(summary=summary, config=dict(key_bits=[[3]], value_bits=[[2]]), rows=rows)])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    c = module.load_cell("gemma3-270m", str(path), "kivi", 2.5, 2)
    assert c["run_kl"] == pytest.approx({"fixed": 0.35, "winner": 0.1})
    assert (c["calib_data"], c["eval_data"], c["fixed"]) == ("pydoc", "bbc", "K3V2")
    assert c["settings"]["seq_len"] == 1024 and c["settings"]["n_samples"] is None
    with pytest.raises(SystemExit, match="that run is of --model gemma3-270m"):
        module.load_cell("smollm2", str(path), "kivi", 2.5, 2)
    with pytest.raises(SystemExit, match="do not hold 4 per-window KLs"):
        module.load_cell("gemma3-270m", str(path), "kivi", 2.5, 4)
    with pytest.raises(SystemExit, match="no kivi 3 cell"):
        module.load_cell("gemma3-270m", str(path), "kivi", 3.0, 2)
    with pytest.raises(SystemExit, match="that run is of --model gemma3-270m"):
        module.main(["--run", "smollm2", str(path), "--output-dir", str(tmp_path)])


def test_verified_moves_rechooses_the_moves_exactly(bench_modules):
    """The winner's moves away from the split re-chosen by their measured changes: the least sum at no more bits
    than the split, against every subset on random small problems; ties go to fewer bits."""
    import itertools
    import random

    module = bench_modules("verified_moves")
    fixed, winner = torch.tensor([3, 2, 3, 2]), torch.tensor([2, 1, 5, 3])
    # unit 2 gains most but costs two bits; taking units 0 and 1 down pays for it
    got = module.rechoose(fixed, winner, {0: 0.1, 1: 0.5, 2: -0.4, 3: -0.3})
    assert got.tolist() == [2, 2, 3, 3]  # only unit 3 up (one bit) paid by unit 0 down: -0.2
    assert module.rechoose(fixed, winner, {0: 0.1, 1: 0.05, 2: -0.4, 3: 0.3}).tolist() == [2, 1, 5, 2]
    assert module.rechoose(fixed, fixed, {}).tolist() == fixed.tolist()
    with pytest.raises(ValueError, match="a measured change for each move"):
        module.rechoose(fixed, winner, {0: 0.1})
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        f = torch.tensor([rng.randint(1, 6) for _ in range(n)])
        w = torch.tensor([rng.randint(1, 6) for _ in range(n)])
        moves = (f != w).nonzero().flatten().tolist()
        change = {u: rng.uniform(-1, 1) for u in moves}
        got = module.rechoose(f, w, change)
        best = min(sum(change[u] for u in s) for k in range(len(moves) + 1) for s in itertools.combinations(moves, k)
                   if sum(int(w[u] - f[u]) for u in s) <= 0)
        assert int(got.sum()) <= int(f.sum())
        assert sum(change[u] for u in moves if got[u] == w[u]) == pytest.approx(best)


def test_verified_moves_reads_its_runs_before_any_model(bench_modules, tmp_path):
    """The held-out figures of the split and the winner come from the quality runs, which must hold the same
    allocation; the cross-domain run's figures beside the in-domain run's, relative to the split."""
    module = bench_modules("verified_moves")
    summary = dict(quantizer="kivi", budget=2.5, winner="ratequant-keys-x4", best_fixed_by_kl="K3V2")
    rows = [dict(cache="K3V2", perplexity=10.0, kl=0.02, window_kl=[0.02]),
            dict(cache="chosen (ratequant-keys-x4)", perplexity=9.5, kl=0.01)]
    config = dict(key_bits=[[3]], value_bits=[[2]])
    run = dict(settings=dict(model="gemma3-270m", calib_data="pydoc", eval_data="pydoc"), eval_windows=8,
               full=dict(perplexity=9.0), blocks=[dict(summary=summary, config=config, rows=rows)])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    t = module.held_out(str(path), "kivi", 2.5, [[3]], [[2]])
    assert (t["eval_data"], t["windows"], t["fixed_name"], t["model"]) == ("pydoc", 8, "K3V2", "gemma3-270m")
    w = module.against(t["winner"], t["fixed"], t["full_ppl"])
    assert w["kl_vs_fixed"] == pytest.approx(-0.5)
    assert w["gap_recovered"] == pytest.approx(math.log(10 / 9.5) / math.log(10 / 9))
    with pytest.raises(SystemExit, match="does not hold the same kivi 2.5 allocation"):
        module.held_out(str(path), "kivi", 2.5, [[4]], [[2]])
    with pytest.raises(SystemExit, match="no fixed split K2V3 of 2.5 bits"):  # the cross run: the in-domain split
        module.held_out(str(path), "kivi", 2.5, [[3]], [[2]], "K2V3")
    with pytest.raises(SystemExit, match="every run must be of --model smollm2"):
        module.main(["--run", "smollm2", str(path), "--output-dir", str(tmp_path)])
    cross = dict(run, settings=dict(model="gemma3-270m", calib_data="pydoc", eval_data="bbc"))
    (tmp_path / "cross.json").write_text(json.dumps(cross))
    with pytest.raises(SystemExit, match="not evaluated on its calibration text"):
        module.main(["--run", "gemma3-270m", str(tmp_path / "cross.json"), "--output-dir", str(tmp_path)])


def test_verified_moves_says_which_windows_scored_the_moves(bench_modules):
    """Runs from before `--score-on` scored the moves on validation windows; a run on fit windows says so."""
    module = bench_modules("verified_moves")
    assert module.scored_on({}) == "validation" and module.scored_on({"scored_on": "fit"}) == "fit"
    assert module.build_parser().parse_args(["--run", "m", "a", "--score-on", "fit"]).score_on == "fit"
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(["--run", "m", "a", "--score-on", "evaluation"])
    payload = dict(model="m", quantizer="kivi", budget=2.5, command="c", winner="keys-x4", fixed="K3V2", heads=1,
                   validation_windows=4, scored_on="fit", singles_s=1.0, moves=[], texts=[])
    assert "on 4 fit windows of the calibration text" in module.markdown(payload)
    assert "real change alone, fit windows" in module.markdown(payload)


def test_gap_windows_shares_and_their_errors(bench_modules):
    """The share of a fixed cache's excess that the calibrated one removes, token-weighted over windows, with the
    delta-method standard error: exact where every window agrees, growing with their spread."""
    gap = bench_modules("gap_windows")
    full, fixed, tokens = [1.0, 2.0, 3.0, 4.0], [1.4, 2.4, 3.4, 4.4], [10, 10, 10, 10]
    share, se = gap.share_recovered(full, fixed, [1.1, 2.1, 3.1, 4.1], tokens)
    assert share == pytest.approx(0.75) and se == pytest.approx(0.0, abs=1e-12)
    share, se = gap.share_recovered(full, fixed, [1.0, 2.4, 3.0, 4.4], tokens)  # half the windows at each end
    assert share == pytest.approx(0.5) and se == pytest.approx(math.sqrt(4 / 3 * 4 * 2.0**2) / 16)
    share, _ = gap.share_recovered([0.0, 0.0], [1.0, 3.0], [0.0, 3.0], [3, 1])  # weighted: 3 of 6
    assert share == pytest.approx(0.5)
    assert gap.share_recovered([0.0], [1.0], [0.5], [5]) == (0.5, None)
    caches = {"full precision": dict(window_nll=full, window_kl=[0.0] * 4, window_tokens=tokens),
              "ours": dict(window_nll=[1.1, 2.1, 3.1, 4.1], window_kl=[0.01] * 4, window_tokens=tokens),
              "K3V2": dict(window_nll=fixed, window_kl=[0.04] * 4, window_tokens=tokens)}
    [row] = gap.compare(caches, "ours", ["K3V2"], windows=2)
    assert row["windows"] == 2 and row["ppl_share"] == pytest.approx(0.75) and row["kl_share"] == pytest.approx(0.75)
    summary = gap.summary_of(caches)
    assert summary["full precision"]["perplexity"] == pytest.approx(math.exp(2.5))
    assert summary["K3V2"]["kl"] == pytest.approx(0.04)
    cell = dict(file="r.json", quantizer="token", budget=3.0, chosen="ours", fixed=["K3V2"],
                summary_recorded=gap.summary_of(caches, 2), summary_run=gap.summary_of(caches, 2), summary_all=summary,
                shares_run=gap.compare(caches, "ours", ["K3V2"], 2), shares_all=gap.compare(caches, "ours", ["K3V2"]))
    text = gap.markdown(dict(machine=dict(cpu="cpu", cores=2), model="m", eval_source="docs", window=1024, windows=4,
                             run_windows=2, differences={"full precision": 1e-6, "token 3 ours": 2e-3},
                             full=dict(run=summary["full precision"], all=summary["full precision"]), cells=[cell],
                             command="python benchmarks/gap_windows.py --run r.json", total_s=60.0))
    assert "| token 3 | K3V2 | 75% ± 0% | 75% ± 0% | 75% ± 0% | 75% ± 0% |" in text and "to 1e-06 per window" in text
    assert "Validation's candidates" not in text
    cell["candidate_summary"] = {
        "candidate ratequant": dict(validation_kl=0.007, stopped=True, run=summary["K3V2"], all=summary["K3V2"]),
        "ours": dict(validation_kl=0.005, stopped=False, run=summary["ours"], all=summary["ours"])}
    text = gap.markdown(dict(machine=dict(cpu="cpu", cores=2), model="m", eval_source="docs", window=1024, windows=4,
                             run_windows=2, differences={"full precision": 1e-6}, full=dict(
                                 run=summary["full precision"], all=summary["full precision"]), cells=[cell],
                             command="c", total_s=60.0))
    rows = text.split("Validation's candidates")[1].split("| --- | ---: | ---: | ---: |\n")[1].splitlines()
    assert rows[0].startswith("| ours | 0.00500 |") and rows[1].startswith("| candidate ratequant | >0.00700 |")


def test_gap_windows_rebuilds_the_quality_runs_caches(bench_modules, tmp_path):
    """A run's chosen config comes from its file and its best fixed configurations are rebuilt as
    `ratequant_quality` built them (8-bit scales, and the 16-bit ones of the same bytes); a file that is not such a
    run, or evaluated several windows at a time, is refused before any model work."""
    from transformers import LlamaConfig

    from hf_ratequant import RateQuantConfig
    from hf_ratequant.footprint import true_bits_per_element

    gap, quality = bench_modules("gap_windows"), bench_modules("ratequant_quality")
    model_config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=256,
                               head_dim=64)
    args = quality.parse_args(["--quantizers", "token", "--budgets", "3", "--budget-unit", "true", "--groups", "16",
                               "32", "--scale-bits", "8", "--b-max", "6"])
    layout = quality.layout_from_args(args, quantizer="token")
    built = dict(quality.fixed_configs(args, model_config, "token", 3.0, layout))
    assert "K3g32V2g64" in built and all(cfg.scale_bits == 8 for cfg in built.values())
    assert all(true_bits_per_element(cfg, 64) <= 3.0 + 1e-9 for cfg in built.values())
    chosen = RateQuantConfig.uniform(model_config, key_bits=3, value_bits=2, layout=layout)
    row = dict(perplexity=12.0, window_nll=[2.5], window_kl=[0.01], window_tokens=[1023])
    run = dict(settings=vars(args), full=dict(row), eval_source="pydoc_data.topics (held-out half)", blocks=[dict(
        summary=dict(quantizer="token", budget=3.0, winner="ratequant-options", best_fixed="K3g32V2g64",
                     best_fixed_by_kl="K3V2 s16"),
        config=chosen.to_dict(),
        rows=[dict(row, cache=c) for c in ("chosen (ratequant-options)", "K3g32V2g64", "K3V2 s16")])])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    loaded = gap.load_run(str(path))
    [cell] = loaded["cells"]
    assert cell["fixed"] == ["K3g32V2g64", "K3V2 s16"] and loaded["eval_data"] == "pydoc"
    options = gap.run_options(loaded["settings"])
    assert gap.rebuild("chosen (ratequant-options)", cell, options, model_config).bits_tensor().equal(
        chosen.bits_tensor())
    fixed = gap.rebuild("K3g32V2g64", cell, options, model_config)
    assert fixed.bits_tensor().equal(built["K3g32V2g64"].bits_tensor()) and fixed.scale_bits == 8
    wide = gap.rebuild("K3V2 s16", cell, options, model_config)
    assert wide.scale_bits == 16 and wide.bits_tensor().equal(chosen.bits_tensor())
    with pytest.raises(SystemExit, match="not a fixed configuration of token 3"):
        gap.rebuild("K9g32V2g64", cell, options, model_config)
    assert gap.check_against_run("x", dict(row, window_nll=[2.5, 9.0]), row, gap.FULL_TOLERANCE) == 0.0
    assert gap.check_against_run("x", dict(row, window_kl=[0.02]), row) == pytest.approx(0.01)  # reported only
    with pytest.raises(SystemExit, match="away from the quality run's figures"):
        gap.check_against_run("x", dict(row, window_kl=[0.0102]), row, gap.FULL_TOLERANCE)
    assert cell["candidates"] == {}  # a run without its calibration record: nothing else to measure
    bits = chosen.bits_tensor().clone()
    bits[0, 0, 0] += 1
    groups = torch.full_like(bits, 32)
    groups[..., 1] = 64
    run["blocks"][0]["calibration"] = dict(
        winner="ratequant-options", families={"ratequant-options": "ratequant", "ratequant": "ratequant",
                                              "K3g32V2g64": "fixed"},
        candidates={"ratequant-options": bits.tolist(), "ratequant": bits.tolist(), "K3g32V2g64": bits.tolist()},
        candidate_groups={"ratequant": groups.tolist()},
        validation_kl={"ratequant-options": 0.005, "ratequant": 0.007, "K3g32V2g64": 0.009},
        validation_stopped=["ratequant"])
    path.write_text(json.dumps(run))
    [cell] = gap.load_run(str(path))["cells"]
    assert list(cell["candidates"]) == ["candidate ratequant"] and cell["chosen_validation_kl"] == 0.005
    assert cell["candidates"]["candidate ratequant"]["stopped"]
    other = gap.rebuild("candidate ratequant", cell, options, model_config)  # the layout's, the tables' bits
    assert other.bits_tensor().equal(bits) and other.scale_bits == 8 and other.quantizer == "token"
    assert other.key_groups == groups[..., 0].tolist() and other.value_groups == groups[..., 1].tolist()
    assert (other.budget, other.b_min, other.b_max) == (chosen.budget, chosen.b_min, chosen.b_max)
    run["settings"]["eval_batch_size"] = 2
    path.write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="evaluated 2 windows at a time"):
        gap.load_run(str(path))
    path.write_text("{}")
    with pytest.raises(SystemExit, match="not a ratequant_quality result"):
        gap.load_run(str(path))
