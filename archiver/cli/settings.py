"""Settings from environment variables (``ARCHIVER_...``) and a TOML file.

Precedence, highest first: explicit overrides (CLI flags), environment
variables, the TOML file, defaults. Defaults point at Prefect's embedded
database, ``$PREFECT_HOME/prefect.db``, and a local folder beside it.
Only the CLI reads this module; the library takes plain options, and the
defaults here are the engine's own (:mod:`archiver.engine.options`), so each is
written down once.
"""

from __future__ import annotations

import os
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from archiver.archive.codec import DEFAULT_COMPRESSION, Compression
from archiver.engine.options import (
    DEFAULT_BATCH_INTERVAL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_READ_AHEAD,
    DEFAULT_RETENTION,
    DEFAULT_SWEEP_BATCH_SIZE,
)
from archiver.engine.sweeps import DEFAULT_EVENTS_RETENTION, DEFAULT_SWEEPS, SweepName
from archiver.errors import ConfigError
from archiver.policy import DEFAULT_LEGAL_HOLD_TAG, MIN_RETENTION, Rule, validate_rules


def _default_sweeps() -> list[SweepName]:
    return list(DEFAULT_SWEEPS)  # events are opt-in


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()


def _default_database_url() -> str:
    return f"sqlite+aiosqlite:///{prefect_home() / 'prefect.db'}"


def _default_storage_url() -> str:
    return str(prefect_home() / "archive")


class Settings(BaseSettings):
    """Everything `archiver run` can be told. Each field has a default and a bound."""

    model_config = SettingsConfigDict(env_prefix="ARCHIVER_", extra="forbid")

    database_url: str = Field(
        default_factory=_default_database_url,
        description="SQLAlchemy async URL of the Prefect database "
        "(postgresql+asyncpg://... or sqlite+aiosqlite:///...).",
    )
    storage_url: str = Field(
        default_factory=_default_storage_url,
        description="Where archives go: a local folder or any fsspec URL (s3://bucket/prefix).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to fsspec: endpoint_url, key, secret, profile, s3_additional_kwargs.",
    )
    retention_period: timedelta = Field(
        default=DEFAULT_RETENTION,
        description="Archive runs that ended longer ago than this (seconds or ISO 8601: P90D).",
    )
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE,
        ge=1,
        le=1000,
        description="Top-level runs per batch (one transaction each).",
    )
    batch_interval: float = Field(
        default=DEFAULT_BATCH_INTERVAL,
        ge=0,
        le=3600,
        description="Seconds to sleep between batches.",
    )
    max_batches: int | None = Field(
        default=None, ge=1, description="Stop after this many batches (default: until done)."
    )
    read_ahead: int = Field(
        default=DEFAULT_READ_AHEAD,
        ge=0,
        le=4,
        description="PostgreSQL: batches locked, read and encoded ahead, each on its own "
        "connection, while one is written and deleted (0: one batch at a time).",
    )
    compression: Compression = Field(
        default=DEFAULT_COMPRESSION, description="Parquet compression codec."
    )
    enabled: bool = Field(
        default=False,
        description="When false, `archiver run` only reports what it would archive.",
    )
    vacuum: bool = Field(
        default=False,
        description="After archiving, reclaim space: VACUUM (ANALYZE) the touched tables on "
        "PostgreSQL; incremental_vacuum or VACUUM on SQLite.",
    )
    lock_timeout: float = Field(
        default=30, gt=0, le=3600, description="PostgreSQL lock_timeout in seconds."
    )
    statement_timeout: float = Field(
        default=900, gt=0, le=86400, description="PostgreSQL statement_timeout in seconds."
    )
    busy_timeout: float = Field(
        default=60, gt=0, le=3600, description="SQLite busy_timeout in seconds."
    )
    policies: list[Rule] = Field(
        default_factory=list,
        description="Retention rules ([[policies]] in TOML), first match wins; runs no rule "
        "matches use retention_period.",
    )
    legal_hold_tag: str = Field(
        default=DEFAULT_LEGAL_HOLD_TAG,
        description="Run trees with a flow run carrying this tag are never archived "
        '("" turns the legal hold off).',
    )

    @field_validator("policies")
    @classmethod
    def _rules_can_match(cls, value: list[Rule]) -> list[Rule]:
        return list(validate_rules(value))

    sweeps: list[SweepName] = Field(
        default_factory=_default_sweeps,
        description="Sweeps run after the run batches: orphans (logs, artifacts and standalone "
        "task runs of no existing run), collections (artifact collections whose latest "
        "artifact is gone), events (opt-in: events older than events_retention_period).",
    )
    events_retention_period: timedelta = Field(
        default=DEFAULT_EVENTS_RETENTION,
        description="The events sweep archives events that occurred longer ago than this.",
    )
    sweep_batch_size: int = Field(
        default=DEFAULT_SWEEP_BATCH_SIZE,
        ge=100,
        le=50_000,
        description="Rows of the swept table per sweep batch.",
    )

    @field_validator("retention_period", "events_retention_period")
    @classmethod
    def _at_least_an_hour(cls, value: timedelta) -> timedelta:
        if value < MIN_RETENTION:
            raise ValueError(f"must be at least 1 hour, got {value}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load settings; raise ConfigError with one line naming the bad field."""
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        _check_toml(config_file)

        class FileSettings(Settings):
            model_config = SettingsConfigDict(toml_file=config_file)

        settings_cls = FileSettings
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc), hint=_hint(config_file)) from None


def _check_toml(config_file: Path) -> None:
    if not config_file.is_file():
        raise ConfigError(
            f"config file {config_file} does not exist",
            hint="pass --config with the path of a TOML file, e.g. config.example.toml",
        )
    try:
        tomllib.loads(config_file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "settings"
    if first["loc"][:1] == ("policies",) and len(first["loc"]) > 1:
        return _describe_rule(first, exc.error_count())
    if first["type"] == "extra_forbidden":
        return f"unknown setting {field!r}"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid setting {field}: {message}{more}"


def _describe_rule(error: Any, count: int) -> str:
    """Name the rule by its position, 1-based as in the file (the default names are rule-N)."""
    position, *inner = error["loc"][1:]
    where = f"policies rule {int(position) + 1}" if isinstance(position, int) else "policies"
    field = ".".join(str(part) for part in inner)
    more = f" (and {count - 1} more)" if count > 1 else ""
    if error["type"] == "extra_forbidden":
        return f"unknown field {field!r} in {where}; rules take {', '.join(Rule.model_fields)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"invalid {where}{' ' + field if field else ''}: {message}{more}"


def _hint(config_file: Path | None) -> str:
    where = f"{config_file} or " if config_file else ""
    return f"fix it in {where}the ARCHIVER_* environment variables; see config.example.toml"
