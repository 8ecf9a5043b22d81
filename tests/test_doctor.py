"""`archiver doctor`: each check finds what it is for, in process, against real parts."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from archiver.archive.manifest import PendingMarker
from archiver.cli.app import app
from archiver.cli.doctor import Status, _clock_check, _Facts
from tests import factory
from tests.factory import TestDatabase, TestStorage
from tests.helpers import EXPIRED, archive, moto_process, mounted_tmpfs, write_config


def doctor(config: Path, *args: str) -> tuple[int, dict[str, dict[str, str]]]:
    result = CliRunner().invoke(app, ["doctor", "--json", "--config", str(config), *args])
    assert result.exit_code in (0, 1), result.output
    data = json.loads(result.stdout)
    assert data["ok"] == (result.exit_code == 0)
    return result.exit_code, {check["name"]: check for check in data["checks"]}


def config_for(tmp_path: Path, db: TestDatabase, storage: TestStorage, **extra: Any) -> Path:
    return write_config(tmp_path / "c.toml", storage, database_url=db.url, **extra)


def index_names(db: TestDatabase) -> set[str]:
    if db.is_sqlite:
        return {r["name"] for r in db.rows("SELECT name FROM sqlite_master WHERE type = 'index'")}
    rows = db.rows(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE i.indisvalid"
    )
    return {r["relname"] for r in rows}


def test_a_healthy_setup_passes_and_leaves_nothing_behind(
    tmp_path: Path, database: TestDatabase, local_storage: TestStorage
) -> None:
    factory.make_tree(database, end_time=EXPIRED)
    archive(database, local_storage)
    config = config_for(tmp_path, database, local_storage)

    code, checks = doctor(config)

    assert code == 0
    assert {name: check["status"] for name, check in checks.items()} == {
        "database": "OK", "schema": "OK", "indexes": "OK", "clock": "OK",
        "ledger": "OK", "storage": "OK", "pending": "OK",
    }  # fmt: skip
    assert "1 batches committed" in checks["ledger"]["detail"]
    assert local_storage.keys(".txt") == []  # the test object was deleted
    human = CliRunner().invoke(app, ["doctor", "--config", str(config)])
    assert human.exit_code == 0 and "OK   storage" in human.stdout


def test_a_dropped_index_is_found_and_built(
    tmp_path: Path, database: TestDatabase, local_storage: TestStorage
) -> None:
    database.execute("DROP INDEX ix_flow_run__end_time_desc")
    database.execute("DROP INDEX ix_log__task_run_id")
    config = config_for(tmp_path, database, local_storage)

    code, checks = doctor(config)

    assert code == 0 and checks["indexes"]["status"] == "WARN"
    assert "flow_run(end_time), log(task_run_id)" in checks["indexes"]["detail"]
    assert "--create-index" in checks["indexes"]["hint"]

    code, checks = doctor(config, "--create-index")

    assert code == 0 and checks["indexes"]["status"] == "OK", checks["indexes"]
    assert {"ix_flow_run__end_time_desc", "ix_log__task_run_id"} <= index_names(database)
    assert doctor(config)[1]["indexes"]["detail"] == "every lookup of a batch has an index"


def test_an_open_batch_is_reported(
    tmp_path: Path, database: TestDatabase, local_storage: TestStorage
) -> None:
    archive(database, local_storage)  # creates the ledger and this database's source id
    source_id = str(database.scalar(
        "SELECT source_id FROM "
        + ("archiver_source" if database.is_sqlite else "archiver.source")
    ))  # fmt: skip
    for batch_id, source in (("b1", source_id), ("b2", "another-database")):
        marker = PendingMarker(
            batch_id=batch_id, source_id=source, created_at=datetime.now(UTC), keys=[]
        )
        local_storage.write_bytes(f"_pending/{batch_id}.json", marker.to_json().encode())

    code, checks = doctor(config_for(tmp_path, database, local_storage))

    assert code == 0 and checks["pending"]["status"] == "WARN"
    assert checks["pending"]["detail"].startswith("1 batches left open")
    assert "1 of other databases" in checks["pending"]["detail"]
    assert "archiver recover" in checks["pending"]["hint"]


@pytest.mark.postgres
def test_wrong_credentials_fail_the_database_check(
    tmp_path: Path, local_storage: TestStorage
) -> None:
    url = "postgresql+asyncpg://no_such_user:pw@127.0.0.1:5432/postgres"
    config = write_config(tmp_path / "c.toml", local_storage, database_url=url)

    code, checks = doctor(config)

    assert code == 1 and checks["database"]["status"] == "FAIL"
    assert "refused the credentials" in checks["database"]["detail"]
    assert "pw@" not in json.dumps(checks)
    assert checks["storage"]["status"] == "OK"  # storage is still checked
    assert "schema" not in checks


def test_a_bad_database_url_fails_the_database_check(
    tmp_path: Path, local_storage: TestStorage
) -> None:
    config = write_config(tmp_path / "c.toml", local_storage, database_url="not a url")
    code, checks = doctor(config)
    assert code == 1 and "is not a database URL" in checks["database"]["detail"]


def test_clock_skew_above_the_limit_warns() -> None:
    assert _clock_check(_Facts(skew=-45.0), "postgresql", 30).status is Status.WARN
    check = _clock_check(_Facts(skew=2.0), "postgresql", 30)
    assert check.status is Status.OK and "2.0 s ahead of this host" in check.detail


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs: writes fail with EROFS even for root."""
    with mounted_tmpfs(tmp_path / "readonly", "ro,size=16k") as mount_point:
        yield mount_point


@pytest.mark.sqlite
def test_a_read_only_folder_fails_the_storage_check(
    tmp_path: Path, sqlite_database: TestDatabase, read_only_folder: Path
) -> None:
    config = write_config(
        tmp_path / "c.toml", database_url=sqlite_database.url, storage_url=str(read_only_folder)
    )

    code, checks = doctor(config)

    assert code == 1 and checks["storage"]["status"] == "FAIL"
    assert "is not writable" in checks["storage"]["detail"]
    assert checks["database"]["status"] == "OK"


@pytest.fixture(scope="module")
def read_only_bucket() -> Iterator[dict[str, Any]]:
    """A moto server of its own that checks IAM policies, with a bucket that the
    credentials it returns may list and read but not write."""
    import boto3

    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    with moto_process(env) as endpoint:
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        admin |= {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", **admin).create_bucket(Bucket="archive")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(
            UserName="reader",
            PolicyName="read-only",
            PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket", "s3:GetObject", "s3:ListAllMyBuckets"],
                    "Resource": "*",
                }],
            }),
        )  # fmt: skip
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        call = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", b"0", {"Content-Type": "text/plain"}, method="POST"
        )
        urllib.request.urlopen(call, timeout=10).close()  # from now on, policies apply
        yield {
            "endpoint_url": endpoint,
            "key": key["AccessKeyId"],
            "secret": key["SecretAccessKey"],
            "client_kwargs": {"region_name": "us-east-1"},
        }


@pytest.mark.s3
@pytest.mark.sqlite
def test_a_read_only_bucket_fails_the_storage_check(
    tmp_path: Path, sqlite_database: TestDatabase, read_only_bucket: dict[str, Any]
) -> None:
    config = write_config(
        tmp_path / "c.toml",
        database_url=sqlite_database.url,
        storage_url="s3://archive/prefect",
        storage_options=read_only_bucket,
    )

    code, checks = doctor(config)

    assert code == 1 and checks["storage"]["status"] == "FAIL", checks["storage"]
    assert "is not writable" in checks["storage"]["detail"]
    assert "access denied" in checks["storage"]["detail"]
