"""The verification task (pipeline.verify) and I-18 … I-20 (pipeline.checks) against a real
PostgreSQL.

One clean demo dataset is built per session in a template database: the demo plan,
all ten batches simulated and written, and their `batch_job` rows marked succeeded
with the checksums the writer reported (as `aquasim run` records them). Batches 1–4
are harvested, 5–7 at sea, 8–10 in freshwater on the as-of date. Each test gets its
own copy (CREATE DATABASE … TEMPLATE, a fraction of a second), so planted violations
are committed for real and never leak into another test.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pipeline.checks import (
    DETERMINISM_SAMPLE,
    INVARIANTS,
    check_I_18,
    check_I_19,
    check_I_20,
    sample_evenly,
)
from pipeline.database import make_engine
from pipeline.realism import MEASURES, gather
from pipeline.verify import NoRun, normalise, run_verification
from tests.demo_data import build_demo, scratch_database

HARVESTED = [1, 2, 3, 4]
ALL_BATCHES = list(range(1, 11))
ALL_INVARIANTS = [f"I-{n}" for n in range(1, 21)]


@dataclass(frozen=True)
class Template:
    server_url: str
    name: str
    build_seconds: float


@pytest.fixture(scope="session")
def verify_template(server_url: str) -> Iterator[Template]:
    """A template database holding the clean demo dataset (no connection left open)."""
    with scratch_database(server_url, "aq_verify_tpl") as url:
        began = time.perf_counter()
        build_demo(url)
        name = make_url(url).database or ""
        yield Template(server_url, name, time.perf_counter() - began)


@pytest.fixture
def demo_url(verify_template: Template) -> Iterator[str]:
    """A fresh copy of the clean demo dataset; dropped afterwards. libpq URL."""
    with scratch_database(
        verify_template.server_url, "aq_verify", template=verify_template.name
    ) as url:
        yield url


def execute(url: str, *statements: str) -> None:
    """Run and commit statements; each must change something."""
    with psycopg.connect(url) as conn:
        for statement in statements:
            cur = conn.execute(statement)  # type: ignore[arg-type]
            assert cur.rowcount > 0, f"planting changed nothing: {statement}"


def verify(url: str, **kwargs: Any):
    engine = make_engine(url)
    try:
        return run_verification(engine, **kwargs)
    finally:
        engine.dispose()


def stored_results(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT run_id, invariant, rows_examined, violations, examples, elapsed_s, passed"
            " FROM verification_result ORDER BY id"
        ).fetchall()


# ---- the clean dataset ----------------------------------------------------------------------


def test_clean_demo_passes_every_invariant(demo_url: str, verify_template: Template) -> None:
    report = verify(demo_url, scheduled=False)
    print(f"\ndemo built in {verify_template.build_seconds:.1f} s; check times (10 batches):")
    for r in report.results:
        print(
            f"  {r.invariant:5} {r.rows_examined:>9} rows {r.violations:>3} violations"
            f" {r.seconds * 1000:8.1f} ms  {r.note}"
        )
    print("realism:")
    for f in report.realism:
        share = "" if f.share_inside is None else f"{100 * f.share_inside:5.1f} % inside"
        print(f"  {f.measure:52} {f.band!s:14} median {f.median:10.3f} {share} of {f.batches}")
    failing = {r.invariant: r.examples[:3] for r in report.results if not r.passed}
    assert not failing
    assert report.passed and report.failures == []
    assert [r.invariant for r in report.results] == ALL_INVARIANTS == list(INVARIANTS)
    assert all(r.rows_examined > 0 for r in report.results)
    assert report.batches_checked == ALL_BATCHES
    assert report.jobs == {"succeeded": 10} and report.batches_unchecked == 0
    assert report.skipped == {}
    assert all(f.passed for f in report.realism)
    judged = [f for f in report.realism if f.judged]
    assert {f.key for f in judged} >= {m.key for m in MEASURES}
    assert {f.key for f in judged if f.per == "day"} == {
        "sea_temperature_c:Faroe Islands",
        "sea_temperature_c:Scotland",
    }
    by_key = {f.key: f for f in report.realism}
    assert by_key["freshwater_survival_pct"].batches == len(HARVESTED)
    i18 = next(r for r in report.results if r.invariant == "I-18")
    assert "1, 5, 10" in i18.note  # spread over the ids: harvested, at sea, young
    i19 = next(r for r in report.results if r.invariant == "I-19")
    assert "all 10 succeeded batches" in i19.note


def test_results_are_stored_one_row_per_invariant(demo_url: str) -> None:
    report = verify(demo_url, scheduled=False)
    rows = stored_results(demo_url)
    assert [r[1] for r in rows] == ALL_INVARIANTS
    for row, result in zip(rows, report.results, strict=True):
        run_id, invariant, examined, violations, examples, elapsed, passed = row
        assert run_id == report.run_id
        assert (invariant, examined, violations, examples, passed) == (
            result.invariant,
            result.rows_examined,
            result.violations,
            result.examples,
            result.passed,
        )
        assert math.isclose(elapsed, result.seconds)
    verify(demo_url, scheduled=False, only=["I-8"])
    assert [r[1] for r in stored_results(demo_url)] == [*ALL_INVARIANTS, "I-8"]


def test_only_runs_the_named_invariants_in_order(demo_url: str) -> None:
    report = verify(demo_url, scheduled=False, only=["I-8", "i-2", "20"])
    assert [r.invariant for r in report.results] == ["I-2", "I-8", "I-20"]
    assert report.realism  # I-20 asked for: the realism figures come with it
    report = verify(demo_url, scheduled=False, only=["I-8"])
    assert [r.invariant for r in report.results] == ["I-8"]
    assert report.realism == []
    with pytest.raises(KeyError, match="I-21"):
        verify(demo_url, scheduled=False, only=["I-21"])


def test_normalise_accepts_the_usual_spellings() -> None:
    assert {normalise(n) for n in ("I-8", "i-8", "I8", "8", " i8 ")} == {"I-8"}
    for bad in ("I-0", "I-21", "x", ""):
        with pytest.raises(KeyError):
            normalise(bad)


def test_no_run_is_reported(db_url: str) -> None:
    with pytest.raises(NoRun, match="no run"):
        verify(db_url, scheduled=False)


# ---- which batches, and when ----------------------------------------------------------------


def test_scheduled_waits_for_the_run_before_run_wide_checks(demo_url: str) -> None:
    # batch 10 is being re-run: its job is running, the earlier attempt's rows are there
    execute(demo_url, "UPDATE batch_job SET state = 'running' WHERE batch_id = 10")
    report = verify(demo_url, scheduled=True)
    assert report.batches_checked == ALL_BATCHES[:-1]
    assert report.batches_unchecked == 1
    assert set(report.skipped) == {"I-5", "I-16"}
    assert [r.invariant for r in report.results] == [
        n for n in ALL_INVARIANTS if n not in ("I-5", "I-16")
    ]
    assert report.passed  # an in-flight job's rows are not orphans mid-run
    assert [r[1] for r in stored_results(demo_url)] == [r.invariant for r in report.results]

    # `aquasim verify` (not scheduled) runs everything, and the running job's rows are
    # rows of a batch without a succeeded job
    report = verify(demo_url, scheduled=False)
    assert report.skipped == {}
    assert report.failures == ["I-19"]
    i19 = next(r for r in report.results if r.invariant == "I-19")
    assert {e["batch_id"] for e in i19.examples} == {10}
    assert {e["job_state"] for e in i19.examples} == {"running"}

    # once every job has finished (one failed), the scheduled run checks I-5 and I-16
    # too; the failed job's leftover rows are orphans
    execute(demo_url, "UPDATE batch_job SET state = 'failed' WHERE batch_id = 10")
    report = verify(demo_url, scheduled=True)
    assert report.skipped == {}
    assert report.failures == ["I-19"]


def test_a_succeeded_job_without_checksums_is_a_violation(demo_url: str) -> None:
    """Checksums commit with the rows, so a succeeded job without them is an error,
    mid-run as at the end."""
    execute(demo_url, "UPDATE batch_job SET checksum = NULL, checksums = NULL WHERE batch_id = 5")
    for scheduled in (True, False):
        report = verify(demo_url, scheduled=scheduled, only=["I-19"])
        assert report.failures == ["I-19"]
        assert {e["batch_id"] for r in report.results for e in r.examples} == {5}


def test_sample_evenly_spreads_over_the_ids() -> None:
    ids = list(range(1, 11))
    assert sample_evenly(ids, 3) == [1, 5, 10]
    assert sample_evenly(reversed(ids), 2) == [1, 10]
    assert sample_evenly(ids, 1) == [5]
    assert sample_evenly(ids, 0) == []
    assert sample_evenly(ids, 10) == ids == sample_evenly(ids, 50)
    picked = sample_evenly(range(1, 173), 20)
    assert len(set(picked)) == 20 and picked[0] == 1 and picked[-1] == 172
    assert picked == sample_evenly(range(1, 173), 20)  # deterministic
    assert DETERMINISM_SAMPLE == 3


# ---- I-18, I-19, I-20: planted violations ----------------------------------------------------


def _check(url: str, check, batch_ids=ALL_BATCHES, **kwargs: Any):
    with psycopg.connect(url) as conn:
        return check(conn, batch_ids, **kwargs)


def test_I18_a_stored_checksum_the_resimulation_disagrees_with(demo_url: str) -> None:
    execute(
        demo_url,
        """UPDATE batch_job
              SET checksums = jsonb_set(checksums, '{mortality_event}', '"1:0000000000000000"')
            WHERE batch_id = 1""",
    )
    result = _check(demo_url, check_I_18)
    assert result.violations == 1
    assert result.examples == [
        {
            "batch_id": 1,
            "table": "mortality_event",
            "stored": "1:0000000000000000",
            "resimulated": result.examples[0]["resimulated"],
        }
    ]
    assert result.rows_examined > 0


def test_I18_rows_that_the_plan_does_not_reproduce(demo_url: str) -> None:
    """Another seed in the plan: the stored rows are intact (I-19 holds) but they are not
    what this plan produces."""
    execute(demo_url, "UPDATE batch SET seed = seed + 1 WHERE id = 5")
    result = _check(demo_url, check_I_18)
    assert result.violations >= 5
    assert {e["batch_id"] for e in result.examples} == {5}
    assert _check(demo_url, check_I_19).passed
    # a sample that leaves batch 5 out does not see it
    assert _check(demo_url, check_I_18, batch_ids=[1, 2, 3], sample=3).passed


def test_I19_one_stored_row_altered(demo_url: str) -> None:
    execute(
        demo_url,
        """UPDATE feeding_event SET amount_kg = amount_kg * 1.01
            WHERE (batch_id, fed_at) = (SELECT batch_id, min(fed_at) FROM feeding_event
                                         WHERE batch_id = 2 GROUP BY batch_id)""",
    )
    result = _check(demo_url, check_I_19)
    assert result.violations == 1
    (example,) = result.examples
    assert (example["batch_id"], example["table"]) == (2, "feeding_event")
    assert example["recorded"] != example["stored"]
    assert _check(demo_url, check_I_18).passed  # the job's own record is still right


def test_I19_batch_checksum_not_the_tables(demo_url: str) -> None:
    execute(demo_url, "UPDATE batch_job SET checksum = 'x' WHERE batch_id = 3")
    result = _check(demo_url, check_I_19)
    assert result.violations == 1
    assert result.examples[0]["problem"] == "batch checksum differs"


def test_I19_rows_of_a_batch_without_a_succeeded_job(demo_url: str) -> None:
    execute(demo_url, "UPDATE batch_job SET state = 'planned' WHERE batch_id = 9")
    # scoped to the other batches (as verify does): batch 9's rows are still found
    result = _check(demo_url, check_I_19, batch_ids=ALL_BATCHES[:8])
    with psycopg.connect(demo_url) as conn:
        rows_of_9 = sum(
            conn.execute(f"SELECT count(*) FROM {t} WHERE batch_id = 9").fetchone()[0]  # type: ignore[index]
            for t in ("assignment", "transfer_action", "mortality_event", "feeding_event",
                      "environmental_reading", "growth_sample", "lice_count", "treatment",
                      "harvest_event", "daily_assignment_state")
        )  # fmt: skip
    assert result.violations == rows_of_9 > 0
    assert {e["batch_id"] for e in result.examples} == {9}
    assert {e["problem"] for e in result.examples} == {"rows of a batch without a succeeded job"}


def test_I19_samples_when_there_are_many_batches(demo_url: str) -> None:
    result = _check(demo_url, check_I_19, sample=4)
    assert result.passed
    assert "a sample of 4 of 10 succeeded batches: 1, 4, 7, 10" in result.note


def test_I20_harvest_weights_out_of_band(demo_url: str) -> None:
    execute(
        demo_url,
        f"""UPDATE harvest_event
               SET biomass_kg = biomass_kg * 1.5, mean_weight_g = mean_weight_g * 1.5
             WHERE batch_id = ANY(ARRAY{HARVESTED})""",
    )
    result = _check(demo_url, check_I_20)
    failing = {e["measure"] for e in result.examples}
    assert "Mean harvest weight ÷ drawn target" in failing
    assert "Mean harvest weight" in failing
    assert result.violations == len(result.examples) >= 2
    target = next(
        e for e in result.examples if e["measure"] == "Mean harvest weight ÷ drawn target"
    )
    assert target["share_inside"] == 0.0
    assert {o["batch_id"] for o in target["outside"]} == set(HARVESTED)
    assert all(140 < o["value"] < 160 for o in target["outside"])


# ---- the realism figures come from the rows, relative to the inputs --------------------------


def test_realism_figures_follow_the_stored_rows(demo_url: str) -> None:
    with psycopg.connect(demo_url) as conn:
        data = gather(conn, ALL_BATCHES)
        by_id = {b.batch_id: b for b in data.batches}
        assert sorted(by_id) == ALL_BATCHES
        assert {b.batch_id for b in data.batches if b.status == "harvested"} == set(HARVESTED)
        for batch_id in HARVESTED:
            figures = by_id[batch_id].values
            n, kg, target, last = conn.execute(
                """SELECT sum(h.fish_count), sum(h.biomass_kg), b.harvest_target_g,
                          max(h.harvest_date)
                     FROM harvest_event h JOIN batch b ON b.id = h.batch_id
                    WHERE h.batch_id = %s GROUP BY b.harvest_target_g""",
                (batch_id,),
            ).fetchone()  # type: ignore[misc]
            placed, to_sea, first_sea = conn.execute(
                """SELECT sum(t.fish_count) FILTER (WHERE t.source_assignment_id IS NULL),
                          sum(t.fish_count) FILTER (WHERE a.stage_id = 6 AND s.stage_id = 5),
                          min(t.transfer_date) FILTER (WHERE a.stage_id = 6)
                     FROM transfer_action t
                     JOIN assignment a ON a.id = t.dest_assignment_id
                     LEFT JOIN assignment s ON s.id = t.source_assignment_id
                    WHERE t.batch_id = %s""",
                (batch_id,),
            ).fetchone()  # type: ignore[misc]
            assert figures["harvest_weight_kg"] == pytest.approx(kg / n)
            assert figures["harvest_weight_vs_target_pct"] == pytest.approx(
                100 * 1000 * kg / n / target
            )
            assert figures["freshwater_survival_pct"] == pytest.approx(100 * to_sea / placed)
            assert figures["days_at_sea"] == (last - first_sea).days
            assert 0 < figures["sea_mortality_pct"] < 100
            assert list(by_id[batch_id].stage_survival) == [
                "Egg&Alevin", "Fry", "Parr", "Smolt", "Post-Smolt",
            ]  # fmt: skip
        # freshwater batches have no sea figures: not judged as outside
        assert by_id[10].values["ring_density_kg_m3"] is None
        assert by_id[10].values["tank_load_pct"] is not None
        assert set(data.sea_temperatures) == {"Faroe Islands", "Scotland"}
