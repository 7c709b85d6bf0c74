"""Process settings: AQUASIM_* environment variables and an optional .env file.

Settings say *where* things run (servers, data directory, workers); the scenario
file says *what* is simulated.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AQUASIM_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str | None = Field(
        default=None, description="PostgreSQL URL; unset = embedded server under data_dir"
    )
    broker_url: str | None = Field(
        default=None, description="Redis URL; unset = embedded redis under data_dir"
    )
    data_dir: Path = Field(default=Path(".aquasim"), description="embedded servers' home")
    scenario: Path = Field(default=Path("scenarios/default.toml"))
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=0, le=512)
    flower_user: str | None = None
    flower_password: str | None = None
    flower_port: int = Field(default=5555, ge=1, le=65535)
    verify_interval_s: float = Field(default=300.0, gt=0, le=86_400)
    lease_s: float = Field(default=120.0, ge=5, le=3600, description="job lease length")
    max_attempts: int = Field(default=5, ge=1, le=100)
    copy_chunk_rows: int = Field(default=200_000, ge=1_000, le=10_000_000)
    queue: str = Field(
        default="aquasim",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:@-]+$",
        description="Celery queue of the batch jobs (one per dataset when datasets share a Redis)",
    )

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.broker_url is None
