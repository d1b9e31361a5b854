"""The `--cache` grammar of the command line, the lm-eval harness and the benchmarks, in two steps.

[`parse_cache_spec`] reads the text alone (no model, no file read beyond `os.path.isdir`), so a malformed spec fails
before any model is loaded; [`CacheSpec.build`] turns it into the `RateQuantConfig` a model needs (or `None`: full
precision). Accepted specs:

- `none` (also `fp16`, `full`, `dynamic`): a full-precision `DynamicCache`;
- `uniform:BITS`: every key and value at BITS (1..8, or 16);
- `kv:KBITS,VBITS`: every key at KBITS and every value at VBITS;
- a folder saved with `RateQuantConfig.save_pretrained`, or a Hub repo id (`user/name`).

The fixed shorthands get the layout they are built with, by default [`CacheLayout`]'s (32 sink tokens, like a
calibrated config), so a fixed and a calibrated cache are compared with the same sinks and window. A saved config
keeps its own layout (its allocation was calibrated with it): a layout field the caller set explicitly that
contradicts it is a `ValueError`.

Example:
    >>> from hf_ratequant.cache_spec import parse_cache_spec
    >>> spec = parse_cache_spec("kv:3,2")
    >>> spec.kind, spec.key_bits, spec.value_bits
    ('kv', 3, 2)
    >>> parse_cache_spec("kv:3")
    Traceback (most recent call last):
    ...
    ValueError: Cache spec 'kv:3': write kv:KBITS,VBITS, e.g. kv:3,2.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .hub_io import looks_local
from .quantizers import check_bits
from .settings import CacheLayout

if TYPE_CHECKING:
    from .config import RateQuantConfig

__all__ = ["FULL_PRECISION_NAMES", "CacheSpec", "parse_cache_spec"]

FULL_PRECISION_NAMES = ("none", "fp16", "full", "dynamic")
"""Specs that name a full-precision `DynamicCache`."""

_ACCEPTED = ("'none' (full precision), 'uniform:BITS', 'kv:KBITS,VBITS', a folder saved with "
             "RateQuantConfig.save_pretrained, or a Hub repo id ('user/name')")
_LAYOUT_FIELDS = tuple(f.name for f in dataclasses.fields(CacheLayout))


@dataclass(frozen=True)
class CacheSpec:
    """One parsed `--cache` value.

    Attributes:
        text (`str`): the spec as written (stripped), used as the cache's name in tables and progress bars.
        kind (`str`): `"none"`, `"uniform"`, `"kv"` or `"saved"`.
        key_bits (`int`, *optional*), value_bits (`int`, *optional*): the bits of a `uniform` or `kv` spec.
        source (`str`, *optional*): the folder or Hub repo id of a `saved` spec.
    """

    text: str
    kind: str
    key_bits: int | None = None
    value_bits: int | None = None
    source: str | None = None

    @property
    def is_fixed(self) -> bool:
        """Whether this is a `uniform:` or `kv:` shorthand, which takes its layout from the caller."""
        return self.kind in ("uniform", "kv")

    def build(
        self, model_config: Any, layout: CacheLayout | None = None, *, explicit: Collection[str] | None = None
    ) -> RateQuantConfig | None:
        """The config this spec names for a model, or `None` for full precision.

        Args:
            model_config (`PretrainedConfig` or `ModelFingerprint`): the model's config.
            layout ([`CacheLayout`], *optional*): the layout of a `uniform:`/`kv:` cache (default `CacheLayout()`).
            explicit (`Collection[str]`, *optional*): the layout fields the caller set on purpose (e.g. the
                command-line flags given); a saved config whose own value differs is a `ValueError`. By default
                every field of `layout` when it is given, none when it is not.
        """
        from .config import RateQuantConfig

        if self.kind == "none":
            return None
        if self.is_fixed:
            return RateQuantConfig.uniform(model_config, key_bits=self.key_bits, value_bits=self.value_bits,
                                           layout=layout or CacheLayout())
        config = RateQuantConfig.from_pretrained(self.source)
        if layout is not None:
            _check_saved_layout(self.source, config.layout, layout, _LAYOUT_FIELDS if explicit is None else explicit)
        return config


def _check_saved_layout(source: str, own: CacheLayout, asked: CacheLayout, fields: Collection[str]) -> None:
    """Refuse a layout field set explicitly that differs from what the saved config was calibrated with."""
    unknown = sorted(set(fields) - set(_LAYOUT_FIELDS))
    if unknown:
        raise TypeError(f"Unknown cache layout field(s) {unknown}: a layout has {list(_LAYOUT_FIELDS)}.")
    clashes = [(name, getattr(asked, name), getattr(own, name)) for name in _LAYOUT_FIELDS
               if name in fields and getattr(asked, name) != getattr(own, name)]
    if clashes:
        flags = {name: "--" + name.replace("_", "-") for name, _, _ in clashes}
        asked_text = ", ".join(f"{name}={value!r} ({flags[name]})" for name, value, _ in clashes)
        own_text = ", ".join(f"{name}={value!r}" for name, _, value in clashes)
        calibrate_flags = " ".join(f"{flags[name]} {value}" for name, value, _ in clashes)
        raise ValueError(
            f"{asked_text} does not apply to the saved config {source!r}, which keeps {own_text} (its allocation "
            f"was calibrated with them): drop it, or calibrate a config with that layout (`hf-ratequant calibrate "
            f"{calibrate_flags}`)."
        )


def parse_cache_spec(text: str | os.PathLike) -> CacheSpec:
    """Parse one `--cache` value (see the module docstring); a malformed one is a `ValueError` saying what is
    accepted, a path that is no folder a `FileNotFoundError`. Reads no file and loads no model."""
    if not isinstance(text, (str, os.PathLike)):
        raise TypeError(f"A cache spec is a string (e.g. 'kv:3,2'), got {type(text).__name__}.")
    spec = os.fspath(text).strip()
    if spec.lower() in FULL_PRECISION_NAMES:
        return CacheSpec(spec, "none")
    if spec.startswith("uniform:"):
        bits = _bits(spec, spec[len("uniform:"):])
        return CacheSpec(spec, "uniform", key_bits=bits, value_bits=bits)
    if spec.startswith("kv:"):
        parts = spec[len("kv:"):].split(",")
        if len(parts) != 2:
            raise ValueError(f"Cache spec {spec!r}: write kv:KBITS,VBITS, e.g. kv:3,2.")
        return CacheSpec(spec, "kv", key_bits=_bits(spec, parts[0]), value_bits=_bits(spec, parts[1]))
    if os.path.isdir(spec) or (":" not in spec and "/" in spec and not looks_local(spec)):
        return CacheSpec(spec, "saved", source=spec)  # a saved folder or a Hub repo id
    if ":" not in spec and looks_local(spec):
        raise FileNotFoundError(f"Cache spec {spec!r}: no such folder. Pass a folder saved with "
                                f"RateQuantConfig.save_pretrained, or one of: {_ACCEPTED}.")
    raise ValueError(f"Unknown cache spec {spec!r}: accepted are {_ACCEPTED}.")


def _bits(spec: str, text: str) -> int:
    try:
        bits = int(text.strip())
    except ValueError:
        raise ValueError(f"Cache spec {spec!r}: {text!r} is not an integer bit-width (1..8 or 16).") from None
    try:
        return check_bits(bits)
    except ValueError as e:
        raise ValueError(f"Cache spec {spec!r}: {e}") from None
