"""The aquasim database schema: table definitions and the DDL that manages them."""

from schema.ddl import (
    DEFAULT_PARTITION,
    PartitionConflict,
    create_schema,
    drop_schema,
    ensure_reading_partitions,
    reading_partition_name,
    timescaledb_available,
)
from schema.models import (
    BATCH_TABLES,
    COPY_COLUMNS,
    EVENT_TABLES,
    FARM_TABLES,
    LEDGER_TABLES,
    PLAN_TABLES,
    Base,
    metadata,
)

__all__ = [
    "BATCH_TABLES",
    "COPY_COLUMNS",
    "DEFAULT_PARTITION",
    "EVENT_TABLES",
    "FARM_TABLES",
    "LEDGER_TABLES",
    "PLAN_TABLES",
    "Base",
    "PartitionConflict",
    "create_schema",
    "drop_schema",
    "ensure_reading_partitions",
    "metadata",
    "reading_partition_name",
    "timescaledb_available",
]
