"""Bring a DVC project's data to its latest version: the data stages of dvc.yaml, reproduced.

A scheduled run (flows/scheduled.py) calls :func:`refresh` in the project's root directory:
``dvc repro --force --single-item prepare`` (the source may have new rows although no
parameter changed: a table file is not a DVC dependency), then ``dvc repro validate``, which
re-runs ``partition`` and ``validate`` only when the prepared data changed. dvc.lock then
records the partitions' new md5, the ``data_version`` every MLflow run is tagged with
(:mod:`fedmtl.lifecycle.provenance`). :func:`push` stores that version in the default DVC remote.

The stages read their settings from the project's ``params.yaml``; :func:`check_params`
refuses a run whose data settings differ from it (the data would not be what DVC records).
Every failure raises :class:`DataRefreshError` naming the project, stage or setting at fault,
with the stage's own error message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from fedmtl.config import Config, ConfigError, flatten, load_config

DATA_STAGES = ("prepare", "partition", "validate")
#: the sections of the settings the data stages read (dvc.yaml's ``params``)
DATA_SECTIONS = ("data", "validation")


class DataRefreshError(RuntimeError):
    """The data could not be brought to its latest DVC version."""


def dvc_executable() -> str:
    """``dvc`` next to this interpreter (the project's virtualenv), else on PATH."""
    here = Path(sys.executable).parent / "dvc"
    if here.exists():
        return str(here)
    found = shutil.which("dvc")
    if found is None:
        raise DataRefreshError(
            "the dvc executable was not found next to this Python or on PATH: "
            "install the project (pip install -e .) or set schedule.refresh_data=false"
        )
    return found


def require_project(root: str | Path) -> Path:
    """``root`` as a DVC project with the data stages, or a DataRefreshError saying what is
    missing."""
    root = Path(root).resolve()
    hint = "run the schedule from the project's root directory, or set schedule.refresh_data=false"
    if not (root / "dvc.yaml").is_file():
        raise DataRefreshError(f"'{root}' is not a DVC project (no dvc.yaml there): {hint}")
    if not (root / ".dvc").is_dir():
        raise DataRefreshError(
            f"'{root}' has a dvc.yaml but DVC is not initialised (no .dvc/): "
            f"run `dvc init` there, or set schedule.refresh_data=false"
        )
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except yaml.YAMLError as exc:
        raise DataRefreshError(f"'{root / 'dvc.yaml'}' is not valid YAML: {exc}") from None
    missing = [s for s in DATA_STAGES if s not in stages]
    if missing:
        raise DataRefreshError(
            f"'{root / 'dvc.yaml'}' has no stage(s) {', '.join(missing)}: "
            f"a scheduled run reproduces {' → '.join(DATA_STAGES)}"
        )
    return root


def check_params(cfg: Config, root: str | Path) -> None:
    """The data stages read ``<root>/params.yaml``: refuse settings for the data that differ."""
    path = Path(root) / "params.yaml"
    if not path.exists():
        raise DataRefreshError(
            f"'{path}' does not exist: DVC's data stages read their settings from it"
        )
    try:
        project = load_config(path)
    except ConfigError as exc:
        raise DataRefreshError(f"'{path}': {exc}") from None
    ours = flatten({k: v for k, v in cfg.model_dump(mode="json").items() if k in DATA_SECTIONS})
    theirs = flatten(
        {k: v for k, v in project.model_dump(mode="json").items() if k in DATA_SECTIONS}
    )
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differ:
        listed = "; ".join(
            f"{k} = {ours.get(k)!r} in this run's settings, {theirs.get(k)!r} in params.yaml"
            for k in differ[:5]
        )
        raise DataRefreshError(
            f"the data settings differ from '{path}', which DVC's data stages read: {listed}"
            f"{' ...' if len(differ) > 5 else ''}. "
            "Change params.yaml (and re-create the deployment), "
            "or set schedule.refresh_data=false"
        )


def _env() -> dict[str, str]:
    """The stages' commands (``fedmtl data ...``) live next to this interpreter."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def _dvc(root: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [dvc_executable(), *args],
            cwd=root,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise DataRefreshError(
            f"`dvc {' '.join(args)}` in '{root}' did not finish within {timeout:.0f} s"
        ) from None


def _cause(output: str) -> str:
    """The stage's own error lines (``error: ...`` from fedmtl, ``ERROR: ...`` from DVC)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith("error:")]
    dvc = [ln for ln in lines if ln.startswith("ERROR:")]
    picked = own + dvc or lines[-5:]
    return " | ".join(picked)


def reproduce(root: str | Path) -> str:
    """Run the data stages (prepare forced); returns DVC's output. Raises DataRefreshError
    naming the stage that failed and its error."""
    root = Path(root)
    output = []
    for args in (("repro", "--force", "--single-item", "prepare"), ("repro", DATA_STAGES[-1])):
        done = _dvc(root, *args)
        output.append(done.stdout + done.stderr)
        if done.returncode != 0:
            text = done.stdout + "\n" + done.stderr
            stage = re.search(r"failed to reproduce '([^']+)'", text)
            where = f"DVC stage '{stage.group(1)}'" if stage else f"`dvc {' '.join(args)}`"
            raise DataRefreshError(
                f"{where} failed in '{root}' (exit {done.returncode}): {_cause(text)}"
            )
    return "\n".join(output)


def remote(root: str | Path) -> str | None:
    """The default DVC remote's name, None when the project has none."""
    done = _dvc(Path(root), "remote", "default")
    name = done.stdout.strip()
    if done.returncode != 0 or not name or " " in name:
        return None
    return name


def push(root: str | Path) -> str | None:
    """``dvc push`` to the default remote; returns its name, None when there is no remote."""
    root = Path(root)
    name = remote(root)
    if name is None:
        return None
    done = _dvc(root, "push")
    if done.returncode != 0:
        raise DataRefreshError(
            f"`dvc push` to remote '{name}' failed in '{root}' (exit {done.returncode}): "
            f"{_cause(done.stdout + chr(10) + done.stderr)}; set schedule.push_data=false "
            "to train without pushing"
        )
    return name
