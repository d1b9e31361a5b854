"""Models from GGUF files: a .gguf path or a folder holding one loads as the Hub id would; a file that is not GGUF,
is truncated, or holds an architecture transformers cannot load is refused, naming the file, before any weights
load; the benchmarks' helper assembles a GGUF from part packages, checks its sha256 and caches a safetensors
folder."""

import os
import sys
import time

import pytest
import torch

from hf_ratequant.cli import main
from hf_ratequant.gguf_header import read_gguf_header
from hf_ratequant.models import ModelSource, check_gguf, default_model_path, load_model, resolve_model_source

EMBEDDED = os.path.join(*default_model_path())
SIZE = os.path.getsize(EMBEDDED)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import real_models  # noqa: E402


def _prefix_copy(tmp_path, n: int, name: str = "cut.gguf") -> str:
    path = tmp_path / name
    with open(EMBEDDED, "rb") as src:
        path.write_bytes(src.read(n))
    return str(path)


def test_header_of_the_embedded_gguf():
    start = time.perf_counter()
    header = read_gguf_header(EMBEDDED)
    assert time.perf_counter() - start < 5  # no tensor is mapped, no tokenizer string kept
    assert header.architecture == "llama" and header.n_tensors == 272
    assert header.needed_bytes == SIZE  # the last tensor ends where the file does


@pytest.mark.parametrize("length, words", [
    (3, "is not a GGUF file"),
    (2000, "truncated: its header ends early"),
    (SIZE // 2, f"need {SIZE} bytes, the file has {SIZE // 2}"),
    (SIZE - 1, f"need {SIZE} bytes, the file has {SIZE - 1}"),
])
def test_cut_files_are_refused_naming_the_file_and_the_fix(tmp_path, length, words):
    path = _prefix_copy(tmp_path, length)
    with pytest.raises(ValueError, match=words) as info:
        check_gguf(path)
    assert path in str(info.value) and "sha256" in str(info.value)


def test_not_gguf_at_all(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_gguf(str(path))


def test_architecture_transformers_cannot_load(tmp_path):
    from gguf import GGUFWriter

    path = str(tmp_path / "bert.gguf")
    writer = GGUFWriter(path, "bert")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf_header(path).architecture == "bert"
    with pytest.raises(ValueError, match="'bert' model, which transformers cannot load from GGUF .*llama"):
        check_gguf(path)


def test_sources(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").symlink_to(EMBEDDED)
    assert resolve_model_source(str(one)) == ModelSource(str(one), "m.gguf")
    assert resolve_model_source(str(one / "m.gguf")) == ModelSource(str(one), "m.gguf")
    (one / "n.gguf").symlink_to(EMBEDDED)
    with pytest.raises(FileNotFoundError, match="no config.json and 2 GGUF files .m.gguf, n.gguf."):
        resolve_model_source(str(one))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json and no GGUF file"):
        resolve_model_source(str(empty))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    assert resolve_model_source("org/name") == ModelSource("org/name")


def test_cli_refuses_a_bad_gguf_before_loading(tmp_path, capsys):
    path = _prefix_copy(tmp_path, SIZE // 3)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--model", path, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "truncated" in err and path in err
    assert not (tmp_path / "out").exists()


# ---- the benchmarks' helper for models packaged on PyPI -------------------------------------------------------
def _packaged(tmp_path, monkeypatch, sha256: str) -> real_models.PackagedModel:
    """The embedded GGUF split into two part packages on sys.path, as the real models ship."""
    data = open(EMBEDDED, "rb").read()
    parts = []
    for i, piece in enumerate((data[: SIZE // 2], data[SIZE // 2 :])):
        pkg = tmp_path / "site" / f"fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"p{i}.bin").write_bytes(piece)
        parts.append((f"fake_part{i}", f"data/p{i}.bin"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = real_models.PackagedModel("fake", "SmolLM2 from parts", "fake.gguf", SIZE, sha256, tuple(parts),
                                      "pip install fake-part0 fake-part1")
    monkeypatch.setitem(real_models.MODELS, "fake", model)
    monkeypatch.setenv("HF_RATEQUANT_CACHE", str(tmp_path / "cache"))
    return model


def test_helper_refuses_parts_of_the_wrong_sha256(tmp_path, monkeypatch):
    model = _packaged(tmp_path, monkeypatch, "0" * 64)
    (tmp_path / "work").mkdir()
    with pytest.raises(SystemExit, match=f"sha256 .* expected {SIZE} bytes with sha256 0000.*--force-reinstall"):
        real_models.assemble(model, str(tmp_path / "work"))
    assert os.listdir(tmp_path / "work") == []  # the bad file is not left behind


def test_helper_names_a_missing_part_package(monkeypatch):
    model = real_models.PackagedModel("x", "x", "x.gguf", 1, "0" * 64, (("no_such_part_pkg", "data/a"),), "pip ...")
    with pytest.raises(SystemExit, match="'no_such_part_pkg' is missing .*pip ..."):
        model.part_paths()


def test_helper_converts_once_then_loads_the_safetensors_folder(tmp_path, monkeypatch, smollm):
    """The real path end to end (a GGUF path through load_model, save_pretrained, reload): the same logits as the
    embedded model."""
    import hashlib

    sha = hashlib.sha256(open(EMBEDDED, "rb").read()).hexdigest()
    _packaged(tmp_path, monkeypatch, sha)
    folder = real_models.prepare("fake")
    assert sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".json")))[:2] == [
        "config.json", "generation_config.json"]
    assert not any(f.endswith(".gguf") for f in os.listdir(folder))  # only the converted folder is kept
    assert real_models.label_of(folder) == "SmolLM2 from parts"
    monkeypatch.setattr("hf_ratequant.models.load_model", lambda *a, **k: pytest.fail("converted twice"))
    assert real_models.prepare("fake") == folder  # the second call finds the folder
    monkeypatch.undo()
    model, tokenizer = load_model(folder)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm[0](ids).logits)
