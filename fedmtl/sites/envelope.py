"""Signed envelopes: every message between the coordinator and a site (the global state sent
out, an update sent back) travels sealed, so that the receiver can tell who sent it, for which
run, round and purpose, and that nothing in it changed.

Layout (all lengths big-endian)::

    MAGIC | u32 header length | header (JSON, sorted keys) | Ed25519 signature (64 bytes) | payload

The header names the ``sender``, the ``run``, the ``round``, the ``kind`` of message and the
payload's SHA-256 and size; the signature covers a domain label, the header and the payload's
digest. :func:`open_envelope` refuses, naming the sender:

- a message whose bytes changed (a flipped bit anywhere: the header, the signature, the payload);
- a sender it does not know, or a message signed by another party's key than the named sender's
  (one site speaking for another);
- a replay: a genuine message of another run, round or kind than the one expected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature

from fedmtl.sites.identity import Identity, KnownParties, check_name

MAGIC = b"FEDMTL-ENVELOPE-1\n"
_DOMAIN = b"fedmtl envelope v1\x00"
_SIGNATURE = 64
#: the kinds of message
#: SecAgg+ across sites (:mod:`fedmtl.sites.secure`): each stage's message is a kind of its own
SECAGG_STAGES = (
    "ready",
    "session",
    "keys",
    "neighbour-keys",
    "shares",
    "inbox",
    "masked",
    "unmask-request",
    "unmask",
    "abort",
)
KINDS = (
    "run-settings",
    "global-state",
    "update",
    "evaluation-state",
    "evaluation",
    "validation",
    "score-model",
    "scores",
    *(f"secagg-{stage}" for stage in SECAGG_STAGES),
)


class EnvelopeRefused(ValueError):
    """A message that must not be used; ``sender`` is the party it claims to come from."""

    failure_kind = "rejected"  # a refused message would be refused again: not retried

    def __init__(self, sender: str, message: str) -> None:
        super().__init__(message)
        self.sender = sender


@dataclass(frozen=True)
class Header:
    sender: str
    run: str
    round: int
    kind: str
    sha256: str
    size: int

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":")).encode()


def _signed(header: bytes, digest: bytes) -> bytes:
    return _DOMAIN + len(header).to_bytes(4, "big") + header + digest


def seal(payload: bytes, identity: Identity, *, run: str, round_: int, kind: str) -> bytes:
    """``payload`` sealed by ``identity`` for ``run``, round ``round_``, as a ``kind`` message."""
    if kind not in KINDS:
        raise ValueError(f"message kind {kind!r} is not known; allowed: {', '.join(KINDS)}")
    digest = hashlib.sha256(payload).digest()
    header = Header(
        identity.name, str(run), int(round_), kind, digest.hex(), len(payload)
    ).to_bytes()
    signature = identity.sign(_signed(header, digest))
    return MAGIC + len(header).to_bytes(4, "big") + header + signature + payload


def peek_sender(blob: bytes) -> str:
    """The sender an envelope claims (unverified: for naming it in an error), or '?'."""
    try:
        return str(_parse(blob)[0].get("sender", "?"))
    except (ValueError, KeyError):
        return "?"


def _parse(blob: bytes) -> tuple[dict, bytes, bytes, bytes]:
    if not blob.startswith(MAGIC):
        raise ValueError("not a fedmtl envelope")
    at = len(MAGIC)
    size = int.from_bytes(blob[at : at + 4], "big")
    at += 4
    header_bytes = blob[at : at + size]
    at += size
    signature, payload = blob[at : at + _SIGNATURE], blob[at + _SIGNATURE :]
    if len(header_bytes) != size or len(signature) != _SIGNATURE:
        raise ValueError("truncated envelope")
    header = json.loads(header_bytes)
    if not isinstance(header, dict):
        raise ValueError("the envelope's header is not a mapping")
    return header, header_bytes, signature, payload


def open_envelope(
    blob: bytes, known: KnownParties, *, sender: str, run: str, round_: int, kind: str
) -> bytes:
    """The payload of ``blob`` if it is a ``kind`` message from ``sender`` for ``run``, round
    ``round_``, signed by ``sender``'s known key and unchanged; :class:`EnvelopeRefused` naming
    the sender and why otherwise."""
    check_name(sender)
    what = f"{kind} of round {round_}"
    try:
        header, header_bytes, signature, payload = _parse(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeRefused(
            sender, f"site '{sender}': {what} refused: unreadable ({exc})"
        ) from None
    claimed = str(header.get("sender"))
    if claimed != sender:
        raise EnvelopeRefused(
            sender,
            f"site '{sender}': {what} refused: the message says it comes from '{claimed}' "
            "(one party speaking for another)",
        )
    key = known.key_of(sender)
    if key is None:
        raise EnvelopeRefused(
            sender, f"site '{sender}': {what} refused: no known public key for it"
        )
    digest = hashlib.sha256(payload).digest()
    try:
        key.verify(signature, _signed(header_bytes, digest))
    except InvalidSignature:
        raise EnvelopeRefused(
            sender,
            f"site '{sender}': {what} refused: the signature does not verify with its key (the "
            "message was changed, or was not signed by it)",
        ) from None
    if header.get("sha256") != digest.hex() or header.get("size") != len(payload):
        raise EnvelopeRefused(
            sender, f"site '{sender}': {what} refused: its payload does not match"
        )
    expected = {"run": str(run), "round": int(round_), "kind": kind}
    got = {k: header.get(k) for k in expected}
    if got != expected:
        raise EnvelopeRefused(
            sender,
            f"site '{sender}': {what} refused: a replay (a genuine message for run {got['run']}, "
            f"round {got['round']}, {got['kind']}; expected run {run}, round {round_}, {kind})",
        )
    return payload
