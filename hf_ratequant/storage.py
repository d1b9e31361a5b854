"""How a `RateQuantConfig` is stored on disk: two files in one folder, replaced together as a pair.

The format:

- `ratequant_config.json` (`CONFIG_NAME`): the settings as one JSON object (UTF-8, keys sorted; a byte-order mark is
  tolerated, a key that appears twice in one object is refused). It also records `curves_sha256`
  (`CURVES_HASH_KEY`): the sha256 of the curves file saved with it, or `null` when it was saved without one. A file
  from before this key existed has none: its curves are taken as they are (from the backup below, if there is one).
- `ratequant_curves.safetensors` (`CURVES_NAME`): the fitted tensors (alpha, beta, sensitivities, ...), present only
  when there are any.

Saving replaces both files so that a save that fails, or a process killed at any moment, leaves either the old pair or
the new one, never new settings with old curves or the reverse (see `write_pair`). Both files are first written
(and flushed) under hidden temporary names; the curves that belong to the current JSON are then kept aside in
`.ratequant_curves.safetensors.prev` (`BACKUP_NAME`; an empty file when that JSON has no curves); the curves file is
replaced (or removed, when the new config has none); the folder is synced so these renames reach the disk before the
JSON is renamed into place, last, which is the commit; the backup is removed. Until the commit, the
folder holds the old JSON, whose recorded hash names the old curves: if the curves file no longer matches, the reader
takes them from the backup (`read_pair`). After the commit the new JSON names the new curves, which are already in
place. A later save finds an interrupted one's backup and keeps it rather than the new curves next to it.

Only JSON (`json`) and safetensors (`safetensors.torch.load`, from bytes) are ever read: no pickle, no remote code.
Every malformed file ends in a `ValueError` that names it. Where the files come from (a local folder or a Hub
download) is the caller's business: this module reads paths and writes folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_NAME = "ratequant_config.json"
CURVES_NAME = "ratequant_curves.safetensors"
CURVES_HASH_KEY = "curves_sha256"  # in the JSON: sha256 of the curves file saved with it, or null for none
BACKUP_NAME = f".{CURVES_NAME}.prev"  # the committed curves while a save is replacing them (empty file: none)
_UNRECORDED = object()  # a JSON written before the curves hash was recorded


# ---- the interface -------------------------------------------------------------------------------------------------
def pair_paths(folder: str) -> tuple[str, str, str]:
    """The paths of the settings, the curves and the curves backup of the config saved in `folder`."""
    return os.path.join(folder, CONFIG_NAME), os.path.join(folder, CURVES_NAME), os.path.join(folder, BACKUP_NAME)


def write_pair(folder: str | os.PathLike, settings: dict, curves: dict[str, torch.Tensor] | None) -> None:
    """Save `settings` (JSON-serialisable) and `curves` (no file when empty or None) in `folder`, created if needed.

    The JSON records the sha256 of the curves under `CURVES_HASH_KEY`; the two files replace the previous pair all or
    nothing, and other files in the folder are left alone. Nothing is written when either cannot be serialised.
    """
    from safetensors.torch import save

    raw_curves = None
    if curves:
        tensors = {k: v.detach().cpu().contiguous() for k, v in curves.items()}
        raw_curves = save(tensors, metadata={"format": "pt"})
    settings = {**settings, CURVES_HASH_KEY: None if raw_curves is None else hashlib.sha256(raw_curves).hexdigest()}
    payload = (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode("utf-8")
    os.makedirs(folder, exist_ok=True)
    _save_pair(os.fspath(folder), payload, raw_curves)


def read_pair(
    config_path: str, curves_path: str | None, backup_path: str | None = None
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """The settings (without `CURVES_HASH_KEY`) and the curves (None: the config has none) of a saved pair.

    Args:
        config_path (`str`): the JSON file.
        curves_path (`str`, *optional*): where its curves file is or would be; None when it could not be had (a Hub
            repo without it, or offline): the settings are then loaded without curves, with a warning if they record
            some.
        backup_path (`str`, *optional*): where an interrupted save keeps the committed curves (local folders only).

    Raises `ValueError`, naming the file, for a file that is not valid JSON or safetensors, or curves that do not
    match the hash the JSON records.
    """
    data = _read_settings(config_path)
    recorded = _recorded_curves_hash(data, config_path)
    if curves_path is None and isinstance(recorded, str):  # a Hub repo without the file, or offline
        logger.warning("%s records fitted curves but %s could not be downloaded: loading the allocation without "
                       "them.", config_path, CURVES_NAME)
        recorded = None
    raw, source = _committed_curves(curves_path, backup_path, recorded, config_path)
    return data, None if raw is None else _parse_curves(raw, source)


# ---- reading files -------------------------------------------------------------------------------------------------
def _read_settings(path: str) -> dict:
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


def _recorded_curves_hash(data: dict, config_path: str) -> Any:
    """Pop the curves hash from `data`: a hex digest, None (saved without curves) or `_UNRECORDED` (older file)."""
    recorded = data.pop(CURVES_HASH_KEY, _UNRECORDED)
    if recorded is None or recorded is _UNRECORDED:
        return recorded
    if not isinstance(recorded, str) or not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise ValueError(f"{config_path}: {CURVES_HASH_KEY}={_short(recorded)} must be the sha256 (64 lowercase hex "
                         f"digits) of the {CURVES_NAME} saved with it, or null. Save the config again.")
    return recorded


def _committed_curves(
    curves_path: str | None, backup_path: str | None, recorded: Any, config_path: str
) -> tuple[bytes | None, str | None]:
    """The bytes and path of the curves file that belongs to the settings, `(None, None)` for none.

    The JSON names its curves by hash; while a save is under way (or after one was killed) the folder may hold the new
    curves next to the old settings, with the old curves kept in `BACKUP_NAME`, which is then the one used.
    """
    if recorded is None:
        return None, None
    has_backup = backup_path is not None and os.path.isfile(backup_path)
    has_curves = curves_path is not None and os.path.isfile(curves_path)
    if recorded is _UNRECORDED:  # an older file, or one whose save was interrupted: only a backup can tell
        if has_backup:
            raw = _read_bytes(backup_path)
            return (raw, backup_path) if raw else (None, None)  # an empty backup: the config had no curves
        return (_read_bytes(curves_path), curves_path) if has_curves else (None, None)
    for path, present in ((curves_path, has_curves), (backup_path, has_backup)):
        if present:
            raw = _read_bytes(path)
            if hashlib.sha256(raw).hexdigest() == recorded:
                return raw, path
    if not has_curves:
        raise ValueError(f"{config_path} records fitted curves (sha256 {recorded[:12]}...) but there is no "
                         f"{curves_path}: copy both files of the config together, or save it again.")
    raw = _read_bytes(curves_path)
    _parse_curves(raw, curves_path)  # an unreadable file is the more specific diagnosis
    raise ValueError(f"{curves_path} does not belong to {config_path}: its sha256 is "
                     f"{hashlib.sha256(raw).hexdigest()[:12]}..., the config records {recorded[:12]}.... The curves "
                     "were replaced or edited after the config was saved, or the two files come from different "
                     "saves. Save the config again, or download both files again.")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _parse_curves(raw: bytes, path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(raw)
    except Exception as e:  # safetensors raises its own error type for truncated or corrupted files
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupted. Save the "
                         "config again, or re-download it with a fresh cache.") from e


# ---- saving both files as a pair -----------------------------------------------------------------------------------
def _save_pair(folder: str, settings: bytes, curves: bytes | None) -> None:
    """Replace the config in `folder` by `settings` and `curves` (None: no curves file), all or nothing.

    1. Both files are written to temporary names (and flushed to disk): a failure here changes nothing.
    2. The curves that belong to the current JSON are kept aside in `BACKUP_NAME` (an empty file when it has none).
    3. The curves file is replaced (or removed): the current JSON still loads, from the backup.
    4. The JSON is replaced: the commit. 5. The backup is removed.
    A failure in 2-4 puts the previous curves back; a kill leaves a folder that `read_pair` reads as before.
    """
    config_path, curves_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, CURVES_NAME)
    backup_path = os.path.join(folder, BACKUP_NAME)
    temps = [_write_temp(folder, CONFIG_NAME, settings)]
    kept = committed = False
    try:
        if curves is not None:
            temps.append(_write_temp(folder, CURVES_NAME, curves))
        kept = _keep_committed_curves(folder)
        if curves is not None:
            os.replace(temps[1], curves_path)
        elif os.path.exists(curves_path):
            os.remove(curves_path)
        _sync_folder(folder)
        os.replace(temps[0], config_path)
        committed = True
        _sync_folder(folder)
    except BaseException:
        if kept and not committed:
            _restore_backup(curves_path, backup_path)
        raise
    finally:
        for tmp in temps:
            _remove_quietly(tmp)
    _remove_quietly(backup_path)


def _keep_committed_curves(folder: str) -> bool:
    """Copy the curves the current JSON uses to `BACKUP_NAME`; False when there is no loadable JSON to keep."""
    config_path, backup_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, BACKUP_NAME)
    try:
        data = _read_settings(config_path)
        raw, source = _committed_curves(os.path.join(folder, CURVES_NAME), backup_path,
                                        _recorded_curves_hash(data, config_path), config_path)
    except (OSError, ValueError):
        return False  # no config yet, or a broken one: there is nothing loadable to keep
    if source == backup_path:
        return True  # an earlier save was interrupted: the backup already holds the committed curves
    tmp = _temp_path(folder, BACKUP_NAME)
    try:
        if raw is None:
            _write_new(tmp, b"")  # the config has no curves: an empty backup says so
        else:
            try:
                os.link(source, tmp)  # a second name for the same bytes: nothing to copy or flush
            except OSError:  # no hard links on this file system
                _write_new(tmp, raw)
        os.replace(tmp, backup_path)  # made durable with the curves' replacement, before the JSON is replaced
    finally:
        _remove_quietly(tmp)
    return True


def _restore_backup(curves_path: str, backup_path: str) -> None:
    """Best effort after a failed save: put the committed curves back under their name (the JSON was not replaced)."""
    try:
        if os.path.getsize(backup_path):
            os.replace(backup_path, curves_path)
            _remove_quietly(backup_path)  # a rename between two links to one file does nothing
        else:
            _remove_quietly(curves_path)
            os.remove(backup_path)
    except OSError:
        logger.warning("Could not put the previous curves back after a failed save; %s still loads from %s.",
                       os.path.dirname(curves_path), backup_path)


def _temp_path(folder: str, name: str) -> str:
    """A hidden, unused name next to `name` (never read as a config, never uploaded)."""
    return os.path.join(folder, f".tmp-{secrets.token_hex(6)}-{name}")


def _write_temp(folder: str, name: str, data: bytes) -> str:
    return _write_new(_temp_path(folder, name), data)


def _write_new(path: str, data: bytes) -> str:
    """Write `data` to the new file `path`, flushed to disk; permissions follow the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(path)
        raise
    return path


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


def _short(value: Any, limit: int = 60) -> str:
    """`repr` of a bad value for an error message, cut to `limit` characters, with its type (`config` uses it too)."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{text} ({type(value).__name__})"


__all__ = ["BACKUP_NAME", "CONFIG_NAME", "CURVES_HASH_KEY", "CURVES_NAME", "pair_paths", "read_pair", "write_pair"]
