"""The schema of a saved allocation: `ModelFingerprint` (the model a config fits) and `RateQuantConfig` (which
quantizer, which bits for every (layer, kv-head, key/value) unit, and how they were found), checked field by field.

Settings are saved as JSON (`ratequant_config.json`), fitted tensors (alpha, beta, sensitivities) as safetensors (a
`ratequant_curves-<hash>.safetensors` the JSON names). Nothing else is ever read: no pickle, no remote code. How the
files are written and read is `hf_ratequant.storage`'s business, the Hub `hf_ratequant.hub_io`'s: this module decides
what the files hold and checks it.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .hub_io import download_config, looks_local, push_config
from .quantizers import KEEP_BITS, available_quantizers, check_bits, get_quantizer
from .quantizers.base import KINDS
from .quantizers.scales import check_scale_bits
from .settings import CacheLayout, layout_with
from .storage import BACKUP_NAME, CONFIG_NAME, CURVES_FILE_KEY, CURVES_HASH_KEY, CURVES_NAME, read_folder, save_folder
from .storage import short_repr as _short

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 5
"""The newest schema this library reads. Version 2 added `sink_length`; a config without sinks is still written
as version 1 (without the key), so older releases keep reading it, and one with sinks as version 2, which they
refuse with an "upgrade" message instead of silently serving it without its sinks. Version 3 is the file layout
in which the JSON names its content-hashed curves file (`hf_ratequant.storage`): a saved config with curves is
version 3 on disk, whatever its settings need; `RateQuantConfig.version` is the oldest schema of its settings.
Version 4 added a group size per unit (`key_groups`, `value_groups`); a config whose units all use the layout's
group size is written without them, as before. Version 5 added `scale_bits` (8-bit scales and zero-points); a config
with 16-bit ones is written without it, so older releases read it, and they refuse one with 8-bit scales instead of
serving it with scales it does not store."""

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


@dataclass(frozen=True)
class ModelFingerprint:
    """What a config must agree with to be used on a model.

    Attributes:
        architecture (`str`): e.g. `"LlamaForCausalLM"` (or the `model_type` when no architecture is recorded).
        num_layers (`int`), num_kv_heads (`int`), head_dim (`int`): the KV cache geometry.
        layer_types (`tuple[str, ...]`): attention type of every layer (`full_attention`, `sliding_attention`, ...).
        sliding_window (`int` or `None`): window of the sliding layers.
        attention_chunk_size (`int` or `None`): chunk of the chunked-attention layers (Llama 4), which are served
            like sliding layers of that window, as transformers' own `DynamicCache` does.
        name_or_path (`str`, *optional*), revision (`str`, *optional*): where the model came from, when known.
    """

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    name_or_path: str | None = None
    revision: str | None = None
    model_type: str | None = None

    @classmethod
    def from_model_config(cls, model_config: Any) -> ModelFingerprint:
        """Read the KV-cache geometry of a `transformers` config (the text config of multimodal models)."""
        text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
        archs = getattr(model_config, "architectures", None) or [getattr(text, "model_type", "unknown")]
        num_layers = getattr(text, "num_hidden_layers", None)
        num_heads = getattr(text, "num_attention_heads", None)
        if not num_layers or not num_heads:
            raise ValueError(
                f"{archs[0]} ({getattr(text, 'model_type', 'unknown')}) has no attention heads in its config "
                "(`num_attention_heads`): it keeps no key/value cache that RateQuantCache could serve. Supported are "
                f"decoder models whose layers are all of type {list(SUPPORTED_LAYER_TYPES)}."
            )
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        layer_types = getattr(text, "layer_types", None)
        sliding = getattr(text, "sliding_window", None)
        if getattr(text, "use_sliding_window", True) is False:
            sliding = None
        chunk = getattr(text, "attention_chunk_size", None)
        if layer_types is None:
            if sliding is not None:
                layer_types = ["sliding_attention"] * num_layers
            elif chunk is not None:
                layer_types = ["chunked_attention"] * num_layers
            else:
                layer_types = ["full_attention"] * num_layers
        return cls(
            architecture=archs[0],
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layer_types=tuple(layer_types),
            sliding_window=sliding,
            attention_chunk_size=chunk,
            name_or_path=getattr(model_config, "_name_or_path", None) or None,
            revision=getattr(model_config, "_commit_hash", None),
            model_type=getattr(text, "model_type", None),
        )

    def window(self, layer_type: str) -> int | None:
        """The attention window a layer of `layer_type` needs (None: unbounded)."""
        if layer_type == "sliding_attention":
            return self.sliding_window
        if layer_type == "chunked_attention":
            return self.attention_chunk_size or self.sliding_window
        return None

    def geometry(self) -> tuple[int, int, int]:
        return self.num_layers, self.num_kv_heads, self.head_dim

    def differences(self, other: ModelFingerprint) -> list[str]:
        """What makes `other` a different KV cache from this one (empty: same architecture and cache geometry).

        The model type (`llama`, `qwen3`, ...) is compared, not the class name, which a config may lack. The
        model's name and revision are not compared: the same model is often loaded from a local path, and a fine-tune
        keeps its base model's geometry."""
        out = []
        for name in ("model_type", "num_layers", "num_kv_heads", "head_dim", "layer_types", "sliding_window",
                     "attention_chunk_size"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if name in ("model_type", "layer_types") and (not mine or not theirs):
                continue  # not recorded by the version that wrote this config
            if mine != theirs:
                if name == "layer_types":
                    mine, theirs = _summarize_types(mine), _summarize_types(theirs)
                out.append(f"{name} {mine} vs {theirs}")
        return out

    def describe(self) -> str:
        name = f" ({self.name_or_path})" if self.name_or_path else ""
        return (
            f"{self.architecture}{name}: {self.num_layers} layers x {self.num_kv_heads} kv-heads x "
            f"head_dim {self.head_dim}"
        )


@dataclass
class RateQuantConfig:
    """Per-unit bit allocation of a KV cache, and the calibration it came from.

    A *unit* is one (layer, kv-head, keys or values). `key_bits[l][h]` and `value_bits[l][h]` are integers in 1..8,
    or 16 to keep that unit unquantized.

    Args:
        key_bits (`list[list[int]]`): bits of the keys, `num_layers x num_kv_heads`.
        value_bits (`list[list[int]]`): bits of the values, same shape.
        key_groups (`list[list[int]]`, *optional*): each key unit's group size, same shape: elements per scale and
            zero-point along the design's group axis (kivi keys: consecutive tokens of a channel, a multiple of
            `group_size` and a divisor of the largest key group; the per-token designs: consecutive channels of a
            token, a divisor of head_dim). None: every unit uses the layout's (kivi: `group_size`; token and
            rotated: one group per head row).
        value_groups (`list[list[int]]`, *optional*): the same for the values (every design groups channels).
        quantizer (`str`, *optional*, defaults to `"kivi"`): registered quantizer design.
        group_size (`int`, *optional*, defaults to 32): group size G of the quantizer.
        residual_length (`int`, *optional*, defaults to 128): most recent tokens kept in full precision (R).
        sink_length (`int`, *optional*, defaults to 0): the first tokens of a sequence kept in full precision (the
            attention sinks, S), a multiple of `group_size`; 0 in configs saved before this field existed.
        scale_bits (`int`, *optional*, defaults to 16): how scales and zero-points are stored, 16 or 8 bits (see
            `CacheLayout.scale_bits`); 16 in configs saved before this field existed.
        budget (`float`, *optional*): the average-bit budget the allocation was made for.
        b_min (`int`, *optional*, defaults to 1), b_max (`int`, *optional*, defaults to 8): allocation bounds.
        method (`str`, *optional*, defaults to `"uniform"`): how the bits were chosen.
        fingerprint (`ModelFingerprint`, *optional*): the model the config was made for.
        calibration (`dict`, *optional*): calibration settings and measurements (JSON-serialisable).
        curves (`dict[str, torch.Tensor]`, *optional*): fitted tensors (`alpha`, `beta`, `sensitivity`, ...),
            saved as safetensors.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = RateQuantConfig.uniform(LlamaConfig(num_hidden_layers=2, num_key_value_heads=2), bits=4)
        >>> cfg.average_bits
        4.0
    """

    key_bits: list[list[int]]
    value_bits: list[list[int]]
    key_groups: list[list[int]] | None = None
    value_groups: list[list[int]] | None = None
    quantizer: str = "kivi"
    group_size: int = 32
    residual_length: int = 128
    sink_length: int = 0
    scale_bits: int = 16
    budget: float | None = None
    b_min: int = 1
    b_max: int = 8
    method: str = "uniform"
    fingerprint: ModelFingerprint | None = None
    calibration: dict = field(default_factory=dict)
    curves: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    version: int = 1  # set by validate(): the oldest schema that represents the config (2 with sinks)

    def __post_init__(self):
        self.validate()

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        model_config: Any,
        bits: int | None = None,
        *,
        key_bits: int | None = None,
        value_bits: int | None = None,
        quantizer: str | None = None,
        group_size: int | None = None,
        residual_length: int | None = None,
        sink_length: int | None = None,
        scale_bits: int | None = None,
        layout: CacheLayout | None = None,
        group: int | None = None,
        key_group: int | None = None,
        value_group: int | None = None,
    ) -> RateQuantConfig:
        """A fixed allocation: every key at `key_bits` (default `bits`), every value at `value_bits` (default `bits`).

        The layout (quantizer, G, R, S, scale bits) is [`CacheLayout`]'s, the same a calibrated config gets by
        default (32 sink tokens included); `layout=` or the single fields change it (`sink_length=0` for none, as
        KIVI does; `scale_bits=8` for 8-bit scales and zero-points).

        Args:
            model_config (`PretrainedConfig` or `ModelFingerprint`): the model's config.
            bits (`int`, *optional*): bits of every unit, unless `key_bits`/`value_bits` say otherwise.
            group (`int`, *optional*): every unit's group size (see `key_groups`), unless `key_group` /
                `value_group` say otherwise; by default the layout's.
        """
        key_bits = bits if key_bits is None else key_bits
        value_bits = bits if value_bits is None else value_bits
        if key_bits is None or value_bits is None:
            raise ValueError("Pass `bits`, or both `key_bits` and `value_bits` (integers 1..8, or 16).")
        check_bits(key_bits, "key_bits")
        check_bits(value_bits, "value_bits")
        fp = model_config if isinstance(model_config, ModelFingerprint) else ModelFingerprint.from_model_config(
            model_config
        )
        fields = dict(quantizer=quantizer, group_size=group_size, residual_length=residual_length,
                      sink_length=sink_length, scale_bits=scale_bits)
        layout = layout_with(layout, **fields)
        bits_table = torch.tensor([key_bits, value_bits]).expand(fp.num_layers, fp.num_kv_heads, 2)
        key_group = group if key_group is None else key_group
        value_group = group if value_group is None else value_group
        groups = None
        if key_group is not None or value_group is not None:
            own = {k: get_quantizer(layout.quantizer, layout.group_size).unit_group(k, fp.head_dim) for k in KINDS}
            pair = [own["key"] if key_group is None else key_group,
                    own["value"] if value_group is None else value_group]
            if pair != [own["key"], own["value"]]:  # the layout's own groups need no table (nor schema 4)
                groups = torch.tensor(pair).expand(fp.num_layers, fp.num_kv_heads, 2)
        method = "uniform" if key_bits == value_bits else "kv-split"
        return cls.from_bits(bits_table, layout, fingerprint=fp, method=method, budget=(key_bits + value_bits) / 2,
                             groups=groups)

    @classmethod
    def from_bits(
        cls, bits: torch.Tensor, layout: CacheLayout, *, fingerprint: ModelFingerprint | None = None,
        method: str = "ratequant", budget: float | None = None, b_min: int = 1, b_max: int = 8,
        groups: torch.Tensor | None = None,
    ) -> RateQuantConfig:
        """A config from a `(num_layers, num_kv_heads, 2)` bit table (`[..., 0]` keys, `[..., 1]` values) and
        optionally a group-size table of the same shape (None: the layout's for every unit)."""
        key_groups = value_groups = None
        if groups is not None:
            key_groups, value_groups = groups[..., 0].tolist(), groups[..., 1].tolist()
        return cls(
            key_bits=bits[..., 0].tolist(), value_bits=bits[..., 1].tolist(), key_groups=key_groups,
            value_groups=value_groups, quantizer=layout.quantizer,
            group_size=layout.group_size, residual_length=layout.residual_length, sink_length=layout.sink_length,
            scale_bits=layout.scale_bits, budget=budget, b_min=b_min, b_max=b_max, method=method,
            fingerprint=fingerprint,
        )

    @property
    def layout(self) -> CacheLayout:
        """The cache layout (quantizer, G, R, S, scale bits) of this config."""
        return CacheLayout(self.quantizer, self.group_size, self.residual_length, self.sink_length, self.scale_bits)

    # ---- validation ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raises `ValueError` naming the bad value, the allowed values and the fix."""
        _check_version(self.version)
        if not isinstance(self.quantizer, str) or self.quantizer not in available_quantizers():
            raise ValueError(
                f"Unknown quantizer {_short(self.quantizer)}: registered quantizers are {available_quantizers()}."
            )
        for name, least in (("group_size", 1), ("residual_length", 0), ("sink_length", 0)):
            _check_int(name, getattr(self, name), least)
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length={self.residual_length} must be a multiple of group_size={self.group_size}, so "
                "tokens leave the full-precision window in whole groups (KIVI uses R=128, G=32)."
            )
        if self.sink_length % self.group_size:
            raise ValueError(
                f"sink_length={self.sink_length} must be a multiple of group_size={self.group_size}, so the "
                f"quantized tokens after the sinks still form whole groups (e.g. sink_length={self.group_size})."
            )
        self.version = 2 if self.sink_length else 1  # the oldest schema that represents this config
        self._check_search_settings()
        if isinstance(self.fingerprint, dict):
            self.fingerprint = _fingerprint_from_dict(self.fingerprint)
        elif self.fingerprint is not None and not isinstance(self.fingerprint, ModelFingerprint):
            raise ValueError(f"fingerprint must be a ModelFingerprint (a JSON object in a saved config) or None, not "
                             f"{_short(self.fingerprint)}.")
        for kind in ("key_bits", "value_bits"):
            setattr(self, kind, _checked_table(kind, getattr(self, kind)))
        if len(self.key_bits) != len(self.value_bits) or len(self.key_bits[0]) != len(self.value_bits[0]):
            raise ValueError(
                f"key_bits is {len(self.key_bits)}x{len(self.key_bits[0])} but value_bits is "
                f"{len(self.value_bits)}x{len(self.value_bits[0])}: both must be num_layers x num_kv_heads."
            )
        if self.fingerprint is not None and (self.fingerprint.num_layers, self.fingerprint.num_kv_heads) != (
            self.num_layers,
            self.num_kv_heads,
        ):
            raise ValueError(
                f"The bit tables are {self.num_layers}x{self.num_kv_heads} but the fingerprint describes "
                f"{self.fingerprint.describe()}."
            )
        self._check_groups()
        check_scale_bits(self.scale_bits)
        if self.scale_bits != 16:
            self.version = 5
        _check_curves(self.curves, self.num_layers, self.num_kv_heads)

    def _check_groups(self) -> None:
        """The per-unit group sizes: both tables or neither, of the bit tables' shape, each size valid for its axis."""
        if (self.key_groups is None) != (self.value_groups is None):
            given = "key_groups" if self.key_groups is not None else "value_groups"
            raise ValueError(f"Only {given} is set: give both key_groups and value_groups (num_layers x "
                             "num_kv_heads group sizes), or neither for the layout's group size everywhere.")
        if self.key_groups is None:
            return
        quantizer = get_quantizer(self.quantizer, self.group_size)
        head_dim = self.fingerprint.head_dim if self.fingerprint is not None else None
        for kind, name in zip(KINDS, ("key_groups", "value_groups")):
            table = _checked_table(name, getattr(self, name), check=lambda g, where: _check_int(where, g, 1))
            if (len(table), len(table[0])) != (self.num_layers, self.num_kv_heads):
                raise ValueError(f"{name} is {len(table)}x{len(table[0])} but the bit tables are "
                                 f"{self.num_layers}x{self.num_kv_heads}: one group size per unit.")
            setattr(self, name, table)
            flat = {g for row in table for g in row}
            bad = sorted(g for g in flat if not quantizer.fits_group(kind, g, head_dim))
            tokens = quantizer.group_axis(kind) == "tokens"
            if bad and tokens:
                raise ValueError(f"{name} holds {bad}: {self.quantizer} groups {kind}s over tokens, which leave "
                                 f"the window in groups of group_size={self.group_size}, so a {kind} group must "
                                 f"be a multiple of {self.group_size} (e.g. {self.group_size}, "
                                 f"{2 * self.group_size}, {4 * self.group_size}).")
            if bad:
                divisors = [g for g in range(1, head_dim + 1) if head_dim % g == 0 and g >= 8]
                raise ValueError(f"{name} holds {bad}, which do not divide head_dim={head_dim}: {self.quantizer} "
                                 f"groups {kind}s over channels of a token; allowed are the divisors of "
                                 f"{head_dim} (e.g. {divisors}).")
            bad = quantizer.unnested(flat) if tokens else []
            if bad:
                raise ValueError(f"{name} holds {bad}, which do not divide the largest key group {max(flat)}: "
                                 "tokens leave the window in whole groups of the largest, so every token group "
                                 f"must divide it (e.g. powers of two times {self.group_size}).")
        self.version = 4

    def _check_search_settings(self) -> None:
        """The fields that record how the bits were found (not used to serve the cache, but typed all the same)."""
        for name in ("b_min", "b_max"):
            check_bits(getattr(self, name), name)
        if self.b_min > self.b_max:
            raise ValueError(f"b_min={self.b_min} is above b_max={self.b_max}: the allocation bounds are reversed.")
        budget = self.budget
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 1 <= budget <= 16
        ):  # NaN fails the range test too
            raise ValueError(f"budget={_short(budget)} must be None or a number of average bits between 1 and 16.")
        if not isinstance(self.method, str):
            raise ValueError(f"method={_short(self.method)} must be a string (e.g. 'uniform', 'ratequant').")
        if not isinstance(self.calibration, dict):
            raise ValueError(f"calibration={_short(self.calibration)} must be a dict (a JSON object) of settings and "
                             "measurements.")

    # ---- properties ------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.key_bits)

    @property
    def num_kv_heads(self) -> int:
        return len(self.key_bits[0])

    @property
    def average_bits(self) -> float:
        """Plain mean of the bit-widths of all units (16 for unquantized units)."""
        flat = [b for table in (self.key_bits, self.value_bits) for row in table for b in row]
        return sum(flat) / len(flat)

    def bits_tensor(self) -> torch.Tensor:
        """All bits as a `(num_layers, num_kv_heads, 2)` long tensor, `[..., 0]` keys and `[..., 1]` values."""
        return torch.stack([torch.tensor(self.key_bits), torch.tensor(self.value_bits)], dim=-1)

    def groups_tensor(self, head_dim: int) -> torch.Tensor:
        """Every unit's group size as a `(num_layers, num_kv_heads, 2)` long tensor (the layout's where the config
        sets none: kivi `group_size`, the per-token designs `head_dim`)."""
        if self.key_groups is not None:
            return torch.stack([torch.tensor(self.key_groups), torch.tensor(self.value_groups)], dim=-1)
        q = get_quantizer(self.quantizer, self.group_size)
        own = torch.tensor([q.unit_group(kind, head_dim) for kind in KINDS])
        return own.expand(self.num_layers, self.num_kv_heads, 2).clone()

    @property
    def has_unit_groups(self) -> bool:
        """Whether the config sets a group size per unit (schema 4)."""
        return self.key_groups is not None

    def check_model(self, model_config: Any) -> ModelFingerprint:
        """Raise a `ValueError` naming both sides if this config does not fit `model_config`'s KV cache."""
        fp = ModelFingerprint.from_model_config(model_config)
        unsupported = sorted({t for t in fp.layer_types if t not in SUPPORTED_LAYER_TYPES})
        if unsupported:
            raise ValueError(
                f"{fp.architecture} has attention layers of type {unsupported}, which RateQuantCache cannot serve: "
                f"supported layer types are {list(SUPPORTED_LAYER_TYPES)}."
            )
        if (fp.num_layers, fp.num_kv_heads) != (self.num_layers, self.num_kv_heads):
            made_for = self.fingerprint.describe() if self.fingerprint else "an unknown model"
            raise ValueError(
                f"This RateQuantConfig has {self.num_layers} layers x {self.num_kv_heads} kv-heads (made for "
                f"{made_for}) but the model is {fp.describe()}. Use a config calibrated for this model, or build "
                "one with RateQuantConfig.uniform(model.config, bits=...)."
            )
        if self.fingerprint is not None:
            diffs = self.fingerprint.differences(fp)
            if diffs:
                raise ValueError(
                    f"This RateQuantConfig was calibrated for {self.fingerprint.describe()}, but the model is "
                    f"{fp.describe()} ({'; '.join(diffs)}, config vs model). An allocation only fits the model it was "
                    "calibrated on: run `hf_ratequant.calibrate(model, tokenizer)` (or `hf-ratequant calibrate`) "
                    "for this model."
                )
            theirs, mine = fp.name_or_path, self.fingerprint.name_or_path
            if mine and theirs and not os.path.isdir(theirs) and _model_name(mine) != _model_name(theirs):
                logger.warning("This RateQuantConfig was calibrated on %s; the model is %s (same cache geometry, so "
                               "it is used, but its allocation may not be optimal for this model).", mine, theirs)
        return fp

    # ---- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable settings (without the `curves` tensors)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "curves"}
        if not self.sink_length:
            del d["sink_length"]
        if self.key_groups is None:  # readable by releases before schema 4
            del d["key_groups"], d["value_groups"]
        if self.scale_bits == 16:  # readable by releases before schema 5
            del d["scale_bits"]
        d["fingerprint"] = dataclasses.asdict(self.fingerprint) if self.fingerprint else None
        if d["fingerprint"]:
            d["fingerprint"]["layer_types"] = list(d["fingerprint"]["layer_types"])
        return d

    @classmethod
    def from_dict(cls, data: dict, curves: dict[str, torch.Tensor] | None = None) -> RateQuantConfig:
        """Build from `to_dict()` output; unknown keys are ignored (forward compatibility), every known one is checked
        and a bad one is a `ValueError` that names it."""
        if not isinstance(data, dict):
            raise ValueError(f"A RateQuantConfig is built from a dict of settings (a JSON object), not "
                             f"{_short(data)}.")
        version = data.get("version", SCHEMA_VERSION)
        _check_version(version)
        newer = [name for name in ("key_groups", "value_groups") if data.get(name) is not None]
        if newer and version < 4:
            raise ValueError(f"The settings say schema version {version} but hold {newer}, which schema 4 "
                             "introduced: the file was edited or written by a broken tool. Set \"version\": 4, "
                             "or remove the group tables to use the layout's group size everywhere.")
        if data.get("scale_bits", 16) != 16 and version < 5:
            raise ValueError(f"The settings say schema version {version} but hold scale_bits="
                             f"{_short(data['scale_bits'])}, which schema 5 introduced: the file was edited or "
                             "written by a broken tool. Set \"version\": 5, or remove scale_bits for 16-bit scales.")
        known = _known_fields(cls, data, ignore=(CURVES_FILE_KEY, CURVES_HASH_KEY))
        missing = [name for name in ("key_bits", "value_bits") if name not in known]
        if missing:
            raise ValueError(f"The settings lack {missing}: the bit tables (num_layers x num_kv_heads lists of "
                             "integers) are required. Was this file written by `RateQuantConfig.save_pretrained`?")
        if known.get("fingerprint") is not None:
            known["fingerprint"] = _fingerprint_from_dict(known["fingerprint"])
        return cls(**known, curves=dict(curves or {}))

    def save_pretrained(self, save_directory: str | os.PathLike, *, push_to_hub: bool = False, **push_kwargs):
        """Write `ratequant_config.json` and, when there are fitted tensors, the curves file it names
        (`ratequant_curves-<hash>.safetensors`).

        The curves file is written first, the JSON renamed into place last (see `hf_ratequant.storage`): a save that
        fails or is killed at any moment leaves the previous config loadable, never new settings with old curves or
        the reverse; other files in the folder are left alone. With `push_to_hub=True` the saved config is then
        pushed with [`push_to_hub`] (`repo_id=` and the other keyword arguments go there), with the folder's own
        `README.md` and `allocation.png` when it has them; a failed push leaves the saved folder as it is.
        """
        save_folder(save_directory, self.to_dict(), self.curves)
        if push_to_hub:
            return push_config(self, extras_folder=os.fspath(save_directory), **push_kwargs)
        return None

    def push_to_hub(self, repo_id: str, **kwargs):
        """Save this config with its model card and allocation heatmap to a Hub repo (created if needed).

        Keyword arguments are those of [`hf_ratequant.hub_io.push_config`]: `private`, `token`, `revision`,
        `commit_message`, `create_pr`, `license`, `evaluation` (held-out quality rows for the card).

        Example:
            >>> config = hf_ratequant.calibrate(model, tokenizer, quantizer="kivi", budget=2.5)
            >>> config.push_to_hub("me/smollm2-135m-ratequant-kivi-2.5")
        """
        return push_config(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> RateQuantConfig:
        """Load from a local folder saved with [`save_pretrained`] or from a Hub repo.

        Args:
            path_or_repo_id (`str` or `os.PathLike`): a folder holding `ratequant_config.json` (and the curves
                file it names, if any), or a Hub repo id such as `"user/smollm2-ratequant-kivi-2.5"`.
            revision (`str`, *optional*): branch, tag or commit of the Hub repo (default: its main branch).
            subfolder (`str`, *optional*): folder inside the repo or local folder.
            token, cache_dir, local_files_only: as in `huggingface_hub.hf_hub_download` (`HF_HUB_OFFLINE=1` is
                honoured).

        Only JSON and safetensors are ever read.
        """
        path = os.fspath(path_or_repo_id)
        folder = os.path.join(path, subfolder) if subfolder else path
        if os.path.isdir(folder):
            config_path = os.path.join(folder, CONFIG_NAME)
            if not os.path.isfile(config_path):
                raise FileNotFoundError(f"No {CONFIG_NAME} in {folder!r}: is this a RateQuantConfig folder saved "
                                        "with `save_pretrained`?")
            data, curves = read_folder(folder)
        elif looks_local(path):
            raise FileNotFoundError(f"{folder!r} is not a folder. Pass a folder saved with `save_pretrained` or a "
                                    "Hub repo id ('user/name').")
        else:
            config_path, data, curves = download_config(path, revision=revision, subfolder=subfolder, token=token,
                                                        cache_dir=cache_dir, local_files_only=local_files_only)
        try:
            return cls.from_dict(data, curves)
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from e


def _summarize_types(types: tuple[str, ...]) -> str:
    return ", ".join(f"{types.count(t)} {t}" for t in dict.fromkeys(types))


def _known_fields(cls: type, data: dict, ignore: tuple[str, ...] = ()) -> dict:
    """The keys of `data` that are init fields of `cls` (never `curves`, which only come from safetensors)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "curves"}
    unknown = sorted(set(data) - names - set(ignore))
    if unknown:
        logger.info("Ignoring unknown %s keys %s (written by a newer hf-ratequant?)", cls.__name__, unknown)
    return {k: v for k, v in data.items() if k in names}


# ---- checking loaded values ----------------------------------------------------------------------------------------
_MAX_INT = 2**31 - 1  # group sizes, token counts and model dimensions all fit in an int32


def _check_int(name: str, value: Any, least: int, most: int = _MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise ValueError(f"{name}={_short(value)} must be an integer in {least}..{most}.")


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version={_short(version)} is not a schema version: it must be a positive integer (this "
                         f"hf-ratequant reads 1 to {SCHEMA_VERSION}). A saved file with this version is damaged: save "
                         "the config again.")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"This RateQuantConfig has schema version {version!r}, newer than the {SCHEMA_VERSION} this "
            "hf-ratequant understands: upgrade with `pip install -U hf-ratequant`."
        )


def _checked_table(kind: str, table: Any, check=None) -> list[list[int]]:
    """A `num_layers x num_kv_heads` table of valid bit-widths (or of what `check(value, where)` accepts), as a
    list of lists."""
    if not isinstance(table, (list, tuple)) or not table:
        raise ValueError(f"{kind} must be a non-empty num_layers x num_kv_heads list of lists of integers, not "
                         f"{_short(table)}.")
    for layer, row in enumerate(table):
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError(f"{kind}[{layer}] must be a non-empty list with one entry per kv-head, not "
                             f"{_short(row)}.")
    if len({len(row) for row in table}) != 1:
        raise ValueError(f"{kind} rows have different lengths {sorted({len(r) for r in table})}: every "
                         "layer must list one entry per kv-head.")
    for layer, row in enumerate(table):
        for head, value in enumerate(row):
            (check or check_bits)(value, f"{kind}[{layer}][{head}]")
    return [list(row) for row in table]


_FINGERPRINT_INTS = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1}
_FINGERPRINT_OPTIONAL_INTS = ("sliding_window", "attention_chunk_size")
_FINGERPRINT_OPTIONAL_STRS = ("name_or_path", "revision", "model_type")


def _model_name(name_or_path: str) -> str:
    """What identifies a model in a Hub id or a recorded label: `"google/gemma-3-270m (GGUF Q4_K_M, package)"` ->
    `"gemma-3-270m"`. (A local folder's name says nothing reliable about the model in it, so the caller does not
    compare those.)"""
    name = re.sub(r"\s*\([^()]*\)\s*$", "", name_or_path.strip())
    return os.path.basename(name.rstrip("/")).lower()


def _fingerprint_from_dict(data: Any) -> ModelFingerprint:
    """A `ModelFingerprint` from its saved JSON object, every field checked."""
    if not isinstance(data, dict):
        raise ValueError(f"fingerprint must be a JSON object describing the model (architecture, num_layers, "
                         f"num_kv_heads, head_dim, ...) or null, not {_short(data)}.")
    known = _known_fields(ModelFingerprint, data)
    missing = [name for name in ("architecture", *_FINGERPRINT_INTS) if name not in known]
    if missing:
        raise ValueError(f"fingerprint lacks {missing}: a saved fingerprint records the model's architecture and KV "
                         "cache geometry. Save the config again, or remove the fingerprint (null) to skip the check.")
    if not isinstance(known["architecture"], str):
        raise ValueError(f"fingerprint.architecture={_short(known['architecture'])} must be a string.")
    for name, least in _FINGERPRINT_INTS.items():
        _check_int(f"fingerprint.{name}", known[name], least)
    for name in _FINGERPRINT_OPTIONAL_INTS:
        if known.get(name) is not None:
            _check_int(f"fingerprint.{name}", known[name], 0)
    for name in _FINGERPRINT_OPTIONAL_STRS:
        if known.get(name) is not None and not isinstance(known[name], str):
            raise ValueError(f"fingerprint.{name}={_short(known[name])} must be a string or null.")
    types = known.get("layer_types", ())
    if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
        raise ValueError(f"fingerprint.layer_types={_short(types)} must be a list of strings (one attention type "
                         "per layer, such as 'full_attention').")
    if types and len(types) != known["num_layers"]:
        raise ValueError(f"fingerprint.layer_types lists {len(types)} layers but fingerprint.num_layers is "
                         f"{known['num_layers']}.")
    known["layer_types"] = tuple(types)
    return ModelFingerprint(**known)


_UNIT_CURVES = ("alpha", "beta", "r2")  # one value per unit: (layers, kv_heads, 2), or a shape that broadcasts to it


def _check_curves(curves: Any, num_layers: int, num_kv_heads: int) -> None:
    """The fitted tensors that hf-ratequant writes must fit the bit tables; other names are kept as they are."""
    where = "(saved in the ratequant_curves-<hash>.safetensors file)"
    if not isinstance(curves, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in curves.items()
    ):
        raise ValueError(f"curves must be a dict of named tensors {where}, not {_short(curves)}.")
    unit = (num_layers, num_kv_heads, 2)
    for name in (*_UNIT_CURVES, "distortion"):
        if name in curves and not curves[name].is_floating_point():
            raise ValueError(f"curves tensor {name!r} {where} has dtype {curves[name].dtype}: a fitted curve is a "
                             "floating-point tensor. Save the config again.")
    for name in _UNIT_CURVES:
        if name in curves and not _broadcasts_to(tuple(curves[name].shape), unit):
            raise ValueError(f"curves tensor {name!r} {where} has shape {tuple(curves[name].shape)}, which does not "
                             f"fit the {num_layers}x{num_kv_heads} bit tables: expected (num_layers, num_kv_heads, 2) "
                             f"= {unit}. The two files come from different configs: save the config again.")
    grid = curves.get("bit_grid")
    if grid is not None:
        if grid.dtype == torch.bool or grid.is_floating_point() or grid.is_complex() or grid.dim() != 1:
            raise ValueError(f"curves tensor 'bit_grid' {where} must be a 1-d integer tensor of bit-widths, not "
                             f"{grid.dtype} of shape {tuple(grid.shape)}.")
        for bits in grid.tolist():
            check_bits(bits, f"curves tensor 'bit_grid' {where}: entry")
    table = curves.get("distortion")
    if table is not None:
        n_bits = len(grid) if grid is not None else None
        if table.dim() != 4 or tuple(table.shape[:3]) != unit or n_bits not in (None, table.shape[3]):
            raise ValueError(f"curves tensor 'distortion' {where} has shape {tuple(table.shape)}, expected "
                             f"(num_layers, num_kv_heads, 2, len(bit_grid)) = {(*unit, n_bits or 'n_bits')}. The two "
                             "files come from different configs: save the config again.")


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


__all__ = [
    "BACKUP_NAME", "CONFIG_NAME", "CURVES_FILE_KEY", "CURVES_HASH_KEY", "CURVES_NAME", "KEEP_BITS", "ModelFingerprint",
    "RateQuantConfig", "SCHEMA_VERSION",
]
