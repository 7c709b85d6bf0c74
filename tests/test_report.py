"""`aquasim report` against a real PostgreSQL, opened in a real headless Chromium.

A demo dataset is built once per module: the demo plan, then every batch job run
the way `aquasim run` runs it, so `batch_job` carries state, timings, start and
finish times and rows per table. The report is written through the CLI, checked
to be self-contained, then rendered by Debian's `chromium` (installed with
apt-get by the `chromium` fixture when missing): every plot div must hold a
rendered plotly `svg.main-svg` with at least one trace. The screenshot is kept as
`test-artifacts/report.png` (git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from pipeline import realism
from pipeline.cli import app
from pipeline.planner import stage_starts
from pipeline.report import FIGURE_IDS, collect, expected_curve, pick_sample, realism_data
from pipeline.scenario import load_scenario
from tests.conftest import ROOT
from tests.demo_data import build_demo, scratch_database
from workers.engine import calibrated_tgc

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
)
SCREEN = (1400, 5600)


# ---- the browser ------------------------------------------------------------------------


def _find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> str:
    """The chromium binary; installed from Debian's packages with apt-get when missing.

    Skips (with the reason) only where apt-get is unavailable or we are not root;
    a failing install on a machine that has apt is an error, not a skip.
    """
    found = _find_chromium()
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("chromium is not installed and apt-get is unavailable to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        [apt, "update"],
        [apt, "install", "-y", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
            )
    found = _find_chromium()
    if found is None:
        raise RuntimeError("apt-get installed chromium but no chromium binary is on PATH")
    return found


@pytest.fixture(scope="session")
def chromium() -> str:
    return ensure_chromium()


def run_chromium(binary: str, *args: str, timeout: float = 240) -> tuple[str, float]:
    """Run headless chromium once with a fresh profile; (stdout, seconds)."""
    with tempfile.TemporaryDirectory(prefix="aq-chromium-") as profile:
        began = time.perf_counter()
        done = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        seconds = time.perf_counter() - began
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-3000:]}"
    return done.stdout, seconds


class _PlotScan(HTMLParser):
    """For each element with one of the wanted ids: does it hold a plotly main-svg, and
    how many traces were drawn inside it (`g.trace`, or `g.hm` for a heatmap)."""

    VOID = {
        "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr",
    }  # fmt: skip

    def __init__(self, wanted: set[str]) -> None:
        super().__init__()
        self.wanted = wanted
        self.stack: list[str | None] = []  # the wanted id an open element starts, else None
        self.found: dict[str, dict[str, int]] = {}

    def _inside(self) -> list[str]:
        return [w for w in self.stack if w is not None]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        for owner in self._inside():
            counts = self.found[owner]
            if tag == "svg" and "main-svg" in classes:
                counts["main_svg"] += 1
            if tag == "g" and ("trace" in classes or "hm" in classes):
                counts["traces"] += 1
        if tag in self.VOID:
            return
        ident = a.get("id")
        if ident in self.wanted:
            self.found[ident] = {"main_svg": 0, "traces": 0}
            self.stack.append(ident)
        else:
            self.stack.append(None)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self.stack:
            self.stack.pop()


def scan_plots(dom: str, ids: tuple[str, ...]) -> dict[str, dict[str, int]]:
    scan = _PlotScan(set(ids))
    scan.feed(dom)
    scan.close()
    return scan.found


# ---- the dataset ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_url(server_url: str) -> Iterator[str]:
    """A fresh database holding the demo plan and every batch, with a filled ledger."""
    with scratch_database(server_url, "aq_report") as url:
        build_demo(url)
        yield url


@pytest.fixture(scope="module")
def report_file(demo_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    db = demo_url.replace("postgresql://", "postgresql+psycopg://", 1)
    began = time.perf_counter()
    result = CliRunner().invoke(
        app,
        ["report", "--out", str(out), "--sample", "5"],
        env={"AQUASIM_DATABASE_URL": db, "AQUASIM_BROKER_URL": "redis://127.0.0.1:6379/0"},
        catch_exceptions=False,
    )
    print(f"\naquasim report: {time.perf_counter() - began:.1f} s\n{result.output}")
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    return out


# ---- tests ------------------------------------------------------------------------------


def test_report_is_one_self_contained_file(report_file: Path) -> None:
    page = report_file.read_text(encoding="utf-8")
    size = report_file.stat().st_size
    print(f"\nreport: {size / 1e6:.2f} MB")
    assert 4_000_000 < size < 15_000_000  # plotly.js inlined (~4.8 MB), data small on the demo
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)  # no script is fetched
    assert not re.search(r"""<(link|img|iframe)[^>]*\b(src|href)\s*=\s*["']?https?:""", page, re.I)
    assert not re.search(r"""@import\s+url\(\s*["']?https?:""", page, re.I)
    assert page.count('<script type="text/javascript">') >= 1
    for div_id in FIGURE_IDS:
        assert f'id="{div_id}"' in page, div_id
    assert "Realism bands" in page


def test_every_plot_renders_in_headless_chromium(chromium: str, report_file: Path) -> None:
    url = report_file.resolve().as_uri()
    dom, dom_seconds = run_chromium(chromium, "--dump-dom", url)
    found = scan_plots(dom, FIGURE_IDS)
    print(f"\nchromium --dump-dom: {dom_seconds:.1f} s; {found}")
    assert set(found) == set(FIGURE_IDS), f"plot divs missing from the DOM: {found}"
    empty = {k: v for k, v in found.items() if v["main_svg"] < 1 or v["traces"] < 1}
    assert not empty, f"plots that did not render: {empty}"

    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "report.png"
    png.unlink(missing_ok=True)
    _, shot_seconds = run_chromium(
        chromium, f"--screenshot={png}", f"--window-size={SCREEN[0]},{SCREEN[1]}", url
    )
    print(f"chromium --screenshot: {shot_seconds:.1f} s -> {png}")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == SCREEN
    assert len(data) > 100_000  # a blank page of this size compresses to a few kB


def test_report_figures_agree_with_realism_gather(demo_url: str) -> None:
    """The report's cheap per-batch figures (daily state, no reading scan) equal the
    verify path's (`pipeline.realism.gather`, from mortality and feeding rows)."""
    with psycopg.connect(demo_url) as conn:
        data = collect(conn, sample=3)
        reference = realism.gather(conn)
    mine = {b.batch_id: b for b in realism_data(data).batches}
    theirs = {b.batch_id: b for b in reference.batches if b.batch_id in mine}
    assert set(mine) == set(theirs) and mine
    assert any(b.status == "harvested" for b in mine.values())
    for batch_id, b in mine.items():
        for key, value in b.values.items():
            other = theirs[batch_id].values[key]
            if value is None or other is None:
                assert value is None and other is None, (batch_id, key, value, other)
            else:
                assert value == pytest.approx(other, rel=1e-9, abs=1e-9), (batch_id, key)
    temperatures = realism_data(data).sea_temperatures
    assert set(temperatures) == set(reference.sea_temperatures)
    for geo, days in temperatures.items():
        ref = dict(reference.sea_temperatures[geo])
        assert {d for d, _ in days} == set(ref)
        for day, mean in days:
            assert mean == pytest.approx(ref[day], abs=1e-9), (geo, day)


def test_report_collect_reads_the_ledger_and_samples(demo_url: str) -> None:
    with psycopg.connect(demo_url) as conn:
        data = collect(conn, sample=4)
        exact = dict(conn.execute("SELECT 'feeding_event', count(*) FROM feeding_event").fetchall())
    assert len(data.sample) == 4 and len(set(data.sample)) == 4
    rows = {r["table"]: r for r in data.table_rows}
    assert rows["feeding_event"]["rows"] == exact["feeding_event"]
    assert rows["feeding_event"]["source"] == "ledger"
    assert rows["container"]["source"] == "count"
    assert rows["environmental_reading"]["rows"] > rows["feeding_event"]["rows"]
    assert {j["state"] for j in data.jobs} == {"succeeded"}
    assert set(data.query_seconds) >= {"occupancy", "growth", "realism", "sea_temperature"}


def test_pick_sample_spreads_over_start_dates() -> None:
    from datetime import date

    batches = [
        {"id": i, "start_date": date(2020, 1, 1) + timedelta(days=30 * i), "has_rows": i != 3}
        for i in range(1, 11)
    ]
    assert pick_sample(batches, 3) == [1, 6, 10]  # 9 candidates: the 1st, 5th and 9th
    assert pick_sample(batches, 50) == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert pick_sample(batches, 0) == []


def test_expected_curve_follows_the_growth_model() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "demo.toml")
    start = scenario.as_of_date - timedelta(days=1200)
    curve = expected_curve(scenario, "Scotland", start, 700_000, 5000.0)
    offsets = [(d - start).days for d in stage_starts(scenario, start)]
    for stage, first in zip(scenario.freshwater_stages, offsets, strict=False):
        end = first + stage.days - 1
        assert curve["weight_g"][end] == pytest.approx(stage.weight_out_g, rel=1e-9)
        assert calibrated_tgc(stage) > 0
    assert curve["weight_g"][-1] >= 5000.0 > curve["weight_g"][-2]
    sea_days = len(curve["day"]) - offsets[-1]
    assert 200 < sea_days <= scenario.sea_stage.days
    assert 0 < curve["population"][-1] < 700_000
    assert list(curve["day"]) == list(range(len(curve["day"])))


def test_report_without_a_run_is_a_user_error(db_url: str) -> None:
    result = CliRunner().invoke(
        app,
        ["report", "--out", "/tmp/never.html"],
        env={"AQUASIM_DATABASE_URL": db_url, "AQUASIM_BROKER_URL": "redis://127.0.0.1:6379/0"},
    )
    assert result.exit_code == 2
    assert "aquasim run" in result.output


if __name__ == "__main__":  # pragma: no cover - `python -m tests.test_report` installs it
    print(ensure_chromium())
