"""The mismatch analysis and the plots, on a tiny random model (the CLI on the default model)."""

import json
import os

import pytest
import torch

from hf_ratequant import RateQuantConfig
from hf_ratequant.analysis import beta_table, fit_quantizer_curves, mismatch_study
from hf_ratequant.plots import plot_allocation, plot_distortion_curves
from hf_ratequant.settings import CacheLayout
from tests.test_calibration import WORDS, WordTokenizer, corpus
from tests.test_calibration import model as model  # noqa: F401 - the module-scoped tiny Llama fixture

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def curves(model):  # noqa: F811
    return fit_quantizer_curves(model, WordTokenizer(), [corpus(3000)], n_samples=2, seq_len=64, group_size=8,
                                residual_length=8, b_min=2, b_max=4, progress=False)


def test_every_quantizer_fitted_on_the_same_states(curves):
    assert set(curves) == {"kivi", "token", "rotated"}
    for c in curves.values():
        assert c.distortion.shape == (2, 2, 2, 3) and c.fit.beta.shape == (2, 2, 2)
        assert (c.fit.beta > 1).all() and (c.fit.r2 > 0.5).all()
        bits = c.allocation(2.5)
        assert bits.shape == (2, 2, 2) and bits.double().mean() == 2.5
    rows = beta_table(curves)
    assert [(r["quantizer"], r["kind"]) for r in rows] == [(q, k) for q in curves for k in ("key", "value")]
    assert all(r["beta_min"] <= r["beta_median"] <= r["beta_max"] for r in rows)


def test_mismatch_study_rows(model, curves):  # noqa: F811
    windows = torch.randint(0, len(WORDS), (2, 48), generator=torch.Generator().manual_seed(0))
    layout = CacheLayout(group_size=8, residual_length=8, sink_length=8)  # 48 tokens: 32 sinks would leave no KL
    rows = mismatch_study(model, windows, curves, 2.5, layout=layout, chunk=16, progress=False)
    for q in curves:
        mine = {r["allocation"]: r for r in rows if r["quantizer"] == q}
        assert set(mine) == {"K2V3", "K3V2", "own curves", "kvq beta=4"} | {f"curves of {a}" for a in curves if a != q}
        assert mine["own curves"]["units_changed"] == 0 and mine["own curves"]["rank_agreement"] == pytest.approx(1)
        assert mine["K3V2"]["key_bits"] == 3 and -1 <= mine["K3V2"]["rank_agreement"] <= 1
        assert all(r["kl"] > 0 and r["perplexity"] > 1 for r in mine.values())


def test_plots_are_pngs(tmp_path, curves, model):  # noqa: F811
    path = plot_distortion_curves(curves, tmp_path / "curves.png")
    assert open(path, "rb").read(8) == PNG
    cfg = RateQuantConfig.uniform(model.config, key_bits=3, value_bits=2)
    cfg.key_bits[1][0] = 16
    path = plot_allocation(cfg, tmp_path / "alloc.png")
    assert open(path, "rb").read(8) == PNG


def test_analyze_command(smollm_cli, tmp_path, capsys):
    from hf_ratequant.cli import main

    out_dir = tmp_path / "analysis"
    assert main(["analyze", "--quantizers", "kivi", "token", "--samples", "1", "--seq-len", "128", "--windows", "1",
                 "--window", "128", "--chunk", "32", "--residual-length", "32", "--data", "pydoc",
                 "--eval-data", "pydoc", "-o", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "beta median" in out and "curves of token" in out and "kvq beta=4" in out
    assert {p.name for p in out_dir.iterdir()} == {"analysis.json", "distortion_curves.png", "allocation_kivi.png",
                                                   "allocation_token.png"}
    report = json.loads((out_dir / "analysis.json").read_text())
    # per quantizer: the fixed splits K1V4 .. K4V1 (b_min = 1, as calibrate), own curves, the other's, kvq
    assert len(report["betas"]) == 4 and len(report["mismatch"]) == 2 * 7
    # where it ran, so that its figures are compared only with those of the same machine
    assert report["machine"]["device"] == "cpu" and report["machine"]["cores"] == os.cpu_count()
    assert report["machine"]["torch"] == torch.__version__ and report["seconds"] > 0
