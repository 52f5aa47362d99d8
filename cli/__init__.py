"""fedmtl: federated multi-task learning as a Prefect + MLflow + DVC workflow.

Exit codes: 0 done, 1 the run failed, 2 bad settings or input, 3 a promotion was rejected
(the champion stays), 130 interrupted."""

# The command line: the shell around the core package ``fedmtl`` (which imports neither
# Prefect nor MLflow, nor this package). One module per command group; importing them
# registers their commands on ``app`` in the order ``fedmtl --help`` lists them.
from cli import data, personalize, registry, schedule, site, tracking, train  # noqa: E402,F401  (registration)
from cli.app import app, main

__all__ = ["app", "main"]
