"""The scenario file: what farm is simulated, and how its fish live.

A TOML file validated by typed models. Every number of the farm model is a
field here with its allowed range; nothing biological is a constant in code.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from datetime import date
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]

FRESHWATER_PARAMETERS = ("Temperature", "Dissolved Oxygen", "pH", "CO2", "NO2", "NO3", "NH4")
SEA_PARAMETERS = ("Temperature", "Dissolved Oxygen", "pH", "Salinity")
MORTALITY_CAUSES = ("UNKNOWN", "HANDLING", "DISEASE", "ENVIRONMENTAL", "PREDATION")


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the field and the allowed range."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParameterSpec(_Model):
    name: str
    unit: str
    low: float = Field(description="physical lower bound of a reading")
    high: float = Field(description="physical upper bound of a reading")
    fresh_level: float | None = Field(default=None, description="typical freshwater value")
    sea_level: float | None = Field(default=None, description="typical sea value")
    diurnal_amplitude: float = Field(default=0.0, description="afternoon high, night low")
    feeding_dip: float = Field(default=0.0, ge=0, description="drop in the 2 h after feeding")
    density_slope: float = Field(default=0.0, description="change per 10 kg/m3 of biomass")
    noise_sd: float = Field(default=0.0, ge=0, description="reading-to-reading noise")
    drift_sd: float = Field(default=0.0, ge=0, description="day-to-day correlated noise")


class StageSpec(_Model):
    id: int = Field(ge=1, le=6, description="lifecycle order")
    name: str
    days: int = Field(ge=7, le=900, description="stage length; at sea the longest stay")
    weight_in_g: Positive
    weight_out_g: Positive | None = Field(
        default=None, description="freshwater only: weight reached at the end of the stage"
    )
    temperature_c: tuple[float, float] | None = Field(
        default=None, description="freshwater water temperature range; sea uses the geography"
    )
    tgc: float | None = Field(
        default=None, gt=0, le=10, description="per 1000 degC-day; unset = calibrated"
    )
    mortality_pct_day: float = Field(ge=0, le=5, description="stage mean, peaks included")
    mortality_peak_day: int | None = Field(default=None, ge=0, description="day in stage")
    mortality_peak_width_days: float = Field(default=7.0, gt=0, le=100)
    mortality_peak_factor: float = Field(default=1.0, ge=1, le=50)
    fcr: float | None = Field(default=None, gt=0.3, le=3.0, description="unset = not fed")
    growth_spread: float = Field(
        default=0.1, ge=0, le=0.5, description="container growth multiplier: 1 +/- spread"
    )
    at_sea: bool = False


class ContainerTypeSpec(_Model):
    name: str
    stage: int = Field(ge=1, le=6)
    volume_m3: Positive
    max_biomass_kg: Positive | None = None
    max_density_kg_m3: Positive | None = None
    max_count: int | None = Field(default=None, gt=0, description="fish (or eggs) per container")

    @property
    def biomass_limit_kg(self) -> float:
        limits = [v for v in (self.max_biomass_kg,) if v is not None]
        if self.max_density_kg_m3 is not None:
            limits.append(self.max_density_kg_m3 * self.volume_m3)
        return min(limits) if limits else float("inf")


class GeographySpec(_Model):
    name: str
    stations: int = Field(ge=1, le=100)
    hall_containers: dict[str, int] = Field(description="containers per hall, by stage name")
    sea_areas: int = Field(ge=1, le=200)
    rings_per_area: int = Field(ge=1, le=200)
    sea_temp_min_c: float = Field(ge=-2, le=30)
    sea_temp_max_c: float = Field(ge=-2, le=35)
    coldest_day_of_year: int = Field(default=65, ge=1, le=366)
    share: float | None = Field(
        default=None, gt=0, description="share of batches; unset = by sea capacity"
    )

    @model_validator(mode="after")
    def _check_temperatures(self) -> GeographySpec:
        if self.sea_temp_max_c <= self.sea_temp_min_c:
            raise ValueError(
                f"sea_temp_max_c ({self.sea_temp_max_c}) must exceed "
                f"sea_temp_min_c ({self.sea_temp_min_c})"
            )
        return self


class ReadingSpec(_Model):
    hours: tuple[int, ...] = (6, 8, 10, 14, 16, 18)
    interval_minutes: int | None = Field(
        default=None, ge=5, le=1440, description="set = a reading every N minutes from 00:00"
    )

    @model_validator(mode="after")
    def _check_hours(self) -> ReadingSpec:
        if not self.hours or any(h < 0 or h > 23 for h in self.hours):
            raise ValueError("hours must be a non-empty list of hours in 0..23")
        if list(self.hours) != sorted(set(self.hours)):
            raise ValueError("hours must be strictly increasing")
        if self.interval_minutes is not None and 1440 % self.interval_minutes:
            raise ValueError("interval_minutes must divide a day (1440)")
        return self

    @property
    def minutes_of_day(self) -> tuple[int, ...]:
        if self.interval_minutes is not None:
            return tuple(range(0, 1440, self.interval_minutes))
        return tuple(h * 60 for h in self.hours)

    @property
    def per_day(self) -> int:
        return len(self.minutes_of_day)


class HusbandrySpec(_Model):
    """Farming practice: transfers, feeding, treatments, sampling."""

    transfer_window_days: int = Field(default=14, ge=1, le=60)
    max_sources_per_day: int = Field(default=3, ge=1, le=20)
    handling_loss_pct: float = Field(default=0.3, ge=0, le=10)
    handling_spike_factor: float = Field(default=3.0, ge=1, le=50)
    handling_spike_days: int = Field(default=7, ge=1, le=30)
    fill_fraction: float = Field(
        default=0.85, gt=0, le=1, description="planned end-of-stage biomass / max biomass"
    )
    window_end_fill_fraction: float = Field(
        default=0.95, gt=0, le=1, description="biomass / max biomass at transfer window end"
    )
    planning_mortality_factor: float = Field(
        default=0.85, gt=0, le=1, description="planned deaths / mean deaths when sizing counts"
    )
    feeding_hours: tuple[int, ...] = (8, 16)
    feed_noise: float = Field(default=0.08, ge=0, le=0.5)
    sample_interval_days: int = Field(default=7, ge=1, le=60)
    sample_fish: int = Field(default=30, ge=1, le=1000)
    lice_fish: int = Field(default=20, ge=1, le=1000)
    lice_threshold: float = Field(default=0.5, gt=0, le=20)
    delousing_efficacy: tuple[float, float] = (0.70, 0.95)
    vaccination_weight_g: tuple[float, float] = (35.0, 50.0)
    harvest_rings_per_day: int = Field(default=2, ge=1, le=50)
    harvest_window_days: int = Field(default=10, ge=1, le=60)
    outbreak_prob_per_day: float = Field(default=0.0015, ge=0, le=0.1)
    outbreak_factor: float = Field(default=4.0, ge=1, le=100)
    outbreak_days: tuple[int, int] = (5, 20)


class Scenario(_Model):
    name: str = "default"
    seed: int = Field(default=20240101, ge=0, le=2**63 - 1)
    as_of_date: date
    years: float = Field(default=5.0, gt=0.2, le=30, description="span of batch starts")
    target_saturation: float = Field(default=0.8, gt=0, le=1.0)
    batches: int | None = Field(default=None, ge=1, le=5000, description="unset = fill")
    eggs: tuple[int, int] = (3_000_000, 3_800_000)
    harvest_target_g: tuple[float, float] = (4500.0, 6500.0)
    readings: ReadingSpec = ReadingSpec()
    husbandry: HusbandrySpec = HusbandrySpec()
    parameters: tuple[ParameterSpec, ...]
    stages: tuple[StageSpec, ...]
    container_types: tuple[ContainerTypeSpec, ...]
    geographies: tuple[GeographySpec, ...]

    @model_validator(mode="after")
    def _check_consistency(self) -> Scenario:
        ids = [s.id for s in self.stages]
        if ids != list(range(1, len(ids) + 1)) or len(ids) < 2:
            raise ValueError("stages must be numbered 1, 2, … in order (at least two)")
        if not self.stages[-1].at_sea or any(s.at_sea for s in self.stages[:-1]):
            raise ValueError("stages: exactly the last stage is at sea (at_sea = true)")
        for stage in self.stages[:-1]:
            if stage.weight_out_g is None or stage.temperature_c is None:
                raise ValueError(f"stage {stage.name}: weight_out_g and temperature_c are required")
            if stage.weight_out_g <= stage.weight_in_g:
                raise ValueError(f"stage {stage.name}: weight_out_g must exceed weight_in_g")
        if self.stages[-1].tgc is None:
            raise ValueError("the sea stage needs a tgc")
        stage_names = {s.name for s in self.stages}
        for ct in self.container_types:
            if ct.stage > len(self.stages):
                raise ValueError(f"container type {ct.name}: stage {ct.stage} does not exist")
        for stage in self.stages:
            if not any(ct.stage == stage.id for ct in self.container_types):
                raise ValueError(f"stage {stage.name}: no container type serves it")
        for geo in self.geographies:
            unknown = set(geo.hall_containers) - stage_names
            if unknown:
                raise ValueError(f"geography {geo.name}: unknown stage(s) {sorted(unknown)}")
            for stage in self.stages[:-1]:
                if geo.hall_containers.get(stage.name, 0) < 1:
                    raise ValueError(
                        f"geography {geo.name}: hall_containers.{stage.name} must be ≥ 1"
                    )
        if not self.geographies:
            raise ValueError("geographies: at least one is required")
        names = {p.name for p in self.parameters}
        missing = (set(FRESHWATER_PARAMETERS) | set(SEA_PARAMETERS)) - names
        if missing:
            raise ValueError(f"parameters: missing {sorted(missing)}")
        for lo_hi, field in ((self.eggs, "eggs"), (self.harvest_target_g, "harvest_target_g")):
            if lo_hi[0] <= 0 or lo_hi[1] < lo_hi[0]:
                raise ValueError(f"{field} must be a range [low, high] with 0 < low ≤ high")
        return self

    # ---- derived views -------------------------------------------------------
    @property
    def freshwater_stages(self) -> tuple[StageSpec, ...]:
        return self.stages[:-1]

    @property
    def sea_stage(self) -> StageSpec:
        return self.stages[-1]

    def container_type_for(self, stage_id: int) -> ContainerTypeSpec:
        return next(ct for ct in self.container_types if ct.stage == stage_id)

    def parameter_names(self, at_sea: bool) -> tuple[str, ...]:
        return SEA_PARAMETERS if at_sea else FRESHWATER_PARAMETERS

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def content_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _describe(error: dict) -> str:
    field = ".".join(str(p) for p in error["loc"]) or "scenario"
    ctx = error.get("ctx") or {}
    bounds = [f"{k.replace('_', ' ')} {v}" for k, v in ctx.items() if k in ("ge", "gt", "le", "lt")]
    allowed = f" (allowed: {', '.join(bounds)})" if bounds else ""
    return f"{field}: {error['msg']}{allowed}; got {error.get('input')!r}"


def parse_scenario(data: dict) -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError("bad scenario: " + _describe(exc.errors()[0])) from None


def _merge(base: dict, override: dict) -> dict:
    """Tables merge key by key; everything else (arrays included) is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A scenario file; `extends = "other.toml"` (relative to it) inherits from another."""
    if path in seen:
        raise ScenarioError(f"scenario {path} extends itself")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"scenario file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {path} is not valid TOML: {exc}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _merge(_read_toml((path.parent / parent).resolve(), (*seen, path)), data)


def load_scenario(path: Path | str) -> Scenario:
    return parse_scenario(_read_toml(Path(path).resolve()))
