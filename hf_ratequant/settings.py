"""Every default of the library, in one place: the cache layout, calibration and evaluation settings.

Three frozen dataclasses. `calibrate`, `analyze`, `eval`, `demo`, `RateQuantConfig.uniform`, the benchmarks and the
command line's defaults all come from them, so a fixed cache and a calibrated one get the same sinks and window
unless told otherwise (`tests/test_settings.py` compares every entry point's defaults with these).

Each checks itself when built (`ValueError` naming the value, the allowed range and the fix) and knows nothing of a
model: checks that need the model (head_dim against the group size) take its [`ModelFingerprint`] later, still
before any expensive work.

Example:
    >>> from hf_ratequant.settings import CacheLayout, CalibrationSettings
    >>> CacheLayout(quantizer="token").sink_length
    32
    >>> CalibrationSettings(budget=9.5)
    Traceback (most recent call last):
    ...
    ValueError: budget=9.5 is outside [b_min, b_max] = [1, 6]: ...
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .footprint import REPORT_TOKENS
from .quantizers import available_quantizers, check_bits
from .quantizers.scales import check_scale_bits

__all__ = [
    "BUDGET_UNITS",
    "DEFAULT_SINK_TOKENS",
    "MEASURES",
    "CacheLayout",
    "CalibrationSettings",
    "EvaluationSettings",
    "default_sink_length",
    "layout_with",
    "split_settings",
]

DEFAULT_SINK_TOKENS = 32
"""Attention sinks kept in full precision by default: at least this many first tokens, rounded up to whole groups."""

BUDGET_UNITS = ("code", "true")
"""How a budget is counted: `"code"`, average code bits per unit (what `RateQuantConfig.average_bits` reports);
`"true"`, bits per stored element with every group's scale and zero-point included, each layer's elements
counted by the tokens it holds at `CalibrationSettings.budget_context` tokens (4096 by default; a sliding-window
layer holds fewer: see `footprint.layer_weights`)."""

MEASURES = ("output", "state")
"""`"output"`: gradient-weighted error of the attention output recomputed with the quantized states; `"state"`:
gradient-weighted error of the states themselves (first order: it underrates coarse key quantization)."""

_MAX_INT = 2**31 - 1


def _check_int(name: str, value: Any, least: int, most: int = _MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise ValueError(f"{name}={value!r} must be an integer in {least}..{most}.")


@dataclass(frozen=True)
class CacheLayout:
    """How a `RateQuantCache` lays out every layer's keys and values, whatever their bits.

    Args:
        quantizer (`str`, defaults to `"kivi"`): registered quantizer design (`kivi`, `token`, `rotated`, ...).
        group_size (`int`, defaults to 32): G, the tokens (kivi keys) or channels a scale and zero-point cover.
        residual_length (`int`, defaults to 128): R, the most recent tokens kept in full precision (a multiple of G).
        sink_length (`int`, *optional*): S, the first tokens kept in full precision (attention sinks; a multiple of
            G). By default the smallest multiple of G of at least [`DEFAULT_SINK_TOKENS`] (32 for G = 32); 0 keeps
            none, as KIVI does.
        scale_bits (`int`, defaults to 16): how every group's scale and zero-point are stored: 16, in the model's
            dtype; 8, one byte each relative to three 16-bit numbers per super-block of 32 tokens
            (`quantizers.scales`: 0.27 instead of 0.5 bits per element for a 64-channel row group, 0.55 instead of 1
            at groups of 32).
    """

    quantizer: str = "kivi"
    group_size: int = 32
    residual_length: int = 128
    sink_length: int | None = None
    scale_bits: int = 16

    def __post_init__(self):
        if not isinstance(self.quantizer, str) or self.quantizer not in available_quantizers():
            raise ValueError(f"Unknown quantizer {self.quantizer!r}: registered quantizers are "
                             f"{available_quantizers()}.")
        _check_int("group_size", self.group_size, 1)
        _check_int("residual_length", self.residual_length, 0)
        if self.sink_length is None:
            object.__setattr__(self, "sink_length", default_sink_length(self.group_size))
        _check_int("sink_length", self.sink_length, 0)
        check_scale_bits(self.scale_bits)
        if self.residual_length % self.group_size:
            raise ValueError(f"residual_length={self.residual_length} must be a multiple of group_size="
                             f"{self.group_size}, so tokens leave the full-precision window in whole groups (KIVI "
                             "uses R=128, G=32).")
        if self.sink_length % self.group_size:
            raise ValueError(f"sink_length={self.sink_length} must be a multiple of group_size={self.group_size}, so "
                             f"the quantized tokens after the sinks form whole groups (e.g. sink_length="
                             f"{default_sink_length(self.group_size)}, or 0 for none).")

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a `ValueError` if this design and group size cannot quantize rows of `head_dim` channels."""
        from .quantizers import get_quantizer

        get_quantizer(self.quantizer, self.group_size).check_head_dim(head_dim)

    def describe(self) -> str:
        scales = "" if self.scale_bits == 16 else f", {self.scale_bits}-bit scales"
        return (f"{self.quantizer}, G={self.group_size}, R={self.residual_length} full-precision recent tokens, "
                f"S={self.sink_length} sink tokens{scales}")


def default_sink_length(group_size: int) -> int:
    """The smallest multiple of `group_size` of at least [`DEFAULT_SINK_TOKENS`]."""
    return -(-DEFAULT_SINK_TOKENS // group_size) * group_size


@dataclass(frozen=True)
class CalibrationSettings:
    """What `calibrate` measures, on how much text, and how it chooses.

    Args:
        budget (`float`, defaults to 2.5): average bits over all (layer, kv-head, key/value) units, in [b_min, b_max].
        n_samples (`int`, defaults to 16): calibration windows the distortion is measured on.
        n_validation (`int`, defaults to 8): further windows, held back from the measure, on which candidate
            allocations are compared through the real cache (0: return the closed-form allocation unvalidated).
        seq_len (`int`, defaults to 512): tokens per calibration window.
        b_min (`int`, defaults to 1), b_max (`int`, defaults to 6): every unit's bits lie in [b_min, b_max].
        batch_size (`int`, defaults to 4): windows per forward (and backward) pass.
        chunk (`int`, defaults to 64): tokens per step when validation feeds windows through the cache.
        measure (`str`, defaults to `"output"`): one of [`MEASURES`].
        residual_aware (`bool`, defaults to `True`): weight each unit's error only by the attention that reads it
            quantized (falls back to all attention, with a warning, on a model that ignores a custom mask).
        data_column (`str`, *optional*): text column of a `datasets` dataset (default `"text"`).
        groups (`tuple[int, ...]`, *optional*): group sizes a unit may choose besides the layout's own, in elements
            per scale and zero-point along the design's group axis (kivi keys: tokens, multiples of G that divide
            the largest; kivi values and the per-token designs: channels, divisors of head_dim; a size is offered to
            the kinds it fits). Every (bits, group) option is measured and the allocation is made over them under a
            budget in true bits per element (`budget_unit="true"`). None: the layout's group for every unit.
        budget_context (`int`, defaults to 4096): the context, in tokens, at which a budget in true bits per element
            counts the bytes the cache holds: a sliding-window layer's elements weigh by the tokens it holds there
            against a global layer's (at 32768 tokens Gemma 3's global layers weigh about 85 times its sliding
            ones, at 4096 about 10), and the longer window of layers with larger key token groups is paid there.
            Serve long contexts? Pass the length you serve. A budget in code bits has no context (`calibrate`
            refuses another value there).
    """

    budget: float = 2.5
    n_samples: int = 16
    n_validation: int = 8
    seq_len: int = 512
    b_min: int = 1
    b_max: int = 6
    batch_size: int = 4
    chunk: int = 64
    measure: str = "output"
    residual_aware: bool = True
    data_column: str | None = None
    groups: tuple[int, ...] | None = None
    budget_context: int = REPORT_TOKENS

    def __post_init__(self):
        for name in ("b_min", "b_max"):
            check_bits(getattr(self, name), name)
        if not self.b_min < self.b_max or self.b_max > 8:
            raise ValueError(f"b_min={self.b_min} and b_max={self.b_max} must satisfy 1 <= b_min < b_max <= 8: the "
                             "distortion curves are fitted on at least two bit-widths (defaults 1 and 6).")
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget):
            raise ValueError(f"budget={budget!r} must be a number of average bits per unit (e.g. 2.5).")
        if not self.b_min <= budget <= self.b_max:
            raise ValueError(f"budget={budget:g} is outside [b_min, b_max] = [{self.b_min}, {self.b_max}]: every "
                             f"unit gets between b_min and b_max bits, so their average must lie between them. Pass "
                             f"a budget in that range, or widen b_min/b_max.")
        _check_int("n_samples", self.n_samples, 1)
        _check_int("n_validation", self.n_validation, 0)
        _check_int("seq_len", self.seq_len, 2)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("chunk", self.chunk, 1)
        _check_int("budget_context", self.budget_context, 1)
        if self.measure not in MEASURES:
            raise ValueError(f"Unknown measure {self.measure!r}: choose one of {', '.join(MEASURES)}.")
        if not isinstance(self.residual_aware, bool):
            raise ValueError(f"residual_aware={self.residual_aware!r} must be True or False.")
        if self.data_column is not None and not isinstance(self.data_column, str):
            raise ValueError(f"data_column={self.data_column!r} must be a column name (a string) or None.")
        if self.groups is not None:
            groups = self.groups
            if not isinstance(groups, (list, tuple)) or not groups:
                raise ValueError(f"groups={groups!r} must be a non-empty list of group sizes (e.g. [32, 64, 128]) "
                                 "or None.")
            for g in groups:
                _check_int("groups entry", g, 1)
            object.__setattr__(self, "groups", tuple(sorted(set(groups))))

    @property
    def bit_grid(self) -> list[int]:
        """The bit-widths every unit is measured at: b_min..b_max."""
        return list(range(self.b_min, self.b_max + 1))

    def check_layout(self, layout: CacheLayout) -> None:
        """The checks that need both: a window must be long enough for some query to read a quantized token."""
        least = layout.residual_length + layout.sink_length + layout.group_size
        if self.residual_aware and self.seq_len <= least:
            raise ValueError(
                f"seq_len={self.seq_len} is too short to measure anything: the cache keeps the first sink_length="
                f"{layout.sink_length} and the last residual_length={layout.residual_length} tokens in full "
                f"precision and quantizes whole groups of group_size={layout.group_size}, so no query of such a "
                f"window reads a quantized token. Use seq_len > {least} (512 by default), or a smaller "
                "residual_length or sink_length."
            )


@dataclass(frozen=True)
class EvaluationSettings:
    """How quality is measured through the real cache: windows of held-out text fed `chunk` tokens at a time.

    Args:
        window (`int`, defaults to 1024): tokens per evaluation window.
        n_windows (`int`, defaults to 8): windows evaluated (8 x 1024 = 8k predicted tokens).
        chunk (`int`, defaults to 64): tokens per forward pass (the cache quantizes between chunks).
        batch_size (`int`, defaults to 4): windows per forward pass.
    """

    window: int = 1024
    n_windows: int = 8
    chunk: int = 64
    batch_size: int = 4

    def __post_init__(self):
        _check_int("window", self.window, 2)
        _check_int("n_windows", self.n_windows, 0)
        _check_int("chunk", self.chunk, 1)
        _check_int("batch_size", self.batch_size, 1)


_LAYOUT_FIELDS = tuple(f.name for f in dataclasses.fields(CacheLayout))
_CALIBRATION_FIELDS = tuple(f.name for f in dataclasses.fields(CalibrationSettings))


def layout_with(layout: CacheLayout | None = None, **fields: Any) -> CacheLayout:
    """`layout` (the default one when None) with the fields given (not None) replaced, checked. The default sinks
    follow a new group size unless `sink_length` is given too."""
    given = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(given) - set(_LAYOUT_FIELDS))
    if unknown:
        raise TypeError(f"Unknown cache layout field(s) {unknown}: a layout has {list(_LAYOUT_FIELDS)}.")
    if "group_size" in given and "sink_length" not in given and (layout is None or layout.sink_length ==
                                                                  default_sink_length(layout.group_size)):
        given["sink_length"] = default_sink_length(given["group_size"])
    return dataclasses.replace(layout or CacheLayout(), **given)


def split_settings(
    overrides: dict[str, Any], layout: CacheLayout | None = None, settings: CalibrationSettings | None = None
) -> tuple[CacheLayout, CalibrationSettings]:
    """`layout` and `settings` (defaults when None) with the fields named in `overrides` replaced, both checked.

    A name that is neither a [`CacheLayout`] nor a [`CalibrationSettings`] field is a `TypeError` that lists them;
    a value of None keeps the default (so command-line flags left unset change nothing).
    """
    unknown = sorted(set(overrides) - set(_LAYOUT_FIELDS) - set(_CALIBRATION_FIELDS))
    if unknown:
        raise TypeError(f"Unknown calibration setting(s) {unknown}: the cache layout takes {list(_LAYOUT_FIELDS)}, "
                        f"calibration {list(_CALIBRATION_FIELDS)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    layout = layout_with(layout, **{k: v for k, v in given.items() if k in _LAYOUT_FIELDS})
    settings = dataclasses.replace(settings or CalibrationSettings(),
                                   **{k: v for k, v in given.items() if k in _CALIBRATION_FIELDS})
    settings.check_layout(layout)
    return layout, settings
