"""Environmental series: sea and tank temperatures, and every sensor's readings.

Pure and deterministic. A sea area's temperature is a function of the run seed,
the area and the calendar, so every batch in an area sees the same sea. A
sensor's readings over a window are a function of the batch seed, the sensor and
that window, so they can be regenerated identically when they are streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import lru_cache

import numpy as np

from pipeline.scenario import GeographySpec, ParameterSpec, Scenario

AR_PHI = 0.85  # day-to-day persistence of the correlated noise
EPOCH = date(2000, 1, 1)


def ar1(rng: np.random.Generator, days: int, sd: float) -> np.ndarray:
    """Stationary AR(1) noise with marginal standard deviation `sd`."""
    if days <= 0:
        return np.zeros(0)
    z = rng.normal(0.0, 1.0, days)  # a longer series extends a shorter one exactly
    shocks = z * sd * np.sqrt(1 - AR_PHI**2)
    shocks[0] = z[0] * sd
    out = np.empty(days)
    level = 0.0
    for i, shock in enumerate(shocks):  # short loop: days, not readings
        level = level * AR_PHI + shock if i else shock
        out[i] = level
    return out


def sea_calendar_c(geo: GeographySpec, first: date, days: int) -> np.ndarray:
    """Seasonal sea temperature: minimum on the coldest day of year, maximum half a year on."""
    ordinals = np.arange(days) + (first - EPOCH).days
    day_of_year = (ordinals + EPOCH.timetuple().tm_yday - 1) % 365.25
    mid = (geo.sea_temp_min_c + geo.sea_temp_max_c) / 2
    amplitude = (geo.sea_temp_max_c - geo.sea_temp_min_c) / 2
    return mid - amplitude * np.cos(2 * np.pi * (day_of_year - geo.coldest_day_of_year) / 365.25)


def sea_area_temperature_c(
    scenario: Scenario, run_seed: int, area_id: int, geo: GeographySpec, first: date, days: int
) -> np.ndarray:
    """Daily sea temperature of one area, identical for every batch that reads it.

    The noise is generated from a fixed epoch so that any window of it agrees with
    any other window over the days they share."""
    temperature = next(p for p in scenario.parameters if p.name == "Temperature")
    offset = (first - EPOCH).days
    noise = _area_noise(run_seed, area_id, temperature.drift_sd, offset + days)[offset:]
    return sea_calendar_c(geo, first, days) + noise


@lru_cache(maxsize=64)
def _area_noise(run_seed: int, area_id: int, sd: float, days: int) -> np.ndarray:
    """An area's sea noise from the epoch on; cached because every ring of a batch reads it
    (read-only: callers slice it)."""
    rng = np.random.default_rng(np.random.SeedSequence([run_seed, 7_000_000 + area_id]))
    noise = ar1(rng, days, sd)
    noise.flags.writeable = False
    return noise


def diurnal_shape(minutes: np.ndarray) -> np.ndarray:
    """+1 at 15:00 (afternoon high), -1 at 03:00 (night low)."""
    return np.cos(2 * np.pi * (minutes / 60.0 - 15.0) / 24.0)


def after_feeding(minutes: np.ndarray, feeding_hours: tuple[int, ...]) -> np.ndarray:
    """1 for reading times in the two hours after a feeding."""
    hours = minutes / 60.0
    out = np.zeros(len(minutes))
    for h in feeding_hours:
        out[(hours > h) & (hours <= h + 2)] = 1.0
    return out


@dataclass(frozen=True)
class SensorWindow:
    """Inputs for one sensor's readings over `days` consecutive days."""

    parameter: ParameterSpec
    base: np.ndarray  # daily level before intraday effects, shape (days,)
    fed: np.ndarray  # 1 on days the container was fed, shape (days,)
    seed: tuple[int, ...]


def sensor_values(
    window: SensorWindow, minutes: np.ndarray, feeding_hours: tuple[int, ...]
) -> np.ndarray:
    """Readings of one sensor, shape (days, readings per day), within the physical range."""
    p = window.parameter
    rng = np.random.default_rng(np.random.SeedSequence(list(window.seed)))
    days = len(window.base)
    values = window.base[:, None] + p.diurnal_amplitude * diurnal_shape(minutes)[None, :]
    if p.feeding_dip:
        values -= (
            p.feeding_dip * window.fed[:, None] * after_feeding(minutes, feeding_hours)[None, :]
        )
    if p.noise_sd:
        values += rng.normal(0.0, p.noise_sd, (days, len(minutes)))
    return np.clip(values, p.low, p.high)


def daily_mean(values: np.ndarray) -> np.ndarray:
    """Daily means of a (days, readings per day) block: the one definition used by the
    engine and by assimilation, so both see bit-identical temperatures."""
    return values.sum(axis=1) / values.shape[1]
