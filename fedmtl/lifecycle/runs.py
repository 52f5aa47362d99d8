"""A training run's record in its directory (``training.workdir``/runs/KEY/run.json): its
settings' fingerprint, data version, MLflow run and whether it finished, and how an interrupted
run is found again to be resumed (:func:`find_resumable`); its checkpoints are
:mod:`fedmtl.lifecycle.checkpoint`'s."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmtl.data.manifest import atomic_write_bytes

RUN_RECORD = "run.json"
#: Settings that may differ between an interrupted run and its resumption: they change how the
#: work is scheduled or simulated, not its result.
RESUME_FREE = ("faults.", "runner.")


class ResumeError(ValueError):
    """No interrupted run that may be resumed with these settings (the message says why)."""


def fingerprint(settings: dict[str, Any]) -> str:
    """A hash of the settings that decide a run's result (all but :data:`RESUME_FREE`)."""
    decisive = {k: v for k, v in settings.items() if not k.startswith(RESUME_FREE)}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class RunRecord:
    """What a run directory says about its run: written when the run starts, marked finished
    when it ends; an unfinished record is a run that can be resumed."""

    key: str
    settings: dict[str, Any]
    data_version: str
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    finished: bool = False

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    def save(self, directory: str | Path) -> None:
        body = {
            "key": self.key,
            "settings": self.settings,
            "data_version": self.data_version,
            "flow_run_id": self.flow_run_id,
            "mlflow_run_id": self.mlflow_run_id,
            "finished": self.finished,
        }
        atomic_write_bytes(
            Path(directory) / RUN_RECORD, (json.dumps(body, indent=1, default=str) + "\n").encode()
        )

    @classmethod
    def load(cls, directory: str | Path) -> "RunRecord":
        raw = json.loads((Path(directory) / RUN_RECORD).read_text())
        return cls(
            raw["key"],
            dict(raw["settings"]),
            str(raw["data_version"]),
            raw.get("flow_run_id"),
            raw.get("mlflow_run_id"),
            bool(raw.get("finished")),
        )


def unfinished_runs(runs_root: str | Path) -> list[tuple[Path, RunRecord]]:
    """Run directories under ``runs_root`` whose record is not finished, the newest first."""
    root = Path(runs_root)
    found = []
    for record in root.glob(f"*/{RUN_RECORD}") if root.is_dir() else []:
        try:
            run = RunRecord.load(record.parent)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run record we wrote; never resumed
        if not run.finished:
            found.append((record.stat().st_mtime, record.parent, run))
    return [(path, run) for _, path, run in sorted(found, key=lambda item: item[0], reverse=True)]


def find_resumable(
    runs_root: str | Path,
    settings: dict[str, Any],
    data_version: str,
    *,
    flow_run_id: str | None = None,
    latest: bool = False,
) -> tuple[Path, RunRecord] | None:
    """The interrupted run to continue: the one started by the same Prefect flow run (a retry of
    the flow run resumes by itself), else, with ``latest``, the newest unfinished run with the same
    settings (all but :data:`RESUME_FREE`) and data version. ``latest`` with none to resume
    raises :class:`ResumeError` saying what differs from the newest unfinished run."""
    candidates = unfinished_runs(runs_root)
    if flow_run_id:
        for path, run in candidates:
            if run.flow_run_id == flow_run_id:
                return path, run
    if not latest:
        return None
    wanted = fingerprint(settings)
    for path, run in candidates:
        if run.fingerprint == wanted and run.data_version == data_version:
            return path, run
    if not candidates:
        raise ResumeError(f"nothing to resume: no unfinished run in {runs_root}")
    path, newest = candidates[0]
    if newest.data_version != data_version:
        why = f"the data version is {data_version}, the run trained on {newest.data_version}"
    else:
        diff = sorted(
            k
            for k in set(settings) | set(newest.settings)
            if not k.startswith(RESUME_FREE) and settings.get(k) != newest.settings.get(k)
        )
        why = (
            "settings differ: "
            + "; ".join(
                f"{k}: {newest.settings.get(k)!r} then, {settings.get(k)!r} now" for k in diff[:8]
            )
            + (" …" if len(diff) > 8 else "")
        )
    raise ResumeError(
        f"cannot resume the unfinished run {newest.key} ({path}): {why}. Resume with the "
        "same settings and data, or train without --resume to start a new run"
    )
