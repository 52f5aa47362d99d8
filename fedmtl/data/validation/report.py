"""The validation report (one :class:`ClientValidation` per client, the validated digests),
reading it back, binding training to the files validated (:func:`bind_partitions`) and the
clients training may use (:func:`usable_clients`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmtl.data.manifest import (Manifest, PartitionDigest, UnsafeManifest, file_digest,
                                  partition_path)


REPORT = "report.json"
DATA_DOCS = "data_docs"
READ_CHECK = "read_partition_file"  # the failure of a missing or unreadable file
CHANGED_CHECK = "partition_file_unchanged"  # a file changed after validation (bind_partitions)


# ---------------------------------------------------------------------------------------------
# Report model


@dataclass
class ClientValidation:
    """The outcome for one client: its partition file and every failed check."""

    client: str
    file: str
    passed: bool
    failures: list[dict[str, Any]] = field(default_factory=list)
    # each failure: {"expectation": GX type name, "column": str | None, "detail": str}
    sha256: str | None = None  # of the bytes validated (None: the file could not be read)
    size: int | None = None

    @property
    def digest(self) -> PartitionDigest | None:
        if self.sha256 is None or self.size is None:
            return None
        return PartitionDigest(self.sha256, self.size)

    @property
    def reasons(self) -> list[str]:
        """One line per failure naming the client, the expectation and the column."""
        out = []
        for f in self.failures:
            where = f" on column '{f['column']}'" if f.get("column") else ""
            out.append(f"client '{self.client}': {f['expectation']} failed{where}: {f['detail']}")
        return out


@dataclass
class ValidationReport:
    """Every validated client, in manifest order, and the manifest's SHA-256
    (:func:`manifest_digest`) it was validated against."""

    clients: dict[str, ClientValidation]
    manifest_sha256: str | None = None

    @property
    def passed(self) -> list[str]:
        return [c for c, v in self.clients.items() if v.passed]

    @property
    def quarantined(self) -> dict[str, list[str]]:
        """client -> reasons, for every client that failed validation."""
        return {c: v.reasons for c, v in self.clients.items() if not v.passed}

    @property
    def changed(self) -> dict[str, str]:
        """client -> why, for the clients quarantined by :func:`bind_partitions` (their files
        changed, or went missing, after validation)."""
        return {c: f["detail"] for c, v in self.clients.items() for f in v.failures
                if f.get("expectation") == CHANGED_CHECK}

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_sha256": self.manifest_sha256,
            "summary": {
                "n_clients": len(self.clients),
                "n_passed": len(self.passed),
                "n_quarantined": len(self.clients) - len(self.passed),
                "passed": self.passed,
                "quarantined": self.quarantined,
            },
            "clients": {c: asdict(v) for c, v in self.clients.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ValidationReport:
        return cls(clients={c: ClientValidation(**v) for c, v in raw["clients"].items()},
                   manifest_sha256=raw.get("manifest_sha256"))


def _failure(expectation: str, column: str | None, detail: str) -> dict[str, Any]:
    return {"expectation": expectation, "column": column, "detail": detail}


def read_report(out_dir: str | Path) -> ValidationReport:
    """The report written by :func:`validate_partitions` into ``out_dir``."""
    path = Path(out_dir) / REPORT
    if not path.exists():
        raise FileNotFoundError(
            f"no validation report at '{path}': run `fedmtl data validate` first"
        )
    return ValidationReport.from_dict(json.loads(path.read_text()))


def manifest_digest(manifest: Manifest) -> str:
    """The SHA-256 of the manifest's canonical JSON (what validation checked the files against)."""
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


def bind_partitions(
    partitions_dir: str | Path, manifest: Manifest, report: ValidationReport
) -> tuple[ValidationReport, dict[str, PartitionDigest]]:
    """Bind training to what was validated. Refuses (``ValueError``) a manifest that is not the
    one validated, and a report that records no digests (written before they were recorded).
    Returns the report with every passed client whose file is no longer the one validated
    (missing, unreadable, or another SHA-256 or size) quarantined, its reason naming the client
    and the file, and the digests of the clients that still pass, for the federation to check
    on every read. Each file is hashed once per version
    (:func:`fedmtl.data.manifest.file_digest`)."""
    import dataclasses

    if report.manifest_sha256 is None:
        raise ValueError("the validation report records no partition hashes (written by an older "
                         "fedmtl): re-run `fedmtl data validate`")
    if report.manifest_sha256 != manifest_digest(manifest):
        raise ValueError(f"'{Path(partitions_dir) / 'manifest.json'}' changed after validation "
                         f"(its SHA-256 is not the validated {report.manifest_sha256[:12]}…): "
                         "re-run `fedmtl data validate`")
    clients = dict(report.clients)
    digests: dict[str, PartitionDigest] = {}
    for entry in manifest.clients:
        v = clients.get(entry.client)
        if v is None or not v.passed:
            continue
        expected = v.digest
        if expected is None:
            problem = "the validation report records no hash of it: re-run `fedmtl data validate`"
        else:
            problem = _file_problem(partitions_dir, entry.client, entry.file, expected)
        if problem is None:
            digests[entry.client] = expected
        else:
            clients[entry.client] = dataclasses.replace(
                v, passed=False, failures=[*v.failures, _failure(CHANGED_CHECK, None, problem)])
    return dataclasses.replace(report, clients=clients), digests


def _file_problem(
    partitions_dir: str | Path, client: str, file: str, expected: PartitionDigest
) -> str | None:
    path = Path(partitions_dir) / file
    try:
        path = partition_path(partitions_dir, client, file)
        if path.stat().st_size != expected.size:
            now = f"{path.stat().st_size} bytes"
        else:
            digest = file_digest(path)
            if digest == expected:
                return None
            now = f"SHA-256 {digest.sha256[:12]}…"
    except FileNotFoundError:
        return f"partition file '{path}' is missing (it was validated)"
    except (OSError, UnsafeManifest) as exc:
        return f"partition file '{path}' cannot be read: {exc}"
    return (f"partition file '{path}' changed after validation ({now}; validated SHA-256 "
            f"{expected.sha256[:12]}…, {expected.size} bytes): re-run `fedmtl data validate`")


def usable_clients(manifest: Manifest, report: ValidationReport, min_clients: int) -> list[str]:
    """The clients that passed validation, in manifest order; at least ``min_clients`` of them.

    A manifest client missing from the report (a stale report) counts as not passed.
    """
    passed = set(report.passed)
    usable = [c for c in manifest.client_ids if c in passed]
    if len(usable) >= min_clients:
        return usable
    lines = []
    for client in manifest.client_ids:
        if client in passed:
            continue
        entry = report.clients.get(client)
        if entry is None:
            lines.append(f"client '{client}': not in the validation report (re-run validation)")
        else:
            reasons = entry.reasons or [f"client '{client}': failed validation"]
            more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
            lines.append(reasons[0] + more)
    raise ValueError(
        f"only {len(usable)} of {len(manifest.clients)} clients passed data validation, "
        f"fewer than training.min_clients={min_clients}; quarantined clients:\n  "
        + "\n  ".join(lines)
    )
