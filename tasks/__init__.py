"""Prefect tasks: thin wrappers over the core (fedmtl/) that the flows compose."""

from fedmtl import quiet

quiet.configure()
