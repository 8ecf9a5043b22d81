"""One archive root for a test: a local folder or an S3 bucket on moto (:class:`TestStorage`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


@functools.cache
def _aiobotocore_session() -> Any:
    """One session for the process: botocore's parsed service models, no connection state."""
    from aiobotocore.session import AioSession

    return AioSession()


class TestStorage:
    """An archive root for one test: ``url`` and ``options`` are what the archiver gets."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, kind: str, url: str, options: dict[str, Any], endpoint_url: str | None = None
    ) -> None:
        self.kind = kind
        self.url = url
        self.options = options
        self.endpoint_url = endpoint_url
        self._clients: list[Any] = []

    @property
    def protocol(self) -> str:
        return "s3" if self.kind == "s3" else "file"

    @property
    def root(self) -> str:
        """The root as an fsspec path of :meth:`fs` (no ``s3://``)."""
        return self.url.removeprefix("s3://").rstrip("/")

    @property
    def root_path(self) -> str:
        """Alias of :attr:`root`."""
        return self.root

    @property
    def bucket(self) -> str | None:
        return self.root.split("/", 1)[0] if self.kind == "s3" else None

    def fs(self) -> Any:
        """A fresh filesystem: no instance cache, and on S3 no listings cache.

        On S3 each call makes a new S3FileSystem with its own client and connections; only the
        aiobotocore session (botocore's parsed service models, no connection or listing
        state) is shared, which takes a fresh filesystem's first call from ~0.2 s to ~0.04 s.
        """
        import fsspec

        if self.kind == "s3":
            return fsspec.filesystem(
                "s3",
                skip_instance_cache=True,
                use_listings_cache=False,
                session=_aiobotocore_session(),
                **self.options,
            )
        return fsspec.filesystem("file", skip_instance_cache=True, **self.options)

    def list_files(self, suffix: str = ".parquet") -> list[str]:
        """Every file under the root ending in ``suffix``, as full fsspec paths, sorted."""
        fs = self.fs()
        if not fs.exists(self.root):
            return []
        return sorted(str(p) for p in fs.find(self.root) if str(p).endswith(suffix))

    def keys(self, suffix: str = "") -> list[str]:
        """Like :meth:`list_files` but relative to the root (the archiver's keys)."""
        prefix = self.root + "/"
        return [p.removeprefix(prefix) for p in self.list_files(suffix)]

    def read_bytes(self, key: str) -> bytes:
        data: bytes = self.fs().cat_file(f"{self.root}/{key}")
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        fs = self.fs()
        path = f"{self.root}/{key}"
        if self.kind == "local":
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)

    def break_writes(self) -> None:
        """Make every later write under the root fail for real (no mock).

        S3: every object and then the bucket itself are deleted, so a PUT gets NoSuchBucket.
        Local: the root folder is moved aside (to ``<root>.broken``) and a plain file takes its
        place, so creating folders or files below it fails with an OSError even as root.
        """
        if self.kind == "s3":
            client = self.boto_client()
            bucket = self.bucket
            paginator = client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=bucket):
                doomed = [
                    {"Key": item["Key"], "VersionId": item["VersionId"]}
                    for item in page.get("Versions", []) + page.get("DeleteMarkers", [])
                ]
                if doomed:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": doomed})
            client.delete_bucket(Bucket=bucket)
            return
        root = Path(self.root)
        if root.exists():
            root.rename(root.with_name(root.name + ".broken"))
        root.parent.mkdir(parents=True, exist_ok=True)
        root.write_bytes(b"not a folder: writes below this path must fail\n")

    def boto_client(self) -> Any:
        """A boto3 S3 client on the moto endpoint (closed when the test ends)."""
        if self.kind != "s3":
            raise TypeError("boto_client() is only available for s3 storage")
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        self._clients.append(client)
        return client

    def close(self) -> None:
        while self._clients:
            self._clients.pop().close()

    def __repr__(self) -> str:
        return f"TestStorage({self.kind!r}, {self.url!r})"
