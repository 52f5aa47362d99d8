"""The federated methods fedmtl runs, one module each, chosen by ``algorithm.method``."""

from __future__ import annotations

from fedmtl.algorithms.base import ALL, Algorithm, ClientContext
from fedmtl.algorithms.ditto import Ditto
from fedmtl.algorithms.fedala import FedALA
from fedmtl.algorithms.fedavg import FedAvg
from fedmtl.algorithms.fedavg_ft import FedAvgFT
from fedmtl.algorithms.fedbabu import FedBABU
from fedmtl.algorithms.fedcp import FedCP
from fedmtl.algorithms.feddbe import FedDBE
from fedmtl.algorithms.fedem import FedEM
from fedmtl.algorithms.fedmtl import FedMTL
from fedmtl.algorithms.fedper import FedPer
from fedmtl.algorithms.fedrep import FedRep
from fedmtl.algorithms.fedrod import FedRoD
from fedmtl.algorithms.gpfl import GPFL
from fedmtl.algorithms.ifca import IFCA
from fedmtl.algorithms.lg_fedavg import LGFedAvg
from fedmtl.algorithms.local import LocalOnly
from fedmtl.algorithms.pfedme import PFedMe

METHODS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        FedMTL,
        LocalOnly,
        FedAvg,
        FedAvgFT,
        FedPer,
        FedRep,
        LGFedAvg,
        Ditto,
        PFedMe,
        IFCA,
        FedALA,
        FedDBE,
        GPFL,
        FedEM,
        FedBABU,
        FedRoD,
        FedCP,
    )
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(
            f"algorithm.method '{name}' is not known; allowed values: {', '.join(METHODS)}"
        ) from None


__all__ = ["ALL", "Algorithm", "ClientContext", "METHODS", "get_algorithm"]
