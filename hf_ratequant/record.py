"""What a calibration did, typed and versioned: the record saved in `config.calibration`.

[`CalibrationRecord`] is written to `ratequant_config.json` as a plain JSON object with the keys older versions
wrote (so the model card and older readers keep working) plus `record_version` and `families`. `from_dict` reads
records of every version: those written before versioning (no `record_version`, read as version 0), and newer ones,
whose unknown keys are ignored.

Example:
    >>> record = CalibrationRecord.from_dict(config.calibration)
    >>> record.winner, record.validation_kl[record.winner]
    ('ratequant-measured', 0.0123)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["RECORD_VERSION", "CalibrationRecord", "measure_description"]

RECORD_VERSION = 6
"""1: `record_version` and `families` added, the `kvq-beta4` comparison no longer among the `candidates`. 2:
`true_budget`, `group_grid` and `candidate_groups` (calibration over group sizes). 3: `window_tokens` (the true
budget counts the longer full-precision window of layers with larger key token groups). 4: `layer_weights` (the
true budget counts each layer's elements by the tokens it holds, where sliding-window layers hold fewer). 5:
`budget_context` (the context a true budget counted bytes at; 4096 before). 6: `validation_stopped` (candidates
the race stopped early, whose validation KL is a lower bound; before, every candidate was scored in full)."""


def measure_description(measure: str, residual_aware: bool) -> str:
    """The words a record uses for the distortion measure (one of `settings.MEASURES`)."""
    what = ("gradient-weighted squared error of the attention output recomputed with the quantized states"
            if measure == "output" else "gradient-weighted squared quantization error of the states")
    return (what + " (diagonal Fisher), summed over tokens"
            + (", gradients through the quantized part of the cache only" if residual_aware else ""))


_OPTIONAL_FIELDS = ("true_budget", "group_grid", "candidate_groups", "window_tokens",  # record versions 2 and 3
                    "layer_weights", "budget_context", "validation_stopped")  # 4, 5 and 6


@dataclass(frozen=True)
class CalibrationRecord:
    """How a calibrated config was chosen.

    Args:
        source (`str`): where the calibration text came from; `text_sha256` (`str`) its fingerprint.
        fit_tokens (`int`), validation_tokens (`int`): tokens measured, and held back to compare the candidates.
        seq_len (`int`): tokens per window.
        measure (`str`): the distortion measure, in words ([`measure_description`]).
        residual_aware (`bool`): whether the gradients flowed only through the quantized part of the cache.
        bit_grid (`list[int]`): the bit-widths every unit was measured at.
        winner (`str`): the candidate returned (the config's `method`).
        validation_kl (`dict[str, float]`): every validated candidate's mean KL to the full-precision cache.
        validation_finalists (`list[str]`): the candidates scored on every validation window.
        validation_windows (`dict[str, int]`): validation windows each candidate was scored on.
        validation_stopped (`list[str]`): candidates the race stopped early, once they could no longer make its
            next cut (`allocation.successive_halving`): their validation KL is a lower bound over their last rung's
            windows. Empty where none was (and before version 6).
        gain_vs_best_fixed (`float`, *optional*): `1 - KL(winner) / KL(best fixed split)`, over the scores recorded:
            where the lowest is a fixed split's lower bound (`validation_stopped`), the gain is at least this.
        beta_median (`dict[str, float]`): median fitted beta of the `"key"` and `"value"` units.
        fit_r2_median (`float`): median R^2 of the per-unit fits.
        seconds (`dict[str, float]`): time spent measuring, validating and in all.
        processes (`int`): processes that shared the work.
        candidates (`dict[str, list]`): the bits of the candidates derived from the measure (not the fixed splits).
        families (`dict[str, str]`): every candidate's family (`"ratequant"`, `"descent"`, `"fixed"`); empty in
            records written before version 1.
        true_budget (`float`, *optional*): the budget in true bits per element, when it was given so.
        group_grid (`list[int]`): the group sizes measured (empty: the layout's only).
        candidate_groups (`dict[str, list]`): the group sizes of the candidates that chose them.
        window_tokens (`int`, *optional*): the context at which the true budget also counted the longer
            full-precision window of layers whose keys chose larger token groups (see `footprint.window_growth`);
            None where no unit could (or before version 3).
        layer_weights (`list[int]`): what an element of each layer weighed in the true budget, the tokens the layer
            quantizes at `budget_context` tokens (`footprint.layer_weights`); empty where every layer weighed the
            same (or before version 4).
        budget_context (`int`, *optional*): the context, in tokens, at which a true budget counted the bytes
            (`CalibrationSettings.budget_context`); None for a budget in code bits, and before version 5, when it
            was always `footprint.REPORT_TOKENS` (4096).
        record_version (`int`): the schema of the record; 0 for records written before versioning.
    """

    source: str
    text_sha256: str
    fit_tokens: int
    validation_tokens: int
    seq_len: int
    measure: str
    residual_aware: bool
    bit_grid: list[int]
    winner: str
    validation_kl: dict[str, float] = field(default_factory=dict)
    validation_finalists: list[str] = field(default_factory=list)
    validation_windows: dict[str, int] = field(default_factory=dict)
    gain_vs_best_fixed: float | None = None
    beta_median: dict[str, float] = field(default_factory=dict)
    fit_r2_median: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    processes: int = 1
    candidates: dict[str, list] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)
    true_budget: float | None = None
    group_grid: list[int] = field(default_factory=list)
    candidate_groups: dict[str, list] = field(default_factory=dict)
    window_tokens: int | None = None
    layer_weights: list[int] = field(default_factory=list)
    budget_context: int | None = None
    validation_stopped: list[str] = field(default_factory=list)
    record_version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON object saved as `config.calibration` (a deep copy: changing it leaves the record alone). The
        fields added since version 2 (calibration over group sizes, stopped candidates) are left out when unused, so
        other records keep their keys."""
        out = copy.deepcopy(dataclasses.asdict(self))
        for name in _OPTIONAL_FIELDS:
            if out[name] in (None, [], {}):
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationRecord:
        """Read a record of any version (see the module docstring); a missing required key is a `ValueError`."""
        if not isinstance(data, dict):
            raise ValueError(f"A calibration record must be a dict (a JSON object), got {type(data).__name__}.")
        version = data.get("record_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"record_version={version!r} must be a non-negative integer (this library writes "
                             f"{RECORD_VERSION}).")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"The calibration record lacks {missing}: every record since the first has them; it "
                             "was not written by `calibrate`, or was edited.")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            logger.info("calibration record version %d: ignoring keys %s unknown to version %d", version, unknown,
                        RECORD_VERSION)
        known = {k: copy.deepcopy(v) for k, v in data.items() if k in fields}
        return cls(**{**known, "record_version": version})
