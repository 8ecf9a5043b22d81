"""The record of a batch: what was written, row counts, checksums, and its fate.

Two documents per batch, both written whole in one PUT:

* ``_pending/<batch>.json`` (:class:`PendingMarker`): written *before* any data
  file. It lists the keys the batch is about to write, so that recovery can
  remove them if the batch never commits.
* ``_manifests/<batch>.json`` (:class:`BatchManifest`): written after the
  database commit. The same JSON is stored in the ledger row that commits with
  the DELETEs, so a missing manifest can always be rewritten from the database.

The batch's fate is decided by the ledger alone; see ``docs/commit-protocol.md``.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, ValidationError

from archiver.errors import VerificationError
from archiver.models import BatchKind, Role

FORMAT_VERSION = 1


class FileRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    table: str
    key: str
    rows: int
    bytes: int
    sha256: str
    #: ``archived``: rows deleted from the database; ``reference``: a snapshot (flow, deployment)
    role: Role


class BatchManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    batch_id: str
    source_id: str
    created_at: datetime
    cutoff: datetime
    partition: str
    source_dialect: str
    source_revision: str
    archiver_version: str
    root_ids: list[str]
    end_time_min: datetime
    end_time_max: datetime
    files: list[FileRecord]
    #: the batch this one rewrote (rows restored out of it); that batch is gone
    replaces: str | None = None
    #: the retention rule that selected each root ("default": retention_period);
    #: empty in manifests written before retention policies existed
    root_rules: dict[str, str] = {}
    #: a compacted batch: every batch merged into it (at any depth) -> its top-level run ids
    compacted_from: dict[str, list[str]] = {}

    @property
    def supersedes(self) -> set[str]:
        """Batches this one took the place of; their manifests may linger until cleaned up."""
        return set(self.compacted_from) | ({self.replaces} if self.replaces else set())

    #: what selected the rows: expired run trees, or a sweep (orphans, standalone task
    #: runs, artifact collections, events). Sweep batches have no root_ids, and
    #: end_time_min/max span the time column the sweep selected by.
    kind: BatchKind = "runs"

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> BatchManifest:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise VerificationError(
                f"{where} is not a valid archiver manifest: {exc.errors()[0]['msg']}",
                hint="restore the manifest from the ledger table (archiver.batch / "
                "archiver_batch), which holds every committed manifest",
            ) from None


def current_batches(manifests: list[BatchManifest]) -> list[BatchManifest]:
    """The manifests no other manifest supersedes: each committed row exactly once.

    A rewrite or a compaction publishes its manifest before it removes the
    batches it replaces, so for a moment storage holds both; readers that go
    through this function never see a row twice.
    """
    gone = set().union(*(manifest.supersedes for manifest in manifests))
    return [manifest for manifest in manifests if manifest.batch_id not in gone]


class PendingMarker(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_id: str
    source_id: str
    created_at: datetime
    keys: list[str]
    #: keys of a batch this one rewrites, removed once this batch has committed
    replaces: list[str] = []

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "marker") -> PendingMarker:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise VerificationError(
                f"{where} is not a valid archiver pending marker: {exc.errors()[0]['msg']}",
                hint="inspect it by hand; archiver will not guess which files it covers",
            ) from None
