"""The trust primitives of sites (fedmtl/sites): signed envelopes refuse a tampered, replayed or
impersonated message naming the site; keys are private files; the exchange store writes whole
messages only; the wire format carries the state and an update exactly."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from fedmtl.sites.envelope import EnvelopeRefused, open_envelope, peek_sender, seal
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, IdentityError, KnownParties
from fedmtl.sites.wire import decode_state, decode_update, encode_state, encode_update
from fedmtl.state import ClientUpdate, ServerState

RUN = "run0001"


@pytest.fixture(scope="module")
def parties():
    sites = {name: Identity.generate(name) for name in ("alpha", "beta")}
    coordinator = Identity.generate(COORDINATOR)
    known = KnownParties()
    for party in [*sites.values(), coordinator]:
        known.add(party.name, party.public)
    return sites, coordinator, known


def an_update(client: str = "alpha") -> ClientUpdate:
    g = torch.Generator().manual_seed(3)
    return ClientUpdate(
        client,
        "g1",
        40,
        torch.randn(50, generator=g),
        {"label": torch.randn(7, generator=g)},
        {"train_loss": 0.25},
    )


def test_a_sealed_update_opens_to_exactly_what_was_sent(parties):
    sites, _, known = parties
    update = an_update()
    blob = seal(encode_update(update), sites["alpha"], run=RUN, round_=3, kind="update")
    got = decode_update(
        open_envelope(blob, known, sender="alpha", run=RUN, round_=3, kind="update")
    )
    assert (
        got.client == "alpha"
        and got.group == "g1"
        and got.n_samples == 40
        and got.metrics == update.metrics
    )
    assert torch.equal(got.delta_base, update.delta_base)
    assert torch.equal(got.delta_heads["label"], update.delta_heads["label"])


@pytest.mark.parametrize("where", ["header", "signature", "payload", "last byte"])
def test_a_flipped_bit_anywhere_is_refused_naming_the_site(parties, where):
    sites, _, known = parties
    blob = bytearray(
        seal(encode_update(an_update()), sites["alpha"], run=RUN, round_=3, kind="update")
    )
    header_at = blob.index(b'"sender"')
    at = {
        "header": header_at + 12,
        "signature": blob.index(b"}") + 5,
        "payload": len(blob) // 2 + 40,
        "last byte": len(blob) - 1,
    }[where]
    blob[at] ^= 0x01
    with pytest.raises(
        EnvelopeRefused, match=r"site 'alpha': update of round 3 refused"
    ) as refused:
        open_envelope(bytes(blob), known, sender="alpha", run=RUN, round_=3, kind="update")
    assert refused.value.sender == "alpha"


def test_a_genuine_message_replayed_in_another_round_run_or_kind_is_refused(parties):
    sites, _, known = parties
    blob = seal(encode_update(an_update()), sites["alpha"], run=RUN, round_=2, kind="update")
    for run, round_, kind in [(RUN, 3, "update"), ("run0002", 2, "update"), (RUN, 2, "evaluation")]:
        with pytest.raises(EnvelopeRefused, match=r"site 'alpha': .* refused: a replay .*round 2"):
            open_envelope(blob, known, sender="alpha", run=run, round_=round_, kind=kind)


def test_one_site_cannot_speak_for_another(parties):
    sites, _, known = parties
    # beta names itself: signed by beta, presented as alpha's update
    blob = seal(encode_update(an_update("alpha")), sites["beta"], run=RUN, round_=1, kind="update")
    with pytest.raises(EnvelopeRefused, match="comes from 'beta' .*speaking for another"):
        open_envelope(blob, known, sender="alpha", run=RUN, round_=1, kind="update")
    # beta forges the header to say alpha: its signature does not verify with alpha's key
    forged = Identity("alpha", sites["beta"].private)
    blob = seal(encode_update(an_update("alpha")), forged, run=RUN, round_=1, kind="update")
    with pytest.raises(EnvelopeRefused, match="site 'alpha': .*signature does not verify"):
        open_envelope(blob, known, sender="alpha", run=RUN, round_=1, kind="update")
    assert peek_sender(blob) == "alpha"


def test_an_unknown_site_and_a_second_key_under_a_known_name_are_refused(parties):
    _, _, known = parties
    stranger = Identity.generate("gamma")
    blob = seal(b"x", stranger, run=RUN, round_=1, kind="update")
    with pytest.raises(EnvelopeRefused, match="site 'gamma': .*no known public key"):
        open_envelope(blob, known, sender="gamma", run=RUN, round_=1, kind="update")
    with pytest.raises(IdentityError, match="'alpha' is already known with key"):
        known.add("alpha", Identity.generate("alpha").public)
    with pytest.raises(EnvelopeRefused, match="unreadable"):
        open_envelope(b"not an envelope", known, sender="alpha", run=RUN, round_=1, kind="update")


def test_sites_accept_only_the_global_state_their_coordinator_signed(parties):
    sites, coordinator, known = parties
    state = ServerState(
        4,
        torch.arange(6.0),
        {"g1": {"label": torch.ones(3)}},
        {"label": torch.zeros(3)},
        {"alpha": "g1"},
        {"m/base": torch.ones(6)},
        {"privacy/clip": torch.tensor([0.5])},
    )
    blob = seal(encode_state(state), coordinator, run=RUN, round_=4, kind="global-state")
    got = decode_state(
        open_envelope(blob, known, sender=COORDINATOR, run=RUN, round_=4, kind="global-state")
    )
    assert (
        got.round == 4 and torch.equal(got.base, state.base) and got.assignment == {"alpha": "g1"}
    )
    assert torch.equal(got.privacy["privacy/clip"], state.privacy["privacy/clip"])
    impostor = Identity(COORDINATOR, sites["alpha"].private)  # a site posing as the coordinator
    blob = seal(encode_state(state), impostor, run=RUN, round_=4, kind="global-state")
    with pytest.raises(EnvelopeRefused, match="signature does not verify"):
        open_envelope(blob, known, sender=COORDINATOR, run=RUN, round_=4, kind="global-state")


def test_keys_are_private_files_and_a_readable_key_is_refused(tmp_path):
    site = Identity.generate("alpha")
    key_path, pub_path = site.save(tmp_path / "keys")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    again = Identity.load(tmp_path / "keys", "alpha")
    assert again.public.public_bytes_raw() == site.public.public_bytes_raw()
    assert (
        KnownParties.from_folder(tmp_path / "keys").key_of("alpha").public_bytes_raw()
        == site.public.public_bytes_raw()
    )
    with pytest.raises(IdentityError, match="a key already exists"):
        site.save(tmp_path / "keys")
    os.chmod(key_path, 0o644)
    with pytest.raises(IdentityError, match=r"party 'alpha': key file .* has mode 644.*chmod 600"):
        Identity.load(tmp_path / "keys", "alpha")
    with pytest.raises(IdentityError, match="not allowed"):
        Identity.generate("../etc")


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_the_exchange_store_holds_whole_messages_only(tmp_path, scheme, parties):
    sites, _, known = parties
    url = (
        f"file://{tmp_path}/exchange" if scheme == "file" else f"memory://exchange-{tmp_path.name}"
    )
    store = Exchange(url, RUN)
    assert store.get(store.update(1, "alpha")) is None
    blob = seal(encode_update(an_update()), sites["alpha"], run=RUN, round_=1, kind="update")
    assert store.put(store.update(1, "alpha"), blob) == len(blob)
    assert store.get(store.update(1, "alpha")) == blob
    assert store.listing() == ["round-000001/sites/alpha.env"]  # no temporary file left behind
    open_envelope(
        store.get(store.update(1, "alpha")), known, sender="alpha", run=RUN, round_=1, kind="update"
    )
    with pytest.raises(IdentityError):
        store.update(1, "../beta")
