"""Calibration's stages alone: candidates, the successive-halving race with fake scores, the versioned record, and
the checks `calibrate` makes before it loads any data."""

import glob
import json
import time

import pytest
import torch
from transformers import LlamaConfig

from hf_ratequant.allocation import (
    Candidate,
    fixed_candidates,
    fixed_split_name,
    successive_halving,
    validation_rungs,
)
from hf_ratequant.analysis import kvq_candidate
from hf_ratequant.calibration import calibrate, calibration_candidates, check_feasible, resolve_settings
from hf_ratequant.config import ModelFingerprint
from hf_ratequant.record import RECORD_VERSION, CalibrationRecord

RECORD_FILES = sorted(glob.glob("hub_artifacts/*/ratequant_config.json")
                      + glob.glob("hf_ratequant/pretrained/*/ratequant_config.json"))


def _record(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)["calibration"]


# Published before records were versioned (the SmolLM2 folders), and since (the other models' folders)
UNVERSIONED = [p for p in RECORD_FILES if "record_version" not in _record(p)]
VERSIONED = [p for p in RECORD_FILES if p not in UNVERSIONED]
TINY = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32)


def candidate(name: str, *bits: int, family: str = "ratequant") -> Candidate:
    return Candidate(name, family, torch.tensor(bits).reshape(1, -1, 2))


def fake_scorer(kl: dict[tuple[int, ...], list[float]], calls: list):
    """Scores each allocation's rung `r` with `kl[bits][r]` per token over 10 tokens, never stopping early; records
    every call as (bits, rung)."""
    def score(c, rung, stop_above):
        bits = tuple(c.bits.reshape(-1).tolist())
        calls.append((bits, rung))
        return kl[bits][rung] * 10, 10.0, True
    return score


def by_rung(calls: list) -> list[list[tuple[int, ...]]]:
    """The calls grouped by rung, in order."""
    out = []
    for bits, rung in calls:
        if rung == len(out):
            out.append([])
        out[rung].append(bits)
    return out


def streaming_scorer(kl: dict[tuple, list[list[float]]], scored: list | None = None):
    """Scores rung `r` of an allocation token by token (`kl[key][r]`: per-token KLs), stopping once the sum passes
    `stop_above`, as `evaluate_quality(stop_above=...)` does; counts every token scored in `scored`."""
    def score(c, rung, stop_above):
        tokens, total = kl[c.key][rung], 0.0
        for i, t in enumerate(tokens):
            total += t
            if scored is not None:
                scored.append(1)
            if total > stop_above:
                return total, float(len(tokens)), i == len(tokens) - 1
        return total, float(len(tokens)), True
    return score


def test_fixed_split_names():
    assert fixed_split_name(3, 3) == "uniform-3" and fixed_split_name(3, 2) == "K3V2"
    fixed = fixed_candidates(2, 2, 2.5, 1, 4)
    assert [c.name for c in fixed] == ["K1V4", "K2V3", "K3V2", "K4V1"]
    assert all(c.family == "fixed" and c.bits.shape == (2, 2, 2) and c.bits.double().mean() == 2.5 for c in fixed)


def test_validation_rungs():
    assert validation_rungs(8) == [2, 2, 4] and validation_rungs(10) == [2, 2, 6]
    assert validation_rungs(4) == [2, 2] and validation_rungs(5) == [2, 3] and validation_rungs(3) == [3]
    for n in range(1, 40):
        assert sum(validation_rungs(n)) == n and min(validation_rungs(n)) >= 1


def test_race_halves_the_field_and_the_best_finalist_wins():
    field = [candidate(n, i, i) for i, n in enumerate("abcdefg")]
    kl = {(i, i): [k, k2, k3] for i, (k, k2, k3) in enumerate(
        [(1, 9, 9), (2, 1, 1), (3, 1, 2), (4, 5, 0.1), (5, 0, 0), (6, 0, 0), (7, 0, 0)])}
    calls = []
    race = successive_halving(field, [2, 2, 4], fake_scorer(kl, calls), finalists=1)
    rungs = by_rung(calls)
    assert [len(r) for r in rungs] == [7, 2, 1]
    assert set(rungs[1]) == {(0, 0), (1, 1)}  # the best 2 after rung 0
    assert rungs[2] == [(1, 1)]  # mean over rungs 0-1: b = 1.5 beats a = 5
    assert race.winner == "b" and race.finalists == ["b"] and race.stopped == []
    assert race.windows == {"a": 4, "b": 8, **{n: 2 for n in "cdefg"}}
    assert race.scores["b"] == pytest.approx(4 / 3) and list(race.scores) == list("abcdefg")


def test_race_scores_coinciding_allocations_once_and_extends_after_the_first_rung():
    field = [candidate("x", 1, 2), candidate("y", 1, 2), candidate("z", 2, 1, family="fixed")]
    kl = {(1, 2): [2.0], (2, 1): [1.0], (3, 0): [0.5]}
    calls, seen = [], []

    def extend(scores):
        seen.append(dict(scores))
        return [candidate("w", 3, 0, family="descent")]

    race = successive_halving(field, [3], fake_scorer(kl, calls), extend=extend)
    assert calls == [((1, 2), 0), ((2, 1), 0), ((3, 0), 0)]
    assert seen == [{"x": 2.0, "y": 2.0, "z": 1.0}]
    assert race.winner == "w" and race.finalists == ["x", "y", "z", "w"]
    assert [c.name for c in race.entrants] == ["x", "y", "z", "w"]


def test_fixed_splits_with_group_sizes_are_scored_after_the_extension():
    grouped = Candidate("K2g64V2g32", "fixed", torch.tensor([[[2, 2]]]), torch.tensor([[[64, 32]]]))
    field = [candidate("x", 1, 2), grouped, candidate("z", 2, 1, family="fixed")]
    kl = {c.key: [1.0] for c in field} | {(3, 0): [0.5]}
    calls, seen = [], []

    def extend(scores):
        seen.append(dict(scores))
        return [candidate("w", 3, 0, family="descent")]

    race = successive_halving(field, [3], lambda c, r, s: calls.append(c.name) or (kl[c.key][r] * 10, 10.0, True),
                              extend=extend)
    assert seen == [{"x": 1.0, "z": 1.0}] and calls == ["x", "z", "w", "K2g64V2g32"]
    assert list(race.scores) == ["x", "K2g64V2g32", "z", "w"] and race.winner == "w"


def test_race_scores_the_first_rung_in_the_given_order_and_later_ones_best_first():
    field = [candidate(n, i, i) for i, n in enumerate("abcd")]
    kl = {(i, i): [k, k2] for i, (k, k2) in enumerate([(4, 1), (3, 1), (1, 1), (2, 1)])}
    calls = []
    successive_halving(field, [1, 1], fake_scorer(kl, calls), finalists=2, order=lambda c: -c.bits.sum().item())
    assert by_rung(calls) == [[(3, 3), (2, 2), (1, 1), (0, 0)], [(2, 2), (3, 3)]]


def _random_race(seed: int):
    """A random field (allocations, fixed splits of two kinds, descent entered after the first rung) with per-token
    KLs, some hopeless."""
    g = torch.Generator().manual_seed(seed)
    rungs = [2, 2, 4] if seed % 2 else [3]
    n = int(torch.randint(3, 12, (1,), generator=g))
    families = ["ratequant", "fixed", "fixed-grouped"]
    field = []
    for i in range(n):
        family = families[int(torch.randint(0, 3, (1,), generator=g))]
        groups = torch.tensor([[[32, 64]]]) if family == "fixed-grouped" else None
        field.append(Candidate(f"c{i}", "fixed" if family != "ratequant" else family,
                               torch.tensor([[[i, 1]]]), groups))
    extra = [Candidate(f"d{i}", "descent", torch.tensor([[[100 + i, 1]]])) for i in range(3)]
    kl = {}
    for c in field + extra:
        level = float(torch.rand(1, generator=g)) * (30 if torch.rand(1, generator=g) < 0.3 else 1)
        kl[c.key] = [(torch.rand(r * 5, generator=g) * level).tolist() for r in rungs]
    return field, extra, rungs, kl


@pytest.mark.parametrize("seed", range(40))
def test_stopping_early_changes_nothing_the_race_decides(seed):
    field, extra, rungs, kl = _random_race(seed)
    seen = {}

    def extend_as(label):
        def extend(scores):
            seen[label] = {n: s for n, s in scores.items()
                           if any(c.name == n and c.family == "fixed" for c in field)}
            return extra
        return extend

    scored_full, scored = [], []
    full = successive_halving(field, rungs, lambda c, r, s: streaming_scorer(kl, scored_full)(c, r, float("inf")),
                              finalists=1, extend=extend_as("full"))
    assert full.stopped == []
    fast = successive_halving(field, rungs, streaming_scorer(kl, scored), finalists=1, extend=extend_as("fast"))
    assert (fast.winner, fast.finalists, fast.windows) == (full.winner, full.finalists, full.windows)
    bits_only = [c.name for c in field if c.family == "fixed" and c.groups is None]
    if bits_only:  # the best fixed split of bits alone, where descent starts, is exact
        best = min(bits_only, key=seen["full"].get)
        assert min(bits_only, key=seen["fast"].get) == best and seen["fast"][best] == seen["full"][best]
    for name, value in fast.scores.items():
        if name in fast.stopped:
            assert value <= full.scores[name] + 1e-12
        else:
            assert value == pytest.approx(full.scores[name], rel=1e-12)
    assert len(scored) <= len(scored_full)


def test_stopping_early_saves_the_hopeless_candidates_most_of_their_rung():
    field = [candidate("good", 1, 1), candidate("fine", 2, 2), candidate("awful", 3, 3),
             candidate("K1V3", 4, 4, family="fixed"), candidate("K2V2", 5, 5, family="fixed"),
             candidate("K3V1", 6, 6, family="fixed")]
    per_token = {"good": 0.01, "fine": 0.02, "awful": 5.0, "K1V3": 9.0, "K2V2": 0.05, "K3V1": 0.06}
    kl = {c.key: [[per_token[c.name]] * 100] for c in field}
    scored = []
    race = successive_halving(field, [4], streaming_scorer(kl, scored), finalists=1,
                              order=lambda c: per_token[c.name])
    assert race.winner == "good" and set(race.stopped) == {"fine", "awful", "K1V3", "K3V1"}
    assert "K2V2" not in race.stopped  # the best fixed split is scored in full
    assert race.scores["K1V3"] < per_token["K1V3"] and race.scores["K2V2"] == pytest.approx(0.05)
    # good and K2V2 in full; fine until past good's 1.0; K3V1 until past K2V2's 5.0; the awful two after a token
    assert len(scored) == 100 + 51 + 1 + 1 + 100 + 84


def test_race_ties_go_to_the_first_entered_and_bad_fields_are_refused():
    field = [candidate("p", 1, 2), candidate("q", 2, 1)]
    race = successive_halving(field, [1, 1], fake_scorer({(1, 2): [1, 1], (2, 1): [1, 1]}, []), finalists=1)
    assert race.winner == "p"
    with pytest.raises(ValueError, match="unique"):
        successive_halving([field[0], field[0]], [1], fake_scorer({(1, 2): [1]}, []))
    with pytest.raises(ValueError, match="at least one rung"):
        successive_halving(field, [], fake_scorer({}, []))


def test_calibration_candidates_and_kvq_from_a_table():
    layout, settings = resolve_settings("kivi", 2.5, b_min=2, b_max=4, group_size=8, residual_length=8)
    fp = ModelFingerprint.from_model_config(TINY)
    table = torch.rand(2, 2, 2, 1, generator=torch.Generator().manual_seed(0)) * torch.tensor([4.0, 1.0, 0.25])
    cands = calibration_candidates(table, settings, fp)
    assert [c.name for c in cands] == ["ratequant", "ratequant-measured", "ratequant-shrunk", "ratequant-keys-x4",
                                       "K2V3", "K3V2"]
    assert [c.family for c in cands] == ["ratequant"] * 4 + ["fixed"] * 2
    assert all(c.bits.shape == (2, 2, 2) and c.bits.double().mean() == 2.5 for c in cands)
    kvq = kvq_candidate(table, settings.bit_grid, 2.5)
    assert kvq.name == "kvq-beta4" and kvq.bits.shape == (2, 2, 2) and kvq.bits.double().mean() == 2.5


class _NoForward(torch.nn.Module):
    """A model whose forward must not run: `calibrate` has to refuse the settings first."""

    config = TINY

    def forward(self, *args, **kwargs):
        raise AssertionError("the model ran")


class _NoTokenizer:
    def __call__(self, *args, **kwargs):
        raise AssertionError("the tokenizer ran")

    encode = __call__


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=9.5), "budget=9.5 is outside"),
    (dict(budget=2.3), "budget"),  # 8 units cannot average 2.3 bits
    (dict(group_size=64), "head_dim=32"),
    (dict(n_sample=3), "Unknown calibration setting"),
])
def test_calibrate_refuses_bad_settings_before_any_work(kwargs, match):
    start = time.perf_counter()
    with pytest.raises((ValueError, TypeError), match=match):
        calibrate(_NoForward(), _NoTokenizer(), ["unused"], progress=False, **kwargs)
    assert time.perf_counter() - start < 0.5


def test_validate_false_means_no_validation_windows():
    _, settings = resolve_settings(validate=False)
    assert settings.n_validation == 0
    layout, settings = resolve_settings("token", 3, sink_length=0, n_samples=4)
    assert (layout.quantizer, layout.sink_length, settings.budget, settings.n_samples) == ("token", 0, 3, 4)
    check_feasible(layout, settings, ModelFingerprint.from_model_config(TINY))


def test_both_kinds_of_published_record_are_tested():
    assert len(UNVERSIONED) >= 6 and len(VERSIONED) >= 1


@pytest.mark.parametrize("path", UNVERSIONED)
def test_records_written_before_versioning_round_trip(path):
    old = _record(path)
    record = CalibrationRecord.from_dict(old)
    assert record.record_version == 0 and record.families == {}
    assert record.to_dict() == {**old, "record_version": 0, "families": {}}
    assert CalibrationRecord.from_dict(record.to_dict()) == record


@pytest.mark.parametrize("path", VERSIONED)
def test_versioned_records_round_trip(path):
    written = _record(path)
    record = CalibrationRecord.from_dict(written)
    assert record.record_version == written["record_version"] and record.to_dict() == written


def test_newer_records_keep_what_this_version_knows():
    with open(RECORD_FILES[0], encoding="utf-8") as f:
        old = json.load(f)["calibration"]
    newer = {**old, "record_version": RECORD_VERSION + 1, "something_new": [1, 2]}
    record = CalibrationRecord.from_dict(newer)
    assert record.record_version == RECORD_VERSION + 1 and record.winner == old["winner"]
    assert "something_new" not in record.to_dict()
    with pytest.raises(ValueError, match="lacks"):
        CalibrationRecord.from_dict({k: v for k, v in old.items() if k != "winner"})
    with pytest.raises(ValueError, match="record_version"):
        CalibrationRecord.from_dict({**old, "record_version": "1"})
