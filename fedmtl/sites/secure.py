"""SecAgg+ across site processes: the secure sum of :mod:`fedmtl.privacy.aggregation` with each
client's input masked at its site, the coordinator relaying messages and summing masked vectors.

The protocol is :mod:`fedmtl.privacy.secagg`'s (Bell et al. 2020), run over the exchange store;
every message is sealed by its sender (:mod:`fedmtl.sites.envelope`, one kind per stage):

1. the site trains, then sends ``ready``: its group and its update's layout (sizes only);
2. the coordinator plans the round's releases from the ready sites (the same plan as in
   simulation) and sends each member a ``session``: the release's members, the vector's length,
   the head tasks it carries, C and the public weight scale, the SecAgg+ settings, a fresh
   random session id, and the members' public keys (the roster); a ready site in no release
   gets ``held_back`` and stops;
3. ``keys`` (site) → ``neighbour-keys`` (the neighbours' sealed keys, relayed as they were sent:
   each site checks every neighbour's signature against the roster) → ``shares`` (ciphertexts)
   → ``inbox`` → ``masked`` (y_u: the only form in which a site's update leaves it) →
   ``unmask-request`` → ``unmask`` (Shamir shares); the coordinator then has Σ x_u of the release.

Each coordinator stage waits until every expected site has answered, or a site's run has ended,
or ``stage_deadline`` seconds: a site that is silent, or whose message is refused (tampered,
replayed, sent in another's name), drops out of the protocol, named, and SecAgg+ recovers the sum
of the others (dropout recovery with Shamir shares). A site waits for each coordinator message up
to ``patience`` seconds, then gives up.

What each side learns: the coordinator, the sum of each release and who took part (as in
simulation); the exchange store, sealed messages whose vectors are masked; another site, its
neighbours' public keys and encrypted shares it cannot open alone. Threat model as in
:mod:`fedmtl.privacy.secagg`: an honest-but-curious coordinator (it chooses the roster, so an
actively malicious one that invents sites is out of scope, as in Bonawitz's semi-honest variant).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedmtl.config.privacy import PrivacyConfig
from fedmtl.privacy.aggregation import ReleaseSpec
from fedmtl.privacy.release_vector import release_input
from fedmtl.privacy.secagg import SecAggClient, SecAggError, SecAggParams, SecAggServer
from fedmtl.privacy.secagg import wire as secagg_wire
from fedmtl.sites.envelope import EnvelopeRefused, open_envelope, seal
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import (
    COORDINATOR,
    Identity,
    KnownParties,
    public_from_hex,
    raw_public,
)
from fedmtl.state import ClientUpdate

if TYPE_CHECKING:
    from fedmtl.sites.rounds import SiteSession

log = logging.getLogger(__name__)

#: what a site's ready message tells of its training under the secure sum
SHARED_METRICS = ("dp_sgd_epsilon",)
#: every secure sum's scalars are weights n_c / scale ≤ 1, or DP's 0/1 under-clip bits
SCALAR_CLIP = 1.0


def session_body(release: ReleaseSpec, spec: PrivacyConfig, roster: dict[str, str]) -> dict:
    """What the coordinator tells a release's members (public; module docs)."""
    return {
        "release": release.name,
        "members": sorted(release.members),
        "dim": release.dim,
        "tasks": list(release.tasks),
        "clip": release.clip,
        "weight_scale": release.weight_scale,
        "partial": release.partial,
        "bound": release.clip if spec.dp else spec.secure_sum.range,
        "neighbours": spec.secure_sum.neighbours,
        "max_dropout": spec.secure_sum.max_dropout,
        "session": secrets.token_hex(16),
        "roster": {m: roster[m] for m in sorted(release.members)},
    }


def session_params(body: dict) -> SecAggParams:
    """The release's SecAgg+ parameters, the same at every party (the graph from the session)."""
    return SecAggParams.create(
        body["members"],
        int(body["dim"]),
        clip=float(body["bound"]),
        neighbours=body["neighbours"],
        max_dropout=float(body["max_dropout"]),
        scalar=True,
        scalar_clip=SCALAR_CLIP,
        session=bytes.fromhex(body["session"]),
    )


def from_site(site: str, message: Any, what: str) -> Any:
    """A decoded SecAgg+ ``message`` if it names ``site``, the sender it came sealed from."""
    if message.client != site:
        raise SecAggError(f"site '{site}': its {what} name '{message.client}'")
    return message


def layout_of(update: ClientUpdate) -> dict:
    """An update's shape, without its values: what a site's ``ready`` message says (and its
    DP-SGD ε, the accountant's figure, which the coordinator records)."""
    return {
        "group": update.group,
        "base": None if update.delta_base is None else int(update.delta_base.numel()),
        "heads": {t: int(v.numel()) for t, v in sorted(update.delta_heads.items())},
        "metrics": {k: float(v) for k, v in update.metrics.items() if k in SHARED_METRICS},
    }


def stand_in(client: str, layout: dict) -> ClientUpdate:
    """The coordinator's placeholder for a site's update under the secure sum: its layout with
    zeros (what the release plan needs), never the site's values."""
    base = layout.get("base")
    return ClientUpdate(
        client=client,
        group=layout["group"],
        n_samples=0,
        delta_base=None if base is None else torch.zeros(int(base)),
        delta_heads={str(t): torch.zeros(int(n)) for t, n in layout["heads"].items()},
        metrics={k: float(v) for k, v in layout.get("metrics", {}).items() if k in SHARED_METRICS},
    )


@dataclass
class SiteSecureSum:
    """A site's side of the secure sum for one round (module docs)."""

    site: SiteSession
    round_: int
    poll: float = 0.05

    def _put(self, stage: str, payload: bytes) -> int:
        ex, me = self.site.exchange, self.site.identity
        sealed = seal(payload, me, run=ex.run, round_=self.round_, kind=f"secagg-{stage}")
        return ex.put(ex.secagg(self.round_, stage, self.site.client), sealed)

    def _await(self, stage: str) -> bytes:
        ex = self.site.exchange
        path = ex.secagg(self.round_, stage, self.site.client)
        abort = ex.secagg(self.round_, "abort", self.site.client)
        end = time.monotonic() + self.site.patience
        while (blob := ex.get(path)) is None:
            if (stop := ex.get(abort)) is not None:
                reason = self._open("abort", stop).decode()
                raise SecAggError(
                    f"site '{self.site.client}': dropped from round {self.round_}'s secure sum "
                    f"by the coordinator: {reason}"
                )
            if time.monotonic() > end:
                raise TimeoutError(
                    f"site '{self.site.client}': no {stage} from the coordinator for round "
                    f"{self.round_} within {self.site.patience:g} s"
                )
            time.sleep(self.poll)
        return self._open(stage, blob)

    def _open(self, stage: str, blob: bytes) -> bytes:
        return open_envelope(
            blob,
            self.site.known,
            sender=COORDINATOR,
            run=self.site.exchange.run,
            round_=self.round_,
            kind=f"secagg-{stage}",
        )

    def take_part(self, update: ClientUpdate) -> int:
        """Sends ``ready``, then, if the site is in a release, its masked input and shares;
        returns the bytes it wrote. Its update never leaves it unmasked."""
        me, fed, ex = self.site.client, self.site.fed, self.site.exchange
        sent = self._put("ready", json.dumps(layout_of(update)).encode())
        body = json.loads(self._await("session"))
        if "held_back" in body:
            log.info("site '%s': held back in round %s: %s", me, self.round_, body["held_back"])
            return sent
        spec = fed.privacy
        members = body["members"]
        if me not in members or len(members) < max(2, spec.min_group_size):
            raise SecAggError(
                f"site '{me}': refuses a release of {len(members)} members "
                f"{'without it' if me not in members else ''} (privacy.min_group_size="
                f"{spec.min_group_size}): its sum would expose single updates"
            )
        roster = KnownParties()
        for member, key in body["roster"].items():
            roster.add(member, public_from_hex(key, f"the roster's key of '{member}'"))
        params = session_params(body)
        client = SecAggClient(me, params)
        sent += self._put("keys", secagg_wire.encode_keys(client.advertise_keys()))
        neighbour_keys = {}
        for v, blob in json.loads(self._await("neighbour-keys")).items():
            payload = open_envelope(
                bytes.fromhex(blob), roster, sender=v, run=ex.run, round_=self.round_,
                kind="secagg-keys",
            )  # fmt: skip
            neighbour_keys[v] = from_site(v, secagg_wire.decode_keys(payload), "advertised keys")
        sent += self._put("shares", secagg_wire.encode_shares(client.share_keys(neighbour_keys)))
        inbox = secagg_wire.decode_shares(self._await("inbox"))
        update.n_samples = fed.manifest_rows(me)  # the public weight, as the coordinator's screen
        vector, scalar = release_input(
            update,
            spec,
            float(body["clip"]),
            float(body["weight_scale"]),
            list(body["tasks"]),
            bool(body.get("partial", False)),
        )
        masked = client.masked_input(vector.numpy(), inbox, scalar)
        sent += self._put("masked", secagg_wire.encode_masked(masked))
        request = secagg_wire.decode_request(self._await("unmask-request"))
        return sent + self._put("unmask", secagg_wire.encode_response(client.unmask(request)))


@dataclass
class CoordinatorSecureSum:
    """The coordinator's side: a :data:`fedmtl.privacy.aggregation.Summer` that runs each
    release's SecAgg+ with its member sites over the exchange store (module docs)."""

    exchange: Exchange
    coordinator: Identity
    known: KnownParties
    spec: PrivacyConfig
    round_: int
    finished: Callable[[str], bool]  # whether a site's run has ended (it will send no more)
    stage_deadline: float = 120.0
    poll: float = 0.05
    #: site -> why it dropped out of the protocol (silent or refused), this round
    dropped: dict[str, str] = field(default_factory=dict)
    #: sites whose message was refused (tampered, replayed, in another's name), this stage
    refused: set[str] = field(default_factory=set)
    #: sites that were sent a session (the others are told they are held back)
    assigned: set[str] = field(default_factory=set)
    _told: set[str] = field(default_factory=set, repr=False)
    #: bytes the coordinator wrote for each site, and each site's messages (all stages)
    traffic: dict[str, list[int]] = field(default_factory=dict)

    def _put(self, stage: str, site: str, payload: bytes) -> None:
        ex = self.exchange
        sealed = seal(
            payload, self.coordinator, run=ex.run, round_=self.round_, kind=f"secagg-{stage}"
        )
        self.traffic.setdefault(site, [0, 0])[0] += ex.put(
            ex.secagg(self.round_, stage, site), sealed
        )

    def collect(self, stage: str, sites: list[str]) -> dict[str, tuple[bytes, bytes]]:
        """Each site's ``stage`` message (payload, sealed bytes), until all came, the others'
        runs ended, or the stage's deadline; a missing or refused message drops the site."""
        ex, waiting, got = self.exchange, set(sites), {}
        end = time.monotonic() + self.stage_deadline
        checked = time.monotonic()  # whether the silent sites' runs ended: once a second
        while waiting:
            for site in sorted(waiting):
                blob = ex.get(ex.secagg(self.round_, stage, site))
                if blob is None:
                    continue
                waiting.discard(site)
                self.traffic.setdefault(site, [0, 0])[1] += len(blob)
                try:
                    payload = open_envelope(
                        blob, self.known, sender=site, run=ex.run, round_=self.round_,
                        kind=f"secagg-{stage}",
                    )  # fmt: skip
                except EnvelopeRefused as exc:
                    self.dropped[site] = str(exc)
                    self.refused.add(site)
                    log.warning("%s", exc)
                    continue
                got[site] = (payload, blob)
            now = time.monotonic()
            if waiting and now > end:
                break
            if waiting and now - checked >= 1.0:
                checked = now
                if all(self.finished(site) for site in waiting):
                    break
            if waiting:
                time.sleep(self.poll)
        for site in sorted(waiting):
            self.dropped[site] = (
                f"site '{site}': no SecAgg+ {stage} message in round {self.round_} "
                f"(within {self.stage_deadline:g} s, or its run ended); dropped from the sum"
            )
        self._tell_dropped()
        return got

    def _tell_dropped(self) -> None:
        """Tells each site dropped so far that it is out (it stops waiting for the protocol)."""
        for site in sorted(set(self.dropped) - self._told):
            self._told.add(site)
            self._put("abort", site, self.dropped[site].encode())

    def __call__(self, release: ReleaseSpec) -> tuple[torch.Tensor, float, list[str], float]:
        started = time.perf_counter()
        roster = {m: raw_public(self.known.key_of(m)).hex() for m in release.members}
        body = session_body(release, self.spec, roster)
        params = session_params(body)
        for member in body["members"]:
            self._put("session", member, json.dumps(body).encode())
            self.assigned.add(member)
        server = SecAggServer(params)
        keys = self.collect("keys", body["members"])
        for site, (payload, _) in keys.items():
            self._accept(
                site,
                lambda p=payload, s=site: server.receive_keys(
                    from_site(s, secagg_wire.decode_keys(p), "advertised keys")
                ),
            )
        for site in sorted(keys):
            if site in self.dropped:
                continue
            relayed = {v: keys[v][1].hex() for v in server.keys_for(site)}
            self._put("neighbour-keys", site, json.dumps(relayed).encode())
        shared = self.collect("shares", [s for s in sorted(keys) if s not in self.dropped])
        for site, (payload, _) in shared.items():
            self._accept(
                site,
                lambda p=payload, s=site: server.receive_shares(s, secagg_wire.decode_shares(p)),
            )
        masked_from = [s for s in sorted(shared) if s not in self.dropped]
        for site in masked_from:
            self._put("inbox", site, secagg_wire.encode_shares(server.shares_for(site)))
        masked = self.collect("masked", masked_from)
        for site, (payload, _) in masked.items():
            self._accept(
                site,
                lambda p=payload, s=site: server.receive_masked(
                    secagg_wire.decode_masked(s, p, params.n_words)
                ),
            )
        survivors = [s for s in sorted(masked) if s not in self.dropped]
        for site in survivors:
            self._put(
                "unmask-request", site, secagg_wire.encode_request(server.unmask_request(site))
            )
        for site, (payload, _) in self.collect("unmask", survivors).items():
            self._accept(
                site,
                lambda p=payload, s=site: server.receive_unmask(
                    from_site(s, secagg_wire.decode_response(p), "unmask response")
                ),
            )
        result = server.aggregate()
        total = torch.from_numpy(result.vector.astype("float64")).to(torch.float32)
        return (
            total,
            float(result.scalar or 0.0),
            list(result.dropped),
            time.perf_counter() - started,
        )

    def _accept(self, site: str, receive: Callable[[], Any]) -> None:
        """Hands a site's message to the server; a malformed or out-of-protocol one drops the
        site, named (the protocol goes on without it)."""
        try:
            receive()
        except (SecAggError, TypeError, ValueError) as exc:
            self.dropped[site] = f"site '{site}': SecAgg+ message refused: {exc}"
            log.warning("%s", self.dropped[site])
            self._tell_dropped()

    def hold_back(self, ready: list[str], why: dict[str, str]) -> None:
        """Tells every ready site that was given no session that it sits this round out."""
        for site in ready:
            if site not in self.assigned:
                reason = why.get(site, "in no release this round")
                self._put("session", site, json.dumps({"held_back": reason}).encode())
