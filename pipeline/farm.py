"""The farm builder: infrastructure, sensors and parameters from the scenario.

Pure and deterministic: the same scenario always gives the same rows with the
same ids, so workers can rebuild the farm locally instead of reading it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from pipeline.scenario import Scenario

HALL_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True, slots=True)
class Container:
    id: int
    container_type_id: int
    stage_id: int
    geography_id: int
    station_id: int | None
    hall_id: int | None
    sea_area_id: int | None
    name: str
    volume_m3: float
    max_biomass_kg: float
    max_count: int | None


@dataclass(frozen=True, slots=True)
class Sensor:
    id: int
    container_id: int
    parameter_id: int
    name: str


@dataclass(frozen=True)
class Farm:
    geographies: tuple[dict, ...]
    stations: tuple[dict, ...]
    halls: tuple[dict, ...]
    sea_areas: tuple[dict, ...]
    stages: tuple[dict, ...]
    container_types: tuple[dict, ...]
    containers: tuple[Container, ...]
    parameters: tuple[dict, ...]
    sensors: tuple[Sensor, ...]

    @cached_property
    def container_by_id(self) -> dict[int, Container]:
        return {c.id: c for c in self.containers}

    @cached_property
    def sensors_by_container(self) -> dict[int, tuple[Sensor, ...]]:
        grouped: dict[int, list[Sensor]] = {}
        for sensor in self.sensors:
            grouped.setdefault(sensor.container_id, []).append(sensor)
        return {cid: tuple(sensors) for cid, sensors in grouped.items()}

    @cached_property
    def parameter_id(self) -> dict[str, int]:
        return {p["name"]: p["id"] for p in self.parameters}

    @cached_property
    def geography_id(self) -> dict[str, int]:
        return {g["name"]: g["id"] for g in self.geographies}

    def table_rows(self) -> dict[str, list[dict]]:
        """Rows per table, in foreign-key order."""
        containers = [
            {
                "id": c.id,
                "container_type_id": c.container_type_id,
                "hall_id": c.hall_id,
                "sea_area_id": c.sea_area_id,
                "name": c.name,
                "volume_m3": c.volume_m3,
                "max_biomass_kg": c.max_biomass_kg,
            }
            for c in self.containers
        ]
        sensors = [
            {
                "id": s.id,
                "container_id": s.container_id,
                "parameter_id": s.parameter_id,
                "name": s.name,
            }
            for s in self.sensors
        ]
        return {
            "lifecycle_stage": list(self.stages),
            "geography": list(self.geographies),
            "station": list(self.stations),
            "hall": list(self.halls),
            "sea_area": list(self.sea_areas),
            "container_type": list(self.container_types),
            "container": containers,
            "parameter": list(self.parameters),
            "sensor": sensors,
        }


def build_farm(scenario: Scenario) -> Farm:
    stages = tuple({"id": s.id, "name": s.name} for s in scenario.stages)
    types = tuple(
        {
            "id": i,
            "name": ct.name,
            "stage_id": ct.stage,
            "volume_m3": ct.volume_m3,
            "max_biomass_kg": ct.biomass_limit_kg,
            "max_count": ct.max_count,
        }
        for i, ct in enumerate(scenario.container_types, start=1)
    )
    type_for_stage = {t["stage_id"]: t for t in types}
    parameters = tuple(
        {"id": i, "name": p.name, "unit": p.unit}
        for i, p in enumerate(scenario.parameters, start=1)
    )
    parameter_id = {p["name"]: p["id"] for p in parameters}

    geographies, stations, halls, areas = [], [], [], []
    containers: list[Container] = []

    def add_container(ctype: dict, geo_id: int, name: str, **where: int | None) -> None:
        containers.append(
            Container(
                id=len(containers) + 1,
                container_type_id=ctype["id"],
                stage_id=ctype["stage_id"],
                geography_id=geo_id,
                station_id=where.get("station_id"),
                hall_id=where.get("hall_id"),
                sea_area_id=where.get("sea_area_id"),
                name=name,
                volume_m3=ctype["volume_m3"],
                max_biomass_kg=ctype["max_biomass_kg"],
                max_count=ctype["max_count"],
            )
        )

    for geo_id, geo in enumerate(scenario.geographies, start=1):
        geographies.append({"id": geo_id, "name": geo.name})
        prefix = "".join(word[0] for word in geo.name.split()).upper()
        for s in range(1, geo.stations + 1):
            station_id = len(stations) + 1
            station_name = f"{prefix}-FW{s:02d}"
            stations.append({"id": station_id, "geography_id": geo_id, "name": station_name})
            for stage in scenario.freshwater_stages:
                hall_id = len(halls) + 1
                hall_name = f"{station_name}-{HALL_LETTERS[stage.id - 1]}"
                halls.append(
                    {
                        "id": hall_id,
                        "station_id": station_id,
                        "name": hall_name,
                        "stage_id": stage.id,
                    }
                )
                for n in range(1, geo.hall_containers[stage.name] + 1):
                    add_container(
                        type_for_stage[stage.id],
                        geo_id,
                        f"{hall_name}{n:02d}",
                        station_id=station_id,
                        hall_id=hall_id,
                    )
        for a in range(1, geo.sea_areas + 1):
            area_id = len(areas) + 1
            area_name = f"{prefix}-SEA{a:02d}"
            areas.append({"id": area_id, "geography_id": geo_id, "name": area_name})
            for n in range(1, geo.rings_per_area + 1):
                add_container(
                    type_for_stage[scenario.sea_stage.id],
                    geo_id,
                    f"{area_name}-R{n:02d}",
                    sea_area_id=area_id,
                )

    sensors: list[Sensor] = []
    for c in containers:
        for pname in scenario.parameter_names(at_sea=c.sea_area_id is not None):
            sensors.append(Sensor(len(sensors) + 1, c.id, parameter_id[pname], f"{c.name}:{pname}"))

    return Farm(
        geographies=tuple(geographies),
        stations=tuple(stations),
        halls=tuple(halls),
        sea_areas=tuple(areas),
        stages=stages,
        container_types=types,
        containers=tuple(containers),
        parameters=parameters,
        sensors=tuple(sensors),
    )
