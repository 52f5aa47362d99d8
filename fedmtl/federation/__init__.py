"""One federation: the steps of a round as methods over explicit state
(:mod:`fedmtl.federation.core`), the clients' side (:mod:`fedmtl.federation.clients`) apart from
the coordinator's
(:mod:`fedmtl.federation.server`)."""

from fedmtl.federation.core import Federation, participants, sat_out_clients
from fedmtl.server.screening import RejectedUpdate, check_update

__all__ = ["Federation", "RejectedUpdate", "check_update", "participants", "sat_out_clients"]
