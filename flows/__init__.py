"""Prefect flows: the federated training flow and the whole data + training pipeline."""

from fedmtl import quiet

quiet.configure()
