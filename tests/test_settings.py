"""Settings: TOML file, environment, bounds, and one-line errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from archiver.cli.settings import Settings, load_settings
from archiver.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads_as_is_and_documents_every_setting() -> None:
    settings = load_settings(ROOT / "config.example.toml")
    assert settings.enabled is False
    assert settings.retention_period == timedelta(days=90)
    text = (ROOT / "config.example.toml").read_text()
    for name in Settings.model_fields:
        assert name in text, f"config.example.toml does not mention {name}"


def test_defaults_point_at_prefects_embedded_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path}/prefect.db"
    assert settings.storage_url == str(tmp_path / "archive")
    assert settings.batch_size == 200 and settings.compression == "zstd"


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "archiver.toml"
    config.write_text('retention_period = "P10D"\nbatch_size = 10\n')
    monkeypatch.setenv("ARCHIVER_BATCH_SIZE", "20")
    settings = load_settings(config)
    assert settings.batch_size == 20
    assert settings.retention_period == timedelta(days=10)


@pytest.mark.parametrize("value", [3600, "PT1H", "P90D", 86400 * 7])
def test_retention_accepts_seconds_and_iso_8601(value: object) -> None:
    assert load_settings(retention_period=value).retention_period >= timedelta(hours=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"retention_period": 1800}, "invalid setting retention_period: must be at least 1 hour"),
        ({"retention_period": "PT59M"}, "must be at least 1 hour"),
        ({"batch_size": 5000}, "invalid setting batch_size"),
        ({"compression": "zip"}, "invalid setting compression"),
        ({"events_retention_period": "PT30M"}, "invalid setting events_retention_period"),
        ({"sweeps": ["orphans", "logs"]}, "invalid setting sweeps.1"),
        ({"sweep_batch_size": 10}, "invalid setting sweep_batch_size"),
    ],
)
def test_bad_values_give_one_line_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(**overrides)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert "Try:" in str(raised.value)


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "archiver.toml"
    config.write_text("retension_period = 3600\n")
    with pytest.raises(ConfigError, match="unknown setting 'retension_period'"):
        load_settings(config)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("batch_size = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_sweeps_default_to_orphans_and_collections_and_read_json_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().sweeps == ["orphans", "collections"]
    monkeypatch.setenv("ARCHIVER_SWEEPS", '["events"]')
    assert load_settings().sweeps == ["events"]
