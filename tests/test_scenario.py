"""Bad scenarios fail at once with a message naming the field, and write nothing."""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.scenario import ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
DEMO_PATH = ROOT / "scenarios" / "demo.toml"
DEMO_DATA: dict[str, Any] = load_scenario(DEMO_PATH).model_dump(mode="json")
AQUASIM = ROOT / ".venv" / "bin" / "aquasim"


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """Set a dotted path (list indexes as numbers) in the scenario data."""

    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def _delete(key: str) -> Callable[[dict], None]:
    return lambda data: data.pop(key)


def _swap_first_stages(data: dict) -> None:
    data["stages"][0], data["stages"][1] = data["stages"][1], data["stages"][0]


def _drop_salinity(data: dict) -> None:
    data["parameters"] = [p for p in data["parameters"] if p["name"] != "Salinity"]


BAD_VALUES = {
    "out of range": (_set("target_saturation", 1.5), "target_saturation"),
    "zero years": (_set("years", 0), "years"),
    "stage mortality": (_set("stages.0.mortality_pct_day", 9), "stages.0.mortality_pct_day"),
    "negative husbandry": (
        _set("husbandry.transfer_window_days", -3),
        "husbandry.transfer_window_days",
    ),
    "unknown key": (_set("colour", "blue"), "colour"),
    "wrong type": (_set("years", "five"), "years"),
    "missing field": (_delete("as_of_date"), "as_of_date"),
    "stage order": (_swap_first_stages, "stages"),
    "missing parameter": (_drop_salinity, "Salinity"),
    "sea temperatures": (_set("geographies.0.sea_temp_max_c", 5.0), "sea_temp_max_c"),
    "reading interval": (_set("readings.interval_minutes", 7), "interval_minutes"),
    "egg range": (_set("eggs", [700_000, 600_000]), "eggs"),
}


@pytest.mark.parametrize("change, field", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_value_names_its_field(change: Callable[[dict], None], field: str) -> None:
    data = copy.deepcopy(DEMO_DATA)
    change(data)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    message = str(info.value)
    assert field in message
    assert "\n" not in message


def test_the_demo_itself_is_valid() -> None:
    assert parse_scenario(copy.deepcopy(DEMO_DATA)) == load_scenario(DEMO_PATH)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not found") as info:
        load_scenario(tmp_path / "nowhere.toml")
    assert "nowhere.toml" in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("name = 'x'\nyears = = 3\n")
    with pytest.raises(ScenarioError, match="not valid TOML") as info:
        load_scenario(path)
    assert "broken.toml" in str(info.value)


def test_bad_value_in_a_file_that_extends_another(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'extends = "{DEMO_PATH}"\n[readings]\ninterval_minutes = 7\n')
    with pytest.raises(ScenarioError, match="interval_minutes"):
        load_scenario(path)


# ---- through the command line: exit 2, one line, nothing written --------------------------


def _public_tables(db_url: str) -> list[str]:
    libpq = db_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(libpq) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return [r[0] for r in rows]


def _aquasim(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AQUASIM_")}
    return subprocess.run(
        [str(AQUASIM), *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


CLI_CASES = {
    "out of range": ("target_saturation = 1.5\n", "target_saturation"),
    "stage value": ("[[stages]]\nid = 1\nname = 'Egg'\ndays = 3\nweight_in_g = 0.1\n", "days"),
    "invalid toml": ("years = = 3\n", "not valid TOML"),
}


@pytest.mark.parametrize("body, field", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_refuses_a_bad_scenario_and_writes_nothing(
    body: str, field: str, db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'extends = "{DEMO_PATH}"\n{body}')
    env = {
        "AQUASIM_DATABASE_URL": db_url,
        "AQUASIM_BROKER_URL": "redis://127.0.0.1:6379/0",
        "AQUASIM_DATA_DIR": str(tmp_path / "data"),
    }
    result = _aquasim(["plan", "--scenario", str(path)], env, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aquasim: error: ")
    assert field in lines[0]
    assert result.stdout == ""
    assert _public_tables(db_url) == []
    assert not (tmp_path / "data").exists()  # no embedded server was started either
