"""How saved settings and fitted curves lie on disk: a JSON file and a safetensors file named by its content.

The format:

- `ratequant_config.json` (`CONFIG_NAME`): the settings as one JSON object (UTF-8, keys sorted; a byte-order mark is
  tolerated, a key that appears twice in one object is refused). When there are curves it names them under
  `curves_file` (`CURVES_FILE_KEY`): `{"name": "ratequant_curves-<16 hex>.safetensors", "sha256": "<64 hex>"}`.
- `ratequant_curves-<first 16 hex digits of its sha256>.safetensors` (`curves_file_name`): the fitted tensors
  (alpha, beta, sensitivities, ...), present only when there are any.

Saving is atomic without any backup: the curves file is written first (to a hidden temporary name, flushed, renamed);
as its name is its content, it never overwrites the curves the current JSON names. The JSON is then replaced by one
atomic rename, the commit, and only after it are the curves files no longer named removed. A save that fails or is
killed before the commit leaves the previous JSON and the curves it names; after it, the new ones; at worst an unnamed
curves file is left behind, which the next save removes. One process saves into a folder at a time.

Older releases wrote the curves as `ratequant_curves.safetensors` (`CURVES_NAME`), recorded by `curves_sha256`
(`CURVES_HASH_KEY`; null: no curves), or before that by nothing (the file, if any, taken as it is), and a save of
theirs killed midway could leave the committed curves in `.ratequant_curves.safetensors.prev` (`BACKUP_NAME`; empty:
none). All of these folders still read as they did.

Older releases look for the fixed name only, and would load a folder in the new layout as if it had no curves. So a
JSON that names a curves file is written with schema version 3 (`CURVES_LAYOUT_VERSION`), which they refuse with an
"upgrade" message; a config without curves needs no new layout: it records `curves_sha256: null`, as they did, and
keeps the version its settings need, so they still read it.

Only JSON (`json`) and safetensors (`safetensors.torch.load`, from bytes) are ever read: no pickle, no remote code.
Every malformed file ends in a `ValueError` that names it. This module knows nothing of `RateQuantConfig` or of the
Hub: it reads paths and writes folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_NAME = "ratequant_config.json"
CURVES_FILE_KEY = "curves_file"  # in the JSON: {"name": ..., "sha256": ...} of the curves file it belongs to
CURVES_LAYOUT_VERSION = 3  # the schema version of a JSON that names its curves file (older releases cannot find it)
CURVES_NAME = "ratequant_curves.safetensors"  # the fixed name older releases used
CURVES_HASH_KEY = "curves_sha256"  # older releases: sha256 of `CURVES_NAME`; null (still written): no curves
BACKUP_NAME = f".{CURVES_NAME}.prev"  # older releases: the committed curves while a save replaced them (empty: none)
_CURVES_FILE = re.compile(r"ratequant_curves-([0-9a-f]{16})\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CurvesRef:
    """The curves file a JSON belongs to: its `name` in the folder and its `sha256` (None: an old file, unhashed)."""

    name: str
    sha256: str | None


def curves_file_name(sha256: str) -> str:
    """The name of a curves file whose content has this sha256 (hex)."""
    return f"ratequant_curves-{sha256[:16]}.safetensors"


def curves_file_for(curves: dict[str, torch.Tensor] | None) -> str | None:
    """The name `save_folder` gives the file of these curves (None: there are none, so no file)."""
    raw = _serialise_curves(curves)
    return None if raw is None else curves_file_name(hashlib.sha256(raw).hexdigest())


# ---- writing -------------------------------------------------------------------------------------------------------
def save_folder(folder: str | os.PathLike, settings: dict, curves: dict[str, torch.Tensor] | None) -> None:
    """Save `settings` (JSON-serialisable) and `curves` (no file when empty or None) in `folder`, created if needed.

    The curves file is written first, the JSON replaced last by an atomic rename, then the curves files the JSON no
    longer names are removed; other files in the folder are left alone. Nothing is written when either cannot be
    serialised, and a save that raises before the JSON is replaced removes the curves file it added.
    """
    raw_curves = _serialise_curves(curves)
    settings = dict(settings)
    if raw_curves is None:
        settings[CURVES_HASH_KEY] = None  # "no curves", to this release and to older ones
    else:
        sha256 = hashlib.sha256(raw_curves).hexdigest()
        settings[CURVES_FILE_KEY] = {"name": curves_file_name(sha256), "sha256": sha256}
        settings["version"] = max(settings.get("version", 1), CURVES_LAYOUT_VERSION)
    payload = (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode("utf-8")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    added = None
    if raw_curves is not None:
        curves_path = os.path.join(folder, settings[CURVES_FILE_KEY]["name"])
        added = None if os.path.isfile(curves_path) else curves_path
        _write_atomically(curves_path, raw_curves)
        _sync_folder(folder)  # the curves reach the disk before the JSON that names them
    try:
        _write_atomically(os.path.join(folder, CONFIG_NAME), payload)
    except Exception:  # the previous JSON is still the one in place: the file added for the new one is not needed
        if added is not None:
            _remove_quietly(added)
        raise
    _sync_folder(folder)
    _remove_unnamed_curves(folder, keep=None if raw_curves is None else settings[CURVES_FILE_KEY]["name"])


def _serialise_curves(curves: dict[str, torch.Tensor] | None) -> bytes | None:
    if not curves:
        return None
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in curves.items()}, metadata={"format": "pt"})


def _write_atomically(path: str, data: bytes) -> None:
    """Replace `path` by `data`: written to a hidden temporary name next to it, flushed, then renamed."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{secrets.token_hex(6)}-{name}")  # never read as a config, never uploaded
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove_quietly(tmp)


def _remove_unnamed_curves(folder: str, keep: str | None) -> None:
    """Remove the curves files (of this layout or an older one) other than `keep`, the one the JSON names."""
    for name in sorted(os.listdir(folder)):
        if name != keep and (name in (CURVES_NAME, BACKUP_NAME) or _CURVES_FILE.fullmatch(name)):
            _remove_quietly(os.path.join(folder, name))


def _sync_folder(folder: str) -> None:
    """Make the renames in `folder` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---- reading -------------------------------------------------------------------------------------------------------
def read_folder(folder: str) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """The settings (without the curves reference) and the curves (None: none) saved in a local `folder`."""
    config_path = os.path.join(folder, CONFIG_NAME)
    settings, ref = read_settings(config_path)
    if ref is None:
        return settings, None
    curves_path = os.path.join(folder, ref.name)
    if ref.name == CURVES_NAME and os.path.isfile(os.path.join(folder, BACKUP_NAME)):
        curves_path = _interrupted_old_save(folder, ref)
        if curves_path is None:
            return settings, None  # an empty backup: the committed config had no curves
    return settings, read_curves(ref, curves_path, config_path)


def _interrupted_old_save(folder: str, ref: CurvesRef) -> str | None:
    """Which file holds the committed curves (None: none) after an older release's save was killed midway.

    Its JSON names the curves by hash, or (older still) not at all: then the backup is the committed one."""
    curves_path, backup_path = os.path.join(folder, CURVES_NAME), os.path.join(folder, BACKUP_NAME)
    if ref.sha256 is None:
        return backup_path if os.path.getsize(backup_path) else None
    with open(backup_path, "rb") as f:
        return backup_path if hashlib.sha256(f.read()).hexdigest() == ref.sha256 else curves_path


def read_settings(config_path: str) -> tuple[dict, CurvesRef | None]:
    """The settings of a config file, without the curves reference, and the curves file it names (None: none).

    Raises `ValueError`, naming the file, for a file that is not a JSON object or a curves reference that is malformed.
    """
    data = _read_json_object(config_path)
    if CURVES_FILE_KEY in data and CURVES_HASH_KEY in data:
        raise ValueError(f"{config_path} has both {CURVES_FILE_KEY} and {CURVES_HASH_KEY}: which curves belong to it "
                         "is ambiguous. Save the config again.")
    if CURVES_FILE_KEY in data:
        return data, _new_curves_ref(data.pop(CURVES_FILE_KEY), config_path)
    if CURVES_HASH_KEY not in data:
        return data, CurvesRef(CURVES_NAME, None)  # from before the hash was recorded: the file, if any, as it is
    recorded = data.pop(CURVES_HASH_KEY)
    if recorded is None:
        return data, None
    if not isinstance(recorded, str) or not _SHA256.fullmatch(recorded):
        raise ValueError(f"{config_path}: {CURVES_HASH_KEY}={short_repr(recorded)} must be the sha256 (64 lowercase "
                         f"hex digits) of the {CURVES_NAME} saved with it, or null. Save the config again.")
    return data, CurvesRef(CURVES_NAME, recorded)


def _new_curves_ref(value: Any, config_path: str) -> CurvesRef | None:
    if value is None:
        return None
    sha256 = value.get("sha256") if isinstance(value, dict) else None
    if not (isinstance(sha256, str) and _SHA256.fullmatch(sha256) and set(value) == {"name", "sha256"}
            and value["name"] == curves_file_name(sha256)):
        raise ValueError(f"{config_path}: {CURVES_FILE_KEY}={short_repr(value)} must be null or "
                         '{"name": "ratequant_curves-<first 16 hex digits of sha256>.safetensors", "sha256": "<64 '
                         'lowercase hex digits>"}, naming the curves file saved with it. Save the config again.')
    return CurvesRef(value["name"], sha256)


def read_curves(ref: CurvesRef, curves_path: str | None, config_path: str) -> dict[str, torch.Tensor] | None:
    """The curves `ref` names, read from `curves_path`; None when there are none to read.

    Args:
        ref (`CurvesRef`): what the JSON at `config_path` says of its curves.
        curves_path (`str`, *optional*): where the file is or would be; None when it could not be had (a Hub repo
            without it, or offline): the settings are then loaded without curves, with a warning if they name some.

    Raises `ValueError`, naming the file, for curves that are not safetensors or do not match the recorded hash.
    """
    if curves_path is None or not os.path.isfile(curves_path):
        if ref.sha256 is None:
            return None  # an old JSON that records nothing, and no curves file: none
        if curves_path is None:
            logger.warning("%s names fitted curves but %s could not be downloaded: loading the allocation without "
                           "them.", config_path, ref.name)
            return None
        raise ValueError(f"{config_path} names fitted curves (sha256 {ref.sha256[:12]}...) but there is no "
                         f"{curves_path}: copy the config's files together, or save it again.")
    with open(curves_path, "rb") as f:
        raw = f.read()
    curves = _parse_curves(raw, curves_path)
    if ref.sha256 is not None and hashlib.sha256(raw).hexdigest() != ref.sha256:
        raise ValueError(f"{curves_path} does not belong to {config_path}: its sha256 is "
                         f"{hashlib.sha256(raw).hexdigest()[:12]}..., the config records {ref.sha256[:12]}.... The "
                         "curves were replaced or edited after the config was saved, or the files come from "
                         "different saves. Save the config again, or download its files again.")
    return curves


def _read_json_object(path: str) -> dict:
    """The JSON object of a config file; anything else is a `ValueError` naming the file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is harmless
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): it is not a {CONFIG_NAME} or it "
                         "is corrupted. Save the config again.") from e
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError as e:
        raise ValueError(f"{path} is not a valid config: its JSON is nested too deeply to read.") from e
    except ValueError as e:  # JSONDecodeError, a duplicate key, an integer too long to convert
        raise ValueError(f"{path} is not valid JSON: {e}. Save the config again, or fix the file by hand.") from e
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ValueError(f"{path} must hold a JSON object of settings ({{\"key_bits\": ..., ...}}), not {kind}.")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object (which one is meant is ambiguous)")
        out[key] = value
    return out


def _parse_curves(raw: bytes, path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(raw)
    except Exception as e:  # safetensors raises its own error type for truncated or corrupted files
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupted. Save the "
                         "config again, or re-download it with a fresh cache.") from e


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr` of a bad value for an error message, cut to `limit` characters, with its type."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{text} ({type(value).__name__})"


__all__ = [
    "BACKUP_NAME", "CONFIG_NAME", "CURVES_FILE_KEY", "CURVES_HASH_KEY", "CURVES_LAYOUT_VERSION", "CURVES_NAME",
    "CurvesRef", "curves_file_for", "curves_file_name", "read_curves", "read_folder", "read_settings", "save_folder",
    "short_repr",
]
