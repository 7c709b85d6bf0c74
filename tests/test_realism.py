"""The realism judgement (pipeline.realism): pure, no database."""

from __future__ import annotations

import json
import math
from datetime import date, timedelta

import pytest

from pipeline.realism import (
    DEFAULT_SEA_TEMPERATURE_BAND,
    MEASURES,
    MIN_SHARE_INSIDE,
    SEA_TEMPERATURE_BANDS,
    Band,
    BatchFigures,
    Measure,
    RealismData,
    evaluate,
    judge,
)

SURVIVAL = Band(60.0, 90.0, "%")


def test_band_contains_its_ends_and_nothing_undefined() -> None:
    assert SURVIVAL.contains(60.0) and SURVIVAL.contains(90.0) and SURVIVAL.contains(75)
    assert not SURVIVAL.contains(59.999) and not SURVIVAL.contains(90.001)
    assert not SURVIVAL.contains(None) and not SURVIVAL.contains(math.nan)
    upper = Band(None, 25.0, "kg/m³")
    assert upper.contains(-1.0) and upper.contains(25.0) and not upper.contains(25.01)
    assert not upper.contains(math.inf)
    assert Band(1.0, None).contains(1e9)


def test_band_reads_like_the_spec() -> None:
    assert str(SURVIVAL) == "60–90 %"
    assert str(Band(1.05, 1.40)) == "1.05–1.4"
    assert str(Band(None, 200_000.0)) == "≤ 200,000"
    assert str(Band(None, 25.0, "kg/m³")) == "≤ 25 kg/m³"
    assert str(Band(4.5, None, "kg")) == "≥ 4.5 kg"
    assert str(Band(None, None)) == "—"


def test_bands_are_those_of_farm_model_section_6() -> None:
    bands = {m.key: (m.band.low, m.band.high) for m in MEASURES}
    assert bands == {
        "freshwater_survival_pct": (60.0, 90.0),
        "sea_mortality_pct": (5.0, 25.0),
        "sea_fcr": (1.05, 1.40),
        "harvest_weight_kg": (4.5, 7.0),
        "harvest_weight_vs_target_pct": (90.0, 110.0),
        "days_at_sea": (280.0, 560.0),
        "ring_density_kg_m3": (None, 25.0),
        "ring_stocking_fish": (None, 200_000.0),
        "tank_load_pct": (None, 100.0),
    }
    assert {g: (b.low, b.high) for g, b in SEA_TEMPERATURE_BANDS.items()} == {
        "Faroe Islands": (6.0, 12.0),
        "Scotland": (6.0, 15.0),
    }
    assert MIN_SHARE_INSIDE == 0.90


# ---- judge ----------------------------------------------------------------------------------


def test_all_inside_holds() -> None:
    assert judge([70.0, 75.0, 80.0], SURVIVAL) == (75.0, 1.0, True)


def test_median_inside_but_fewer_than_90_percent_inside_fails() -> None:
    values = [50.0, 55.0, 70.0, 72.0, 75.0, 76.0, 78.0, 80.0, 82.0, 85.0]  # 8 of 10 inside
    median, share, holds = judge(values, SURVIVAL)
    assert SURVIVAL.contains(median)
    assert share == pytest.approx(0.8)
    assert not holds


def test_exactly_90_percent_inside_holds() -> None:
    values = [50.0] + [75.0] * 9
    assert judge(values, SURVIVAL) == (75.0, pytest.approx(0.9), True)


def test_median_outside_fails_whatever_the_share() -> None:
    values = [40.0, 45.0, 70.0, 95.0]
    median, share, holds = judge(values, SURVIVAL)
    assert median == 57.5 and share == 0.25 and not holds
    # the median of an even count is the mean of the middle two
    assert judge([80.0, 95.0], SURVIVAL) == (87.5, 0.5, False)


def test_missing_figures_count_against_the_share_but_not_the_median() -> None:
    values = [70.0, 72.0, 74.0, 76.0, 78.0, 80.0, 82.0, 84.0, 86.0, None]
    median, share, holds = judge(values, SURVIVAL)
    assert median == 78.0  # over the nine figures there are
    assert share == pytest.approx(0.9) and holds
    assert judge([70.0, None, math.nan], SURVIVAL) == (70.0, pytest.approx(1 / 3), False)
    assert judge([None], SURVIVAL) == (None, 0.0, False)


def test_nothing_to_judge_holds() -> None:
    assert judge([], SURVIVAL) == (None, None, True)


def test_values_are_never_clamped() -> None:
    """A figure far outside is reported as it is, not pulled to the band's edge."""
    median, _, holds = judge([250.0, 260.0, 270.0], SURVIVAL)
    assert median == 260.0 and not holds


# ---- evaluate -------------------------------------------------------------------------------


def _batch(batch_id: int, status: str = "harvested", **values: float | None) -> BatchFigures:
    return BatchFigures(batch_id, "Scotland", status, dict(values))


def test_evaluate_judges_harvested_measures_over_harvested_batches_only() -> None:
    measure = Measure("freshwater_survival_pct", "Freshwater survival", SURVIVAL)
    data = RealismData(
        [
            _batch(1, freshwater_survival_pct=75.0),
            _batch(2, freshwater_survival_pct=80.0),
            _batch(3, "active", freshwater_survival_pct=10.0),  # mid-cycle: not judged
        ]
    )
    (figure,) = evaluate(data, [measure])
    assert (figure.median, figure.share_inside, figure.batches, figure.passed) == (
        77.5,
        1.0,
        2,
        True,
    )
    # a harvested batch whose figure cannot be computed counts as outside
    data.batches.append(_batch(4, freshwater_survival_pct=None))
    (figure,) = evaluate(data, [measure])
    assert figure.batches == 3 and figure.share_inside == pytest.approx(2 / 3)
    assert not figure.passed
    assert figure.outside == ((4, None),)


def test_evaluate_limit_measures_take_every_batch_that_has_the_figure() -> None:
    measure = Measure("ring_density_kg_m3", "Ring density", Band(None, 25.0), "all")
    data = RealismData(
        [
            _batch(1, ring_density_kg_m3=20.0),
            _batch(2, "active", ring_density_kg_m3=30.0),
            _batch(3, "active", ring_density_kg_m3=None),  # not at sea yet
        ]
    )
    (figure,) = evaluate(data, [measure])
    assert figure.batches == 2 and figure.share_inside == 0.5 and not figure.passed
    assert figure.outside == ((2, 30.0),)
    assert figure.as_dict()["outside"] == [{"batch_id": 2, "value": 30.0}]


def test_evaluate_sea_temperatures_per_geography_on_daily_means() -> None:
    day0 = date(2024, 1, 1)
    faroe = [(day0 + timedelta(days=i), 9.0) for i in range(95)] + [
        (day0 + timedelta(days=95 + i), 12.5) for i in range(5)
    ]  # 95 % of the days inside 6–12
    scotland = [(day0 + timedelta(days=i), 13.0 if i < 85 else 16.0) for i in range(100)]
    elsewhere = [(day0, 19.0), (day0 + timedelta(days=1), 21.0)]
    data = RealismData([], {"Scotland": scotland, "Faroe Islands": faroe, "Norway": elsewhere})
    figures = {f.key: f for f in evaluate(data, [])}
    assert list(figures) == [
        "sea_temperature_c:Faroe Islands",
        "sea_temperature_c:Norway",
        "sea_temperature_c:Scotland",
    ]
    faroe_figure = figures["sea_temperature_c:Faroe Islands"]
    assert faroe_figure.per == "day" and faroe_figure.batches == 100
    assert faroe_figure.share_inside == pytest.approx(0.95) and faroe_figure.passed
    assert faroe_figure.band == SEA_TEMPERATURE_BANDS["Faroe Islands"]
    scot = figures["sea_temperature_c:Scotland"]
    assert scot.median == 13.0 and scot.share_inside == pytest.approx(0.85) and not scot.passed
    assert scot.as_dict()["outside"][0] == {"day": str(day0 + timedelta(days=85)), "value": 16.0}
    norway = figures["sea_temperature_c:Norway"]
    assert norway.band == DEFAULT_SEA_TEMPERATURE_BAND
    assert norway.share_inside == 0.5 and not norway.passed


def test_evaluate_reports_survival_per_stage_without_judging_it() -> None:
    data = RealismData(
        [
            BatchFigures(1, "Scotland", "harvested", {}, {"Egg&Alevin": 88.0, "Fry": 91.0}),
            BatchFigures(2, "Scotland", "harvested", {}, {"Egg&Alevin": 90.0, "Fry": 10.0}),
            BatchFigures(3, "Scotland", "active", {}, {"Egg&Alevin": 1.0}),
        ]
    )
    figures = evaluate(data, [])
    assert [(f.measure, f.median, f.batches, f.judged, f.passed) for f in figures] == [
        ("Survival in Egg&Alevin", 89.0, 2, False, True),
        ("Survival in Fry", 50.5, 2, False, True),
    ]


def test_figures_are_json_ready() -> None:
    data = RealismData(
        [_batch(1, sea_fcr=math.nan), _batch(2, sea_fcr=1.2)],
    )
    (figure,) = evaluate(data, [Measure("sea_fcr", "FCR", Band(1.05, 1.40))])
    assert not figure.passed
    text = json.dumps(figure.as_dict(), allow_nan=False)
    assert json.loads(text)["outside"] == [{"batch_id": 1, "value": None}]
