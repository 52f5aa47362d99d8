"""Keep library chatter off the user's terminal: analytics, progress bars, INFO logs (and
one start-up timeout too short for a busy machine).

Only environment defaults and logging levels: a user's own settings always win.
"""

from __future__ import annotations

import logging
import os
import warnings

DEFAULTS = {
    # Prefect: no telemetry (it logs an ERROR with no network); warnings and errors only.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
    # MLflow (its import resets its loggers to this level) and GitPython
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    # Great Expectations
    "GX_ANALYTICS_ENABLED": "false",
    # tqdm-based progress bars in libraries
    "TQDM_DISABLE": "1",
    # Not chatter, but a default that fails on a busy machine: commands that let Prefect start
    # its ephemeral API (promote, rollback, evaluate) give it 20 s to answer, which two such
    # commands started together on a loaded 2-core machine can exceed ("Timed out while
    # attempting to connect to ephemeral Prefect API server"). fedmtl train waits 60 s for its own.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}

NOISY_LOGGERS = ("alembic", "mlflow", "great_expectations", "dvc", "httpx", "urllib3")


def configure(verbose: bool = False) -> None:
    for key, value in DEFAULTS.items():
        if verbose and key in ("PREFECT_LOGGING_LEVEL", "MLFLOW_LOGGING_LEVEL"):
            continue
        os.environ.setdefault(key, value)
    if not verbose:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
