"""fedmtl: federated multi-task learning for personalisation.

The core (this package) computes and never imports Prefect or MLflow; ``tasks/`` and ``flows/``
orchestrate it, ``models/`` holds the torch modules.
"""

__version__ = "0.1.0"
