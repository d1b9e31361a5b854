"""Hostile config folders: every way a saved `RateQuantConfig` can be damaged, truncated or forged ends in a
`ValueError` whose message names the file and what is wrong (or loads, where tolerance is the policy: unknown keys,
unknown or missing fitted tensors), never in another exception, never in unpickling, code execution or a write.

Each case starts from a real calibrated config (hub_artifacts/...-kivi-2.5) and changes one thing. A tally of cases
tried and handled cleanly per category is printed at the end of the module.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
import math
import os
import pickle
import shutil
import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from safetensors.torch import save as save_tensors
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from hf_ratequant import RateQuantCache, RateQuantConfig
from hf_ratequant.config import BACKUP_NAME, CONFIG_NAME, CURVES_FILE_KEY, CURVES_HASH_KEY, CURVES_NAME
from hf_ratequant.quantizers import available_quantizers

ARTIFACT = Path(__file__).resolve().parent.parent / "hub_artifacts" / "SmolLM2-135M-Instruct-ratequant-kivi-2.5"
# Most cases damage the artefact in the layout older releases wrote, which every release must read: the curves in
# `CURVES_NAME`, their sha256 recorded in the JSON. The layout this release writes (a content-named curves file that
# the JSON names) has its own cases below (`test_curves_file_reference`).
NEW_TEXT = (ARTIFACT / CONFIG_NAME).read_bytes()
NEW_REF = json.loads(NEW_TEXT)[CURVES_FILE_KEY]
BASE_CURVES_BYTES = (ARTIFACT / NEW_REF["name"]).read_bytes()
BASE = {k: v for k, v in json.loads(NEW_TEXT).items() if k != CURVES_FILE_KEY}
BASE.update({CURVES_HASH_KEY: NEW_REF["sha256"], "version": 2})
BASE_TEXT = (json.dumps(BASE, indent=2, sort_keys=True) + "\n").encode()
BASE.setdefault("sink_length", 0)  # written only when not 0 (schema 2); typed all the same
LAYERS, HEADS = BASE["fingerprint"]["num_layers"], BASE["fingerprint"]["num_kv_heads"]  # 30, 3
INT32_MAX = 2**31 - 1

# category -> [tried, handled cleanly]
TALLY: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


# ---- guards: no unpickling, no code, no writes while loading ------------------------------------------------------
class _Forbidden(BaseException):
    """Raised by the guards; a BaseException so that no `except Exception` in the loader can swallow it."""


_LOADING = {"on": False, "events": []}
FORBIDDEN_EVENTS = ("pickle.find_class", "exec", "compile", "os.system", "subprocess.Popen", "os.exec",
                    "os.posix_spawn", "os.spawn", "os.fork", "ctypes.dlopen", "os.remove", "os.rename", "os.mkdir",
                    "os.replace", "os.truncate", "shutil.rmtree")


def _audit(event: str, args: tuple) -> None:
    if not _LOADING["on"]:
        return
    writes = event == "open" and isinstance(args[1], str) and any(m in args[1] for m in "wax+")
    if event in FORBIDDEN_EVENTS or writes:
        _LOADING["events"].append((event, repr(args)[:200]))


b"\xef\xbb\xbf{}".decode("utf-8-sig")  # the codecs the loader uses are imported before the guard is on
if not getattr(sys, "_hf_ratequant_hostile_hook", False):  # audit hooks cannot be removed: add one per process
    sys.addaudithook(_audit)
    sys._hf_ratequant_hostile_hook = True


@pytest.fixture(scope="module", autouse=True)
def no_pickle():
    """`pickle` and `torch.load` raise for the whole module: nothing on the loading path may use them."""

    def refuse(*args, **kwargs):
        raise _Forbidden("loading a config tried to unpickle")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("load", "loads", "Unpickler"):
            mp.setattr(pickle, name, refuse)
        mp.setattr(torch, "load", refuse)
        mp.setattr(os, "fsync", lambda fd: None)  # the round trips of loaded cases: durability is tested elsewhere
        yield


@pytest.fixture(scope="module", autouse=True)
def tally_report(request):
    yield
    lines = ["", "hostile config files: cases tried / handled cleanly"]
    for category, (tried, clean) in sorted(TALLY.items()):
        lines.append(f"  {category:<28} {tried:6d} / {clean:6d}")
    lines.append(f"  {'total':<28} {sum(t for t, _ in TALLY.values()):6d} / {sum(c for _, c in TALLY.values()):6d}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


# ---- building and loading cases ---------------------------------------------------------------------------------
def write_case(folder: Path, settings: dict | bytes | None = None, curves: dict | bytes | None = None,
               *, rehash: bool = True) -> Path:
    """A config folder: `settings` (a dict is dumped; bytes are written as they are; None: the real file), `curves`
    (a dict of tensors is saved with safetensors; bytes as they are; None: the real file; `False`: no file). With
    `rehash`, a dict `settings` records the sha256 of the curves written, so the check that follows is the one on the
    content rather than the hash."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    raw = BASE_CURVES_BYTES if curves is None else curves
    if isinstance(raw, dict):
        raw = save_tensors(raw, metadata={"format": "pt"})
    if raw is not False:
        (folder / CURVES_NAME).write_bytes(raw)
    if isinstance(settings, dict) or settings is None:
        settings = dict(BASE if settings is None else settings)
        if rehash and raw is not False and CURVES_HASH_KEY in settings and settings[CURVES_HASH_KEY] == BASE.get(
                CURVES_HASH_KEY):
            settings[CURVES_HASH_KEY] = hashlib.sha256(raw).hexdigest()
        settings = json.dumps(settings, allow_nan=True).encode()
    (folder / CONFIG_NAME).write_bytes(settings)
    return folder


def load_guarded(folder: Path) -> RateQuantConfig:
    _LOADING["on"], _LOADING["events"] = True, []
    try:
        return RateQuantConfig.from_pretrained(folder)
    finally:
        _LOADING["on"] = False
        assert not _LOADING["events"], f"loading did something it must never do: {_LOADING['events']}"


def attempt(category: str, folder: Path, expect: str, mention: tuple[str, ...] = (), what: str = "") -> Any:
    """Load `folder`. `expect`: "error" (a ValueError naming the folder's file and one of `mention`), "load", or
    "either" (random damage that may happen to leave a valid file). Returns the config or the error."""
    TALLY[category][0] += 1
    case = f"[{category}] {what}"
    try:
        config = load_guarded(folder)
    except ValueError as e:
        message = str(e)
        assert expect != "load", f"{case}: refused a file that must load: {message}"
        assert str(folder) in message and any(name in message for name in (
            CONFIG_NAME, CURVES_NAME, BACKUP_NAME, NEW_REF["name"])), f"{case}: the message names no file: {message}"
        if CURVES_NAME in mention:  # the schema's own checks of the tensors name the file by its new pattern
            mention = (*mention, "ratequant_curves-<hash>.safetensors")
        assert not mention or any(m in message for m in mention), f"{case}: the message names none of {mention}: " \
                                                                  f"{message}"
        TALLY[category][1] += 1
        return e
    except Exception as e:  # noqa: BLE001 - the point: anything but a ValueError is a failure
        pytest.fail(f"{case}: {type(e).__name__} escaped instead of a ValueError: {e}")
    assert expect != "error", f"{case}: loaded a file that must be refused"
    exercise(config, folder.parent / "resaved")
    TALLY[category][1] += 1
    return config


def exercise(config: RateQuantConfig, folder: Path) -> None:
    """What a loaded config must survive: its bit tables, and a save/load round trip that changes nothing."""
    assert config.bits_tensor().shape == (config.num_layers, config.num_kv_heads, 2)
    config.save_pretrained(folder)
    assert same(RateQuantConfig.from_pretrained(folder), config)


def same(a: RateQuantConfig, b: RateQuantConfig) -> bool:
    """Settings and curves bit for bit (NaN included)."""
    return json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True) and \
        a.curves.keys() == b.curves.keys() and all(_bits(a.curves[k]) == _bits(b.curves[k]) for k in a.curves)


def _bits(t: torch.Tensor) -> tuple:
    return t.dtype, tuple(t.shape), bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


@pytest.fixture(scope="module")
def base_config() -> RateQuantConfig:
    return RateQuantConfig.from_pretrained(ARTIFACT)


@pytest.fixture(scope="module")
def base_curves(base_config) -> dict[str, torch.Tensor]:
    return dict(base_config.curves)


# ---- 1. malformed JSON ------------------------------------------------------------------------------------------
def test_malformed_json(tmp_path):
    deep = 200_000
    cases = {
        "empty file": b"",
        "whitespace": b"  \n\t ",
        "a NUL byte": b"\0",
        "only an opening brace": b"{",
        "array": b"[]",
        "null": b"null",
        "number": b"42",
        "string": b'"key_bits"',
        "true": b"true",
        "NaN literal": b"NaN",
        "-Infinity literal": b"-Infinity",
        "the object in a list": b"[" + BASE_TEXT + b"]",
        "two objects": BASE_TEXT + BASE_TEXT,
        "trailing garbage": BASE_TEXT + b"x",
        "trailing comma": BASE_TEXT.rstrip()[:-1] + b",}",
        "single quotes": b"{'key_bits': [[4]]}",
        "comment": b"// c\n" + BASE_TEXT,
        "unquoted key": b"{key_bits: [[4]]}",
        "duplicate key": b'{"key_bits": [[4]], "key_bits": [[4]], "value_bits": [[4]]}',
        "huge integer literal": b'{"group_size": ' + b"9" * 5000 + b"}",
        "deeply nested array": b"[" * deep,
        "deeply nested field": b'{"calibration": ' + b"[" * deep + b"]" * deep + b"}",
        "python literal": b"{'__class__': 'os.system'}",
        "pickle bytes": pickle.dumps({"key_bits": [[4]]}, protocol=4),
    }
    for what, text in cases.items():
        attempt("malformed JSON", write_case(tmp_path / "c", text), "error", (CONFIG_NAME,), what)
    # Byte-level damage at many places of the real file: deletions and insertions of syntax characters.
    for pos in range(0, len(BASE_TEXT), 557):
        for junk in (b"", b"{", b"}", b"]", b",", b":", b'"', b"\\", b"\0", b"-", b"e"):
            damaged = BASE_TEXT[:pos] + junk + BASE_TEXT[pos + (1 if not junk else 0):]
            attempt("malformed JSON", write_case(tmp_path / "c", damaged), "either", (), f"{junk!r} at byte {pos}")


def test_not_utf8(tmp_path):
    cases = {"latin-1 byte": b"\xe9", "invalid start byte": b"\xff", "truncated sequence": b"\xc3",
             "surrogate": b"\xed\xa0\x80", "overlong encoding": b"\xc0\xaf"}
    for what, junk in cases.items():
        for pos in (0, 1, len(BASE_TEXT) // 2, len(BASE_TEXT) - 1):
            text = BASE_TEXT[:pos] + junk + BASE_TEXT[pos:]
            attempt("non-UTF-8", write_case(tmp_path / "c", text), "error", ("UTF-8",), f"{what} at {pos}")
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        text = BASE_TEXT.decode().encode(encoding)
        attempt("non-UTF-8", write_case(tmp_path / "c", text), "error", ("UTF-8", "JSON"), encoding)
    # A byte-order mark (as some editors write) is tolerated.
    attempt("non-UTF-8", write_case(tmp_path / "c", b"\xef\xbb\xbf" + BASE_TEXT), "load", (), "UTF-8 BOM")


def test_truncated_json(tmp_path):
    lengths = sorted({*range(0, 64), *range(0, len(BASE_TEXT), 211), *range(len(BASE_TEXT) - 64, len(BASE_TEXT))})
    for n in lengths:
        whole = BASE_TEXT[:n].strip() == BASE_TEXT.strip()
        attempt("truncated JSON", write_case(tmp_path / "c", BASE_TEXT[:n]), "load" if whole else "error",
                (CONFIG_NAME,), f"first {n} of {len(BASE_TEXT)} bytes")


# ---- 2. wrong types, ranges, missing and extra keys ------------------------------------------------------------
def _is_int(v, lo, hi=INT32_MAX) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_bits(v) -> bool:
    return type(v) is int and (1 <= v <= 8 or v == 16)


def _is_table(v) -> bool:
    return isinstance(v, list) and len(v) == LAYERS and all(
        isinstance(r, list) and len(r) == HEADS and all(map(_is_bits, r)) for r in v)


def _opt(check):
    return lambda v: v is None or check(v)


# What a value at each place of the file must be (an independent statement of the schema): True = loads.
RULES = {
    "key_bits": _is_table, "value_bits": _is_table,
    "key_bits[]": lambda v: isinstance(v, list) and len(v) == HEADS and all(map(_is_bits, v)),
    "value_bits[]": lambda v: isinstance(v, list) and len(v) == HEADS and all(map(_is_bits, v)),
    "key_bits[][]": _is_bits, "value_bits[][]": _is_bits,
    "quantizer": lambda v: isinstance(v, str) and v in available_quantizers(),
    "group_size": lambda v: _is_int(v, 1) and BASE["residual_length"] % v == 0 and BASE["sink_length"] % v == 0,
    "residual_length": lambda v: _is_int(v, 0) and v % BASE["group_size"] == 0,
    "sink_length": lambda v: _is_int(v, 0) and v % BASE["group_size"] == 0,
    "budget": _opt(lambda v: type(v) in (int, float) and 1 <= v <= 16),
    "b_min": lambda v: _is_bits(v) and v <= BASE["b_max"], "b_max": lambda v: _is_bits(v) and v >= BASE["b_min"],
    "method": lambda v: isinstance(v, str), "calibration": lambda v: isinstance(v, dict),
    "version": lambda v: type(v) is int and v in (1, 2, 3), "fingerprint": lambda v: v is None,
    CURVES_HASH_KEY: lambda v: v is None or v == BASE[CURVES_HASH_KEY],
    "fingerprint.architecture": lambda v: isinstance(v, str),
    "fingerprint.num_layers": lambda v: type(v) is int and v == LAYERS,
    "fingerprint.num_kv_heads": lambda v: type(v) is int and v == HEADS,
    "fingerprint.head_dim": lambda v: _is_int(v, 1),
    "fingerprint.layer_types": lambda v: isinstance(v, list) and len(v) in (0, LAYERS) and all(
        isinstance(t, str) for t in v),
    "fingerprint.layer_types[]": lambda v: isinstance(v, str),
    "fingerprint.sliding_window": _opt(lambda v: _is_int(v, 0)),
    "fingerprint.attention_chunk_size": _opt(lambda v: _is_int(v, 0)),
    "fingerprint.name_or_path": _opt(lambda v: isinstance(v, str)),
    "fingerprint.revision": _opt(lambda v: isinstance(v, str)),
    "fingerprint.model_type": _opt(lambda v: isinstance(v, str)),
}
REQUIRED = {"key_bits", "value_bits", "fingerprint.architecture", "fingerprint.num_layers", "fingerprint.num_kv_heads",
            "fingerprint.head_dim"}


def _paths() -> list[tuple]:
    """Every place of the file that the schema types: top-level fields, fingerprint fields, table rows and cells,
    layer types, and a few free-form calibration entries (which accept anything)."""
    out = [(k,) for k in BASE] + [("fingerprint", k) for k in BASE["fingerprint"]]
    for kind in ("key_bits", "value_bits"):
        out += [(kind, layer) for layer in (0, LAYERS - 1)]
        out += [(kind, 0, 0), (kind, LAYERS // 2, 1), (kind, LAYERS - 1, HEADS - 1)]
    out += [("fingerprint", "layer_types", i) for i in (0, LAYERS - 1)]
    out += [("calibration", k) for k in ("source", "beta_median", "validation_kl", "candidates")]
    return out


def _rule(path: tuple):
    if path[0] == "calibration" and len(path) > 1:
        return lambda v: True  # free-form measurements: kept as they are
    name = ".".join(p for p in path if isinstance(p, str)) + "[]" * sum(isinstance(p, int) for p in path)
    return RULES[name]


def _mention(path: tuple) -> tuple[str, ...]:
    return (path[0],) if path[0] != CURVES_HASH_KEY else (CURVES_HASH_KEY, CURVES_NAME)


def _set(data: dict, path: tuple, value) -> dict:
    """A copy of `data` with `value` at `path` (only the containers on the path are copied)."""
    if not path:
        return value
    data = copy.copy(data)
    data[path[0]] = _set(data[path[0]], path[1:], value)
    return data


WRONG_VALUES = [
    "4", "", "NaN", [], [4], [[4]], [[[4]]], {}, {"x": 1}, None, True, False, 4.0, 4.5, -0.0, math.nan, math.inf,
    -math.inf, 0, -1, 3, 16, 17, 64, 2**31, 10**30, -10**30, 1e308, [4] * HEADS, [[4] * HEADS] * LAYERS,
    [[4] * HEADS] * (LAYERS + 1), ["full_attention"] * LAYERS, "kivi", "0" * 64,
]


def _check_field(tmp_path, category: str, path: tuple, value) -> None:
    ok = _rule(path)(value)
    data = _set(BASE, path, value)
    result = attempt(category, write_case(tmp_path / "c", data, rehash=path[0] != CURVES_HASH_KEY),
                     "load" if ok else "error", _mention(path), f"{'.'.join(map(str, path))} = {value!r:.60}")
    if ok and path[0] == "version":  # a loaded config records the oldest schema that represents it
        assert result.version == (2 if result.sink_length else 1), f"{path}: {value!r} -> {result.version!r}"
    elif ok and path[0] == "sink_length":  # 0 is not written
        assert result.sink_length == value, f"{path}: {value!r} -> {result.sink_length!r}"
    elif ok and path[0] != CURVES_HASH_KEY:  # what loads is what the file said
        node = result.to_dict()
        for key in path:
            node = node[key]
        assert json.dumps(node, sort_keys=True) == json.dumps(value, sort_keys=True), f"{path}: {value!r} -> {node!r}"


def test_wrong_types_and_ranges_of_every_field(tmp_path):
    for path in _paths():
        for value in WRONG_VALUES:
            _check_field(tmp_path, "wrong type or range", path, value)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


@hypothesis_settings(max_examples=400, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(_paths()), value=JSON_VALUES)
def test_any_json_value_in_any_field(tmp_path, path, value):
    _check_field(tmp_path, "wrong type (hypothesis)", path, value)


def test_missing_keys(tmp_path):
    for path in [(k,) for k in BASE] + [("fingerprint", k) for k in BASE["fingerprint"]]:
        data = copy.deepcopy(BASE)
        node = data if len(path) == 1 else data["fingerprint"]
        del node[path[-1]]
        name = ".".join(path)
        attempt("missing key", write_case(tmp_path / "c", data), "error" if name in REQUIRED else "load",
                (path[-1],), f"without {name}")


def test_extra_keys_are_tolerated(tmp_path, base_config):
    extras = {"from_the_future": {"x": [1, 2]}, "curves": {"alpha": [1.0]}, "__class__": "os.system",
              "py/object": "subprocess.Popen", "": None, "k" * 10_000: 1, "ключ": "значение", "nan": math.nan,
              "__reduce__": ["os.system", ["echo pwned"]], "!!python/object/apply:os.system": ["echo pwned"]}
    for key, value in extras.items():
        for where in ("top level", "fingerprint"):
            data = copy.deepcopy(BASE)
            (data if where == "top level" else data["fingerprint"])[key] = value
            loaded = attempt("extra key", write_case(tmp_path / "c", data), "load", (), f"{key[:20]!r} at {where}")
            assert same(loaded, base_config), f"the extra key {key[:20]!r} changed what loads"


def test_schema_versions(tmp_path):
    for version in (6, 99, 10**6, 10**30, "2", "1", "v1", 1.0, 2.5, 0, -1, None, True, False, [], [1], {},
                    math.nan, math.inf):
        attempt("schema version", write_case(tmp_path / "c", _set(BASE, ("version",), version)), "error",
                ("version",), f"version {version!r}")
    newer = attempt("schema version", write_case(tmp_path / "c", _set(BASE, ("version",), 6)), "error")
    assert "newer" in str(newer) and "upgrade" in str(newer)
    # 2 added sink_length, which BASE leaves at its default; 3 the named curves file; 4 per-unit group sizes; 5
    # 8-bit scales
    for version in (1, 2, 3, 4, 5):
        attempt("schema version", write_case(tmp_path / "c", _set(BASE, ("version",), version)), "load")


# ---- 3. shapes that disagree ------------------------------------------------------------------------------------
def _tables(key, value, **fingerprint) -> dict:
    data = _set(_set(BASE, ("key_bits",), key), ("value_bits",), value)
    for name, v in fingerprint.items():
        data = _set(data, ("fingerprint", name), v)
    return data


def test_bit_tables_of_the_wrong_shape(tmp_path):
    good = BASE["key_bits"]
    drop_row, add_row = good[:-1], good + [good[0]]
    drop_head = [row[:-1] for row in good]
    add_head = [row + [4] for row in good]
    ragged = [row if i % 2 else row[:-1] for i, row in enumerate(good)]
    transposed = [list(col) for col in zip(*good)]
    cases = {
        "keys lose a layer": (drop_row, good), "values lose a layer": (good, drop_row),
        "both lose a layer": (drop_row, drop_row), "both gain a layer": (add_row, add_row),
        "keys lose a head": (drop_head, good), "both lose a head": (drop_head, drop_head),
        "both gain a head": (add_head, add_head), "ragged keys": (ragged, good), "ragged both": (ragged, ragged),
        "transposed": (transposed, transposed), "one empty row": (good[:-1] + [[]], good), "empty": ([], []),
        "a list of empty rows": ([[]] * LAYERS, [[]] * LAYERS), "1x1": ([[4]], [[4]]),
        "3-d": ([[[4] * HEADS]] * LAYERS, [[[4] * HEADS]] * LAYERS),
    }
    for what, (key, value) in cases.items():
        attempt("shape mismatch", write_case(tmp_path / "c", _tables(key, value)), "error",
                ("key_bits", "value_bits", "fingerprint"), what)
    # Tables that agree with each other but not with the fingerprint, and a fingerprint that disagrees with itself.
    for layers, heads in ((LAYERS - 1, HEADS), (LAYERS, HEADS + 1), (1, 1), (HEADS, LAYERS)):
        table = [[4] * heads for _ in range(layers)]
        attempt("shape mismatch", write_case(tmp_path / "c", _tables(table, table)), "error", ("fingerprint",),
                f"{layers}x{heads} tables")
        agreeing = _set(_tables(table, table, num_layers=layers, num_kv_heads=heads), (CURVES_HASH_KEY,), None)
        attempt("shape mismatch", write_case(tmp_path / "c", agreeing, curves=False),
                "load" if layers == LAYERS else "error", ("fingerprint.layer_types",),
                f"{layers}x{heads} tables and fingerprint, 30 layer types, no curves")
        with_curves = _set(agreeing, (CURVES_HASH_KEY,), BASE[CURVES_HASH_KEY])
        attempt("shape mismatch", write_case(tmp_path / "c", with_curves), "error",
                ("fingerprint.layer_types", "alpha"), f"{layers}x{heads} tables and fingerprint, 30x3 curves")
    smaller = _tables(drop_row, drop_row, num_layers=LAYERS - 1, layer_types=[])
    attempt("shape mismatch", write_case(tmp_path / "c", _set(smaller, (CURVES_HASH_KEY,), None), curves=False),
            "load", (), "29 layers everywhere, layer types not recorded, no curves")


def _unit(*shape, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_curves_that_disagree_with_the_tables(tmp_path, base_curves):
    n = len(base_curves["bit_grid"])
    wrong = {
        "alpha": [(LAYERS - 1, HEADS, 2), (LAYERS, HEADS + 1, 2), (LAYERS, HEADS, 3), (HEADS, LAYERS, 2),
                  (LAYERS * HEADS * 2,), (0,), (LAYERS, HEADS, 2, 1), (2, LAYERS, HEADS, 2), (LAYERS, HEADS)],
        "beta": [(LAYERS + 1, HEADS, 2), (1, HEADS + 1, 1), (7,)],
        "r2": [(LAYERS, HEADS, 1, 2), (0, HEADS, 2)],
        "distortion": [(LAYERS, HEADS, 2), (LAYERS, HEADS, 2, n + 1), (LAYERS, HEADS, 2, n - 1),
                       (LAYERS - 1, HEADS, 2, n), (LAYERS, HEADS, 1, n), (LAYERS, HEADS, 2, n, 1), (n,)],
    }
    for name, shapes in wrong.items():
        for shape in shapes:
            curves = {**base_curves, name: _unit(*shape)}
            attempt("curves shape mismatch", write_case(tmp_path / "c", curves=curves), "error", (name,),
                    f"{name} {shape}")
    grids = {"longer": torch.arange(2, 3 + n), "shorter": torch.arange(2, 1 + n), "2-d": torch.arange(2, 2 + n)[None],
             "float": torch.arange(2.0, 2.0 + n), "bool": torch.ones(n, dtype=torch.bool),
             "uint8": torch.arange(2, 2 + n, dtype=torch.uint8), "bit-width 0": torch.arange(0, n),
             "bit-width 9": torch.arange(5, 5 + n), "scalar": torch.tensor(4)}
    for what, grid in grids.items():
        attempt("curves shape mismatch", write_case(tmp_path / "c", curves={**base_curves, "bit_grid": grid}),
                "load" if what == "uint8" else "error", ("bit_grid",), f"bit_grid {what}")
    # Shapes that broadcast to (layers, heads, 2) are fine: a single beta for every unit, per-kind values.
    for shape in ((), (1,), (2,), (HEADS, 2), (1, 1, 2)):
        attempt("curves shape mismatch", write_case(tmp_path / "c", curves={**base_curves, "beta": _unit(*shape)}),
                "load", (), f"beta {shape}")


SMOLLM_GEOMETRY = dict(vocab_size=128, hidden_size=576, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=9, num_key_value_heads=HEADS, head_dim=64)


def test_config_refuses_another_model_naming_both(tmp_path):
    folder = write_case(tmp_path / "c")
    others = {
        "one layer fewer": LlamaConfig(**{**SMOLLM_GEOMETRY, "num_hidden_layers": LAYERS - 1}),
        "one layer more": LlamaConfig(**{**SMOLLM_GEOMETRY, "num_hidden_layers": LAYERS + 1}),
        "one kv-head": LlamaConfig(**{**SMOLLM_GEOMETRY, "num_key_value_heads": 1}),
        "nine kv-heads": LlamaConfig(**{**SMOLLM_GEOMETRY, "num_key_value_heads": 9}),
        "other head_dim": LlamaConfig(**{**SMOLLM_GEOMETRY, "head_dim": 32}),
        "sliding window": MistralConfig(**SMOLLM_GEOMETRY, sliding_window=64),
        "other model type": Qwen2Config(**SMOLLM_GEOMETRY),
        "linear attention": LlamaConfig(**SMOLLM_GEOMETRY),
    }
    others["linear attention"].layer_types = ["full_attention", "linear_attention"] * (LAYERS // 2)
    for what, model_config in others.items():
        TALLY["model mismatch"][0] += 1
        with pytest.raises(ValueError) as refused:
            RateQuantCache.from_pretrained(folder, model=SimpleNamespace(config=model_config))
        message = str(refused.value)
        assert model_config.model_type in message, f"{what}: the model is not named: {message}"
        assert "linear_attention" in message or ("llama" in message and ("SmolLM2" in message or "30 layers" in
                                                                          message)), f"{what}: {message}"
        with pytest.raises(ValueError):
            RateQuantConfig.from_pretrained(folder).check_model(model_config)
        TALLY["model mismatch"][1] += 1
    RateQuantCache.from_pretrained(folder, model_config=LlamaConfig(**SMOLLM_GEOMETRY))  # the right model is served


# ---- 4. corrupted safetensors -----------------------------------------------------------------------------------
HEADER_LEN = struct.unpack("<Q", BASE_CURVES_BYTES[:8])[0]
HEADER = json.loads(BASE_CURVES_BYTES[8:8 + HEADER_LEN])


def _with_header(header: dict | bytes, data: bytes | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + (BASE_CURVES_BYTES[8 + HEADER_LEN:] if data is None else data)


def _corrupt_curves(tmp_path, what: str, raw: bytes, expect: str = "error") -> None:
    """The same damaged curves three ways: the JSON records their hash (so the file's content is what is checked),
    records the real file's hash (a mismatch), or records none (an older save)."""
    for variant, settings, rehash in (("hash of the damaged file", None, True),
                                      ("hash of the good file", None, False),
                                      ("no hash recorded", {k: v for k, v in BASE.items() if k != CURVES_HASH_KEY},
                                       True)):
        mismatch = variant == "hash of the good file" and raw != BASE_CURVES_BYTES
        attempt("corrupted safetensors", write_case(tmp_path / "c", settings, raw, rehash=rehash),
                "error" if mismatch else expect, (CURVES_NAME,), f"{what} ({variant})")


def test_bad_header_length(tmp_path):
    body = BASE_CURVES_BYTES[8:]
    for length in (0, 1, 7, HEADER_LEN - 1, HEADER_LEN + 1, len(body), len(body) + 1, 2**31, 2**32, 100_000_001,
                   2**63 - 1, 2**64 - 1):
        _corrupt_curves(tmp_path, f"header length {length}", struct.pack("<Q", length) + body)
    for n in (0, 1, 4, 7, 8):
        _corrupt_curves(tmp_path, f"{n}-byte file", BASE_CURVES_BYTES[:n])


def test_header_not_json_or_wrong(tmp_path):
    bad_headers = [b"", b"{", b"[]", b"null", b"42", b'"x"', b"\xff\xfe", b"{'alpha': 1}", b"{}" + b" " * 3 + b"x",
                   pickle.dumps({"alpha": 1})]
    for header in bad_headers:
        _corrupt_curves(tmp_path, f"header {header[:20]!r}", _with_header(header))
    entries = {name: spec for name, spec in HEADER.items() if name != "__metadata__"}
    first = sorted(entries)[0]
    for field, values in {"dtype": ["F128", "float32", "", "f32", 5, None, ["F32"], "I4"],
                          "shape": [[-1], "30", [30.0, 3, 2], [2**62, 2**62], None, {}, [0]],
                          "data_offsets": [[0], [0, 10**12], [10**12, 10**12 + 4], [8, 4], [-4, 4], "0,4", None,
                                           [0, 4, 8], [1, 5]]}.items():
        for value in values:
            header = copy.deepcopy(HEADER)
            header[first][field] = value
            _corrupt_curves(tmp_path, f"{first}.{field} = {value!r}", _with_header(header))
    for what, header in {"metadata not strings": {**HEADER, "__metadata__": {"format": 5}},
                         "metadata a list": {**HEADER, "__metadata__": ["pt"]},
                         "entry not an object": {**HEADER, first: [1, 2]},
                         "a tensor missing its bytes": {**HEADER, "ghost": {"dtype": "F32", "shape": [1000],
                                                                            "data_offsets": [0, 4000]}},
                         "overlapping tensors": {**HEADER, "twin": dict(HEADER[first])}}.items():
        _corrupt_curves(tmp_path, what, _with_header(header))


def test_truncated_and_flipped_curves(tmp_path):
    size = len(BASE_CURVES_BYTES)
    lengths = sorted({*range(0, 24), *range(8 + HEADER_LEN - 4, 8 + HEADER_LEN + 4), *range(0, size, 173), size - 1})
    for n in lengths:
        _corrupt_curves(tmp_path, f"first {n} of {size} bytes", BASE_CURVES_BYTES[:n])
    for pos in range(0, 8 + HEADER_LEN, 13):  # one byte of the length prefix or the header changed
        raw = bytearray(BASE_CURVES_BYTES)
        raw[pos] ^= 0x5A
        for variant, settings, rehash in (("hash of the damaged file", None, True), ("hash of the good file", None,
                                                                                       False)):
            attempt("corrupted safetensors", write_case(tmp_path / "c", settings, bytes(raw), rehash=rehash),
                    "either" if rehash else "error", (CURVES_NAME,), f"byte {pos} flipped ({variant})")
    for pos in range(8 + HEADER_LEN, size, 101):  # a data byte changed: only the recorded hash can tell
        raw = bytearray(BASE_CURVES_BYTES)
        raw[pos] ^= 0x01
        attempt("corrupted safetensors", write_case(tmp_path / "c", None, bytes(raw), rehash=False), "error",
                ("sha256",), f"data byte {pos} flipped")


def test_wrong_dtypes_missing_and_extra_tensors(tmp_path, base_curves, base_config):
    for name in ("alpha", "beta", "r2", "distortion"):
        for dtype in (torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool):
            curves = {**base_curves, name: base_curves[name].to(dtype)}
            _corrupt_curves(tmp_path, f"{name} as {dtype}", save_tensors(curves))
        for dtype in (torch.float16, torch.bfloat16, torch.float64):  # any floating point type is a curve
            curves = {**base_curves, name: base_curves[name].to(dtype)}
            _corrupt_curves(tmp_path, f"{name} as {dtype}", save_tensors(curves), expect="load")
    # Fitted tensors are optional: a file lacking some of them (or all) loads with what it has.
    for name in base_curves:
        curves = {k: v for k, v in base_curves.items() if k != name}
        loaded = attempt("missing or extra tensors", write_case(tmp_path / "c", curves=curves), "load", (),
                         f"without {name}")
        assert sorted(loaded.curves) == sorted(curves)
    attempt("missing or extra tensors", write_case(tmp_path / "c", curves={}), "load", (), "no tensors at all")
    # Unknown tensors are kept as they are (forward compatibility).
    extras = {"sensitivity": torch.rand(LAYERS, HEADS, 2), "zzz": torch.zeros(3, dtype=torch.int8),
              "from_the_future": torch.ones(2, 2, dtype=torch.bfloat16), "flag": torch.tensor([True]),
              "big": torch.zeros(7, 11, 13)}
    for name, tensor in extras.items():
        loaded = attempt("missing or extra tensors", write_case(tmp_path / "c", curves={**base_curves, name: tensor}),
                         "load", (), f"extra {name}")
        assert torch.equal(loaded.curves[name], tensor) and loaded.to_dict() == base_config.to_dict()


def test_non_finite_fitted_values_load_as_they_are(tmp_path, base_curves):
    """The loader uses none of the fitted values (they document the calibration), so NaN and inf are kept."""
    for name in ("alpha", "beta", "r2", "distortion"):
        for value in (math.nan, math.inf, -math.inf):
            for where in ("one", "all"):
                tensor = base_curves[name].clone()
                if where == "one":
                    tensor.view(-1)[5] = value
                else:
                    tensor.fill_(value)
                loaded = attempt("non-finite curves", write_case(tmp_path / "c", curves={**base_curves, name: tensor}),
                                 "load", (), f"{where} {name} = {value}")
                assert torch.equal(loaded.curves[name].isnan(), tensor.isnan())


# ---- 5. never unpickled, never executed -------------------------------------------------------------------------
class _Boom:
    """Unpickling this creates a marker folder: proof that something was unpickled."""

    marker: Path = Path()

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_nothing_is_unpickled_or_executed(tmp_path, base_curves):
    import io

    _Boom.marker = tmp_path / "pwned"
    payload = pickle.dumps(_Boom())
    torch_file = io.BytesIO()
    torch.save(base_curves, torch_file)
    metadata_code = {"format": "pt", "code": "__import__('os').system('touch pwned')", "pickle": payload.hex()}
    cases = {  # what: (settings, curves, expect)
        "curves file is a pickle": (None, payload, "error"),
        "curves file is a torch.save archive": (None, torch_file.getvalue(), "error"),
        "config file is a pickle": (payload, None, "error"),
        "safetensors metadata holds code (ignored)": (None, _with_header({**HEADER, "__metadata__": metadata_code}),
                                                      "load"),
        "a tensor named like code (kept as data)": (None, save_tensors(
            {**base_curves, "__import__('os').system('x')": torch.zeros(1)}), "load"),
        "JSON with a py/object (kept as data)": (_set(BASE, ("calibration",), {"py/object": "os.system", "py/reduce": [
            {"py/function": "os.system"}, {"py/tuple": ["touch pwned"]}]}), None, "load"),
        "JSON with a pickle string (kept as data)": (_set(BASE, ("method",), payload.decode("latin-1")), None, "load"),
        "quantizer naming a function": (_set(BASE, ("quantizer",), "os.system"), None, "error"),
    }
    for what, (settings, curves, expect) in cases.items():
        variants = {"hash recorded": settings}
        if not isinstance(settings, bytes):
            variants["no hash recorded"] = {k: v for k, v in (settings or BASE).items() if k != CURVES_HASH_KEY}
        for variant, data in variants.items():
            attempt("pickle or code", write_case(tmp_path / "c", data, curves), expect, (), f"{what} ({variant})")
            assert not _Boom.marker.exists(), f"{what}: something was unpickled"
    # A backup left by an interrupted save is held to the same standard when it is the one that loads (a JSON
    # without the hash), and ignored when the recorded hash picks the curves file.
    legacy = {k: v for k, v in BASE.items() if k != CURVES_HASH_KEY}
    for what, raw in {"pickle": payload, "truncated": BASE_CURVES_BYTES[:100], "garbage": b"\x00" * 64}.items():
        for settings, expect in ((legacy, "error"), (None, "load")):
            folder = write_case(tmp_path / "c", settings)
            (folder / BACKUP_NAME).write_bytes(raw)
            attempt("pickle or code", folder, expect, (BACKUP_NAME,), f"backup is {what}")
    assert not _Boom.marker.exists()


def test_odd_files(tmp_path):
    """Not regular files: a folder or a device where a file should be. Reading never blocks on them."""
    legacy = {k: v for k, v in BASE.items() if k != CURVES_HASH_KEY}
    for what, make in {"a folder": lambda p: p.mkdir(), "a link to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
                       "a dangling link": lambda p: p.symlink_to(tmp_path / "nowhere")}.items():
        for settings, expect in ((None, "error"), (legacy, "load")):  # the hash says curves are needed, or not
            folder = write_case(tmp_path / "c", settings, curves=False)
            make(folder / CURVES_NAME)
            attempt("odd files", folder, expect, (CURVES_NAME,), f"curves file is {what}")
        folder = write_case(tmp_path / "c", b"{}")
        (folder / CONFIG_NAME).unlink()
        make(folder / CONFIG_NAME)
        TALLY["odd files"][0] += 1
        with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
            load_guarded(folder)
        TALLY["odd files"][1] += 1


# ---- 6. the curves file the JSON names (the layout this release writes) -----------------------------------------
def write_new_case(folder: Path, ref=None, curves: bytes | None = None, *, name: str | None = None) -> Path:
    """The artefact in the current layout: `ref` the JSON's `curves_file` (None: the real one), `curves` the bytes
    written under `name` (None: the real bytes and name)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / (name or NEW_REF["name"])).write_bytes(BASE_CURVES_BYTES if curves is None else curves)
    settings = {**json.loads(NEW_TEXT), CURVES_FILE_KEY: NEW_REF if ref is None else ref}
    (folder / CONFIG_NAME).write_text(json.dumps(settings))
    return folder


def test_curves_file_reference(tmp_path, base_config):
    """Every malformed `curves_file` is refused naming it; a name is never a path; the file must hash as named."""
    sha, other = NEW_REF["sha256"], hashlib.sha256(b"other").hexdigest()
    bad_refs = ["x", 3, [], {}, {"name": NEW_REF["name"]}, {"sha256": sha}, {**NEW_REF, "extra": 1},
                {**NEW_REF, "sha256": sha.upper()}, {**NEW_REF, "sha256": sha[:63]}, {**NEW_REF, "name": CURVES_NAME},
                {**NEW_REF, "name": "../" + NEW_REF["name"]}, {**NEW_REF, "name": str(ARTIFACT / NEW_REF["name"])},
                {**NEW_REF, "name": NEW_REF["name"].upper()}, {"name": NEW_REF["name"], "sha256": other},
                {**NEW_REF, "name": f"ratequant_curves-{other[:16]}.safetensors"}, {**NEW_REF, "name": None}]
    for ref in bad_refs:
        attempt("curves file reference", write_new_case(tmp_path / "c", ref), "error", (CURVES_FILE_KEY,),
                f"curves_file = {ref!r:.60}")
    both = write_new_case(tmp_path / "c")
    (both / CONFIG_NAME).write_text(json.dumps({**json.loads(NEW_TEXT), CURVES_HASH_KEY: sha}))
    attempt("curves file reference", both, "error", (CURVES_FILE_KEY,), "curves_file and curves_sha256")
    none = attempt("curves file reference", write_new_case(tmp_path / "c", ref=False), "error", (CURVES_FILE_KEY,),
                   "curves_file = false")
    assert "null" in str(none)
    loaded = attempt("curves file reference", write_new_case(tmp_path / "c"), "load", (), "the artefact as it is")
    assert same(loaded, base_config)
    stale = write_new_case(tmp_path / "c")  # files of an older layout beside it are not read
    (stale / CURVES_NAME).write_bytes(b"garbage")
    (stale / BACKUP_NAME).write_bytes(b"garbage")
    assert same(attempt("curves file reference", stale, "load", (), "stale files of the older layout"), base_config)
    other_curves = save_tensors({"alpha": torch.ones(LAYERS, HEADS, 2)})
    for what, raw in {"other curves": other_curves, "truncated": BASE_CURVES_BYTES[:-1], "empty": b"",
                      "byte flipped": BASE_CURVES_BYTES[:-2] + b"!" + BASE_CURVES_BYTES[-1:]}.items():
        attempt("curves file reference", write_new_case(tmp_path / "c", curves=raw), "error", (NEW_REF["name"],),
                f"curves file {what}")
    missing = write_new_case(tmp_path / "c", name="unrelated.safetensors")
    attempt("curves file reference", missing, "error", (NEW_REF["name"],), "curves file missing")
    for what, make in {"a folder": lambda p: p.mkdir(), "a link to /dev/zero": lambda p: p.symlink_to("/dev/zero")
                       }.items():
        folder = write_new_case(tmp_path / "c", name="unrelated.safetensors")
        make(folder / NEW_REF["name"])
        attempt("curves file reference", folder, "error", (NEW_REF["name"],), f"curves file is {what}")
    null = write_new_case(tmp_path / "c", ref=None)
    (null / CONFIG_NAME).write_text(json.dumps({**json.loads(NEW_TEXT), CURVES_FILE_KEY: None}))
    assert not attempt("curves file reference", null, "load", (), "curves_file = null").curves


def test_the_guards_catch_what_they_guard():
    with pytest.raises(_Forbidden):
        pickle.loads(pickle.dumps(1))
    with pytest.raises(_Forbidden):
        torch.load(ARTIFACT / NEW_REF["name"])
    _LOADING["on"] = True
    try:
        compile("1", "x", "eval")
        with open(ARTIFACT / CONFIG_NAME, "rb"):
            pass  # reading is fine
    finally:
        _LOADING["on"] = False
    assert [event for event, _ in _LOADING["events"]] == ["compile"]


def test_every_category_was_handled_cleanly():
    """The totals (printed at the end of the module): every case tried ended as expected."""
    assert TALLY, "run the whole module to get the tally"
    for category, (tried, clean) in TALLY.items():
        assert tried == clean, f"{category}: {tried - clean} of {tried} cases ended in an unexpected way"
