"""The database contract (see the data contract spec) as SQLAlchemy 2 metadata.

Farm, plan and ledger tables are typed declarative classes. The bulk tables a
batch job COPYs into have no surrogate id, so they are plain Core `Table`s on
the same metadata: nothing ever loads them through the ORM.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, ExcludeConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        int: BigInteger(),
        str: Text(),
        float: Double(),
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB(),
    }


def _no_overlap(table: str) -> ExcludeConstraint:
    """No two rows of one container over intersecting `[start_date, end_date)`.

    A NULL end_date makes daterange unbounded above, so an open stay blocks
    every later one; half-open ranges let a hand-over happen on one day.
    """
    period = func.daterange(literal_column("start_date"), literal_column("end_date"))
    return ExcludeConstraint(
        ("container_id", "="), (period, "&&"), using="gist", name=f"ex_{table}_container_period"
    )


# --- farm ---------------------------------------------------------------------


class LifecycleStage(Base):
    __tablename__ = "lifecycle_stage"
    __table_args__ = (CheckConstraint("id BETWEEN 1 AND 6", name="id_range"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(unique=True)


class Geography(Base):
    __tablename__ = "geography"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


class Station(Base):
    __tablename__ = "station"

    id: Mapped[int] = mapped_column(primary_key=True)
    geography_id: Mapped[int] = mapped_column(ForeignKey("geography.id"))
    name: Mapped[str]


class Hall(Base):
    __tablename__ = "hall"

    id: Mapped[int] = mapped_column(primary_key=True)
    station_id: Mapped[int] = mapped_column(ForeignKey("station.id"))
    name: Mapped[str]
    stage_id: Mapped[int] = mapped_column(SmallInteger, ForeignKey("lifecycle_stage.id"))


class SeaArea(Base):
    __tablename__ = "sea_area"

    id: Mapped[int] = mapped_column(primary_key=True)
    geography_id: Mapped[int] = mapped_column(ForeignKey("geography.id"))
    name: Mapped[str]


class ContainerType(Base):
    __tablename__ = "container_type"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    stage_id: Mapped[int] = mapped_column(SmallInteger, ForeignKey("lifecycle_stage.id"))
    volume_m3: Mapped[float]
    max_biomass_kg: Mapped[float]
    max_count: Mapped[int | None] = mapped_column(Integer)


class Container(Base):
    __tablename__ = "container"
    __table_args__ = (
        CheckConstraint("(hall_id IS NULL) <> (sea_area_id IS NULL)", name="one_site"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    container_type_id: Mapped[int] = mapped_column(ForeignKey("container_type.id"))
    hall_id: Mapped[int | None] = mapped_column(ForeignKey("hall.id"))
    sea_area_id: Mapped[int | None] = mapped_column(ForeignKey("sea_area.id"))
    name: Mapped[str]
    volume_m3: Mapped[float]
    max_biomass_kg: Mapped[float]


class Parameter(Base):
    __tablename__ = "parameter"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    unit: Mapped[str]


class Sensor(Base):
    __tablename__ = "sensor"
    __table_args__ = (
        UniqueConstraint("container_id", "parameter_id"),
        UniqueConstraint("id", "container_id", "parameter_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    container_id: Mapped[int] = mapped_column(ForeignKey("container.id"))
    parameter_id: Mapped[int] = mapped_column(ForeignKey("parameter.id"))
    name: Mapped[str]


# --- batches and where they are -------------------------------------------------


class Batch(Base):
    __tablename__ = "batch"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'harvested')", name="status"),
        CheckConstraint("seed >= 0", name="seed_non_negative"),
    )

    # id = batch number, assigned by the plan
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    batch_number: Mapped[int] = mapped_column(Integer, unique=True)
    geography_id: Mapped[int] = mapped_column(ForeignKey("geography.id"))
    start_date: Mapped[date]
    eggs: Mapped[int] = mapped_column(Integer)
    harvest_target_g: Mapped[float]
    seed: Mapped[int]
    status: Mapped[str] = mapped_column(default="active", server_default="active")
    end_date: Mapped[date | None]


class ContainerReservation(Base):
    __tablename__ = "container_reservation"
    __table_args__ = (
        CheckConstraint("start_date < end_date", name="period"),
        _no_overlap("container_reservation"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batch.id"), index=True)
    container_id: Mapped[int] = mapped_column(ForeignKey("container.id"))
    stage_id: Mapped[int] = mapped_column(SmallInteger, ForeignKey("lifecycle_stage.id"))
    start_date: Mapped[date]
    end_date: Mapped[date]


class Assignment(Base):
    __tablename__ = "assignment"
    __table_args__ = (
        CheckConstraint("end_date IS NULL OR start_date < end_date", name="period"),
        UniqueConstraint("id", "batch_id", "container_id"),
        _no_overlap("assignment"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batch.id"), index=True)
    container_id: Mapped[int] = mapped_column(ForeignKey("container.id"))
    stage_id: Mapped[int] = mapped_column(SmallInteger, ForeignKey("lifecycle_stage.id"))
    start_date: Mapped[date]
    end_date: Mapped[date | None]
    tgc: Mapped[float]


class TransferAction(Base):
    __tablename__ = "transfer_action"
    __table_args__ = (CheckConstraint("fish_count > 0", name="fish_count_positive"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batch.id"), index=True)
    # indexed so deleting a batch's assignments need not scan this table per row
    source_assignment_id: Mapped[int | None] = mapped_column(
        ForeignKey("assignment.id"), index=True
    )
    dest_assignment_id: Mapped[int] = mapped_column(ForeignKey("assignment.id"), index=True)
    transfer_date: Mapped[date]
    fish_count: Mapped[int] = mapped_column(Integer)
    mean_weight_g: Mapped[float]
    biomass_kg: Mapped[float]


# --- events: write-only bulk tables, no surrogate id ------------------------------


def _scope(fk_to_assignment: bool) -> list[Any]:
    """The leading (batch_id, assignment_id, container_id) of every event table.

    Only the small tables get the composite FK; the big ones skip it for load
    speed and are checked by verification (I-7) instead.
    """
    parts: list[Any] = [
        Column("batch_id", BigInteger, nullable=False, index=True),
        Column("assignment_id", BigInteger, nullable=False),
        Column("container_id", BigInteger, nullable=False),
    ]
    if fk_to_assignment:
        parts.append(
            ForeignKeyConstraint(
                ["assignment_id", "batch_id", "container_id"],
                ["assignment.id", "assignment.batch_id", "assignment.container_id"],
            )
        )
    return parts


def _col(name: str, type_: Any, nullable: bool = False) -> Column[Any]:
    return Column(name, type_, nullable=nullable)


mortality_event = Table(
    "mortality_event",
    Base.metadata,
    *_scope(fk_to_assignment=False),
    _col("event_date", Date),
    _col("fish_count", Integer),
    _col("cause", Text),
    _col("biomass_kg", Double),
    CheckConstraint(
        "cause IN ('UNKNOWN', 'HANDLING', 'DISEASE', 'ENVIRONMENTAL', 'PREDATION')",
        name="cause",
    ),
    CheckConstraint("fish_count > 0", name="fish_count_positive"),
)

feeding_event = Table(
    "feeding_event",
    Base.metadata,
    *_scope(fk_to_assignment=False),
    _col("fed_at", DateTime(timezone=True)),
    _col("feed_type", Text),
    _col("amount_kg", Double),
    _col("biomass_kg", Double),
)

environmental_reading = Table(
    "environmental_reading",
    Base.metadata,
    *_scope(fk_to_assignment=False),
    _col("sensor_id", BigInteger),
    _col("parameter_id", BigInteger),
    _col("reading_time", DateTime(timezone=True)),
    _col("value", Double),
    postgresql_partition_by="RANGE (reading_time)",
)

growth_sample = Table(
    "growth_sample",
    Base.metadata,
    *_scope(fk_to_assignment=True),
    _col("sample_date", Date),
    _col("fish_count", Integer),
    _col("mean_weight_g", Double),
    _col("sd_weight_g", Double),
    _col("mean_length_cm", Double),
    _col("condition_factor", Double),
)

lice_count = Table(
    "lice_count",
    Base.metadata,
    *_scope(fk_to_assignment=True),
    _col("count_date", Date),
    _col("fish_count", Integer),
    _col("adult_female_per_fish", Double),
    _col("mobile_per_fish", Double),
    _col("attached_per_fish", Double),
)

treatment = Table(
    "treatment",
    Base.metadata,
    *_scope(fk_to_assignment=True),
    _col("treatment_date", Date),
    _col("kind", Text),
    CheckConstraint("kind IN ('vaccination', 'delousing')", name="kind"),
)

harvest_event = Table(
    "harvest_event",
    Base.metadata,
    *_scope(fk_to_assignment=True),
    _col("harvest_date", Date),
    _col("fish_count", Integer),
    _col("biomass_kg", Double),
    _col("mean_weight_g", Double),
)

daily_assignment_state = Table(
    "daily_assignment_state",
    Base.metadata,
    _col("assignment_id", BigInteger),
    _col("state_date", Date),
    Column("batch_id", BigInteger, nullable=False, index=True),
    _col("container_id", BigInteger),
    _col("population", BigInteger),
    _col("mean_weight_g", Double),
    _col("biomass_kg", Double),
    _col("deaths", Integer),
    _col("fish_in", Integer),
    _col("fish_out", Integer),
    _col("harvested", Integer),
    _col("feed_kg", Double),
    _col("temperature_c", Double, nullable=True),
    _col("fcr", Double, nullable=True),
    PrimaryKeyConstraint("assignment_id", "state_date"),
)


# --- pipeline ledger ---------------------------------------------------------------


class Run(Base):
    __tablename__ = "run"

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    seed: Mapped[int]
    as_of_date: Mapped[date]
    scenario: Mapped[dict[str, Any]]
    scenario_hash: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    status: Mapped[str] = mapped_column(default="planned", server_default="planned")
    plan_summary: Mapped[dict[str, Any] | None]


JOB_STATES = ("planned", "queued", "running", "succeeded", "failed")


class BatchJob(Base):
    __tablename__ = "batch_job"
    __table_args__ = (
        CheckConstraint("state IN (" + ", ".join(f"'{s}'" for s in JOB_STATES) + ")", name="state"),
    )

    run_id: Mapped[int] = mapped_column(ForeignKey("run.id"), primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batch.id"), primary_key=True)
    state: Mapped[str] = mapped_column(default="planned", server_default="planned", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    seed: Mapped[int]
    worker: Mapped[str | None]
    attempt_token: Mapped[str | None]
    started_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    rows_written: Mapped[int | None]
    rows_per_table: Mapped[dict[str, Any] | None]
    checksum: Mapped[str | None]
    checksums: Mapped[dict[str, Any] | None]
    timings: Mapped[dict[str, Any] | None]
    error: Mapped[str | None]


class VerificationResult(Base):
    __tablename__ = "verification_result"

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id"), index=True)
    checked_at: Mapped[datetime] = mapped_column(server_default=func.now())
    invariant: Mapped[str]
    rows_examined: Mapped[int]
    violations: Mapped[int]
    examples: Mapped[Any] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    elapsed_s: Mapped[float | None]
    passed: Mapped[bool]


# --- what the pipeline needs to know -----------------------------------------------

metadata = Base.metadata

# Bulk event tables in load order; a retry deletes them in reverse.
EVENT_TABLES: tuple[str, ...] = (
    "mortality_event",
    "feeding_event",
    "environmental_reading",
    "growth_sample",
    "lice_count",
    "treatment",
    "harvest_event",
    "daily_assignment_state",
)

# Everything one batch job writes, in load order (assignments first: the small
# event tables reference them).
BATCH_TABLES: tuple[str, ...] = ("assignment", "transfer_action", *EVENT_TABLES)

COPY_COLUMNS: dict[str, tuple[str, ...]] = {
    name: tuple(c.name for c in metadata.tables[name].columns) for name in BATCH_TABLES
}

FARM_TABLES: tuple[str, ...] = (
    "lifecycle_stage",
    "geography",
    "station",
    "hall",
    "sea_area",
    "container_type",
    "container",
    "parameter",
    "sensor",
)
PLAN_TABLES: tuple[str, ...] = ("batch", "container_reservation")
LEDGER_TABLES: tuple[str, ...] = ("run", "batch_job", "verification_result")
