"""The ``federation`` section: where the clients are. ``simulation`` (the default): every client
is a partition file the coordinator's run reads. ``sites``: every client is a site on its own
machine (``fedmtl site init`` / ``serve``), reached through its Prefect deployment, its data never
leaving it; models and updates travel sealed through the exchange store (docs/sites.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedmtl.config.sections import _Section


class FederationConfig(_Section):
    mode: Literal["simulation", "sites"] = "simulation"
    exchange: str | None = Field(
        None, description="sites: the exchange store's URL (fsspec: a folder, s3://, gs://, az://)"
    )
    # not "keys": Prefect takes a model with a keys attribute for a mapping when it walks inputs
    coordinator_keys: str = Field(
        ".fedmtl/coordinator-keys",
        description="sites: the coordinator's key pair (fedmtl site coordinator-key --dir)",
    )
    sites: str | None = Field(
        None, description="sites: the folder of the sites' public keys (NAME.pub), one per site"
    )
    deadline: float = Field(
        600.0, gt=0, description="sites: seconds a round waits for the sites it sampled"
    )

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.mode == "sites":
            missing = [k for k in ("exchange", "sites") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    "federation.mode=sites needs "
                    + " and ".join(f"federation.{k}" for k in missing)
                    + " (the exchange store's URL; the folder of the sites' public keys)"
                )
        return self
