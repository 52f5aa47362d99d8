"""The SecAgg+ messages as bytes, for parties in different processes (sites): JSON with hex for
keys, ciphertexts and shares; a masked input as its little-endian uint32 words.

Decoding checks types and sizes and raises :class:`~fedmtl.privacy.secagg.SecAggError` on a
malformed message. A :class:`MaskedInput` read from the wire is minted here: it is what a client
masked in its own process (the server still never holds a plaintext vector).
"""

from __future__ import annotations

import json
from types import MappingProxyType

import numpy as np

from fedmtl.privacy import shamir
from fedmtl.privacy.secagg.messages import (
    _MINT,
    KEY_BYTES,
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SecAggError,
    UnmaskRequest,
    UnmaskResponse,
)


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _read(blob: bytes, what: str) -> dict | list:
    try:
        return json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SecAggError(f"malformed {what}: {exc}") from exc


def _hex(value: object, what: str) -> bytes:
    try:
        return bytes.fromhex(str(value))
    except ValueError as exc:
        raise SecAggError(f"malformed {what}: not hex") from exc


def encode_keys(keys: AdvertisedKeys) -> bytes:
    return _json({"client": keys.client, "c_pk": keys.c_pk.hex(), "s_pk": keys.s_pk.hex()})


def decode_keys(blob: bytes) -> AdvertisedKeys:
    raw = _read(blob, "advertised keys")
    try:
        keys = AdvertisedKeys(
            str(raw["client"]), _hex(raw["c_pk"], "c_pk"), _hex(raw["s_pk"], "s_pk")
        )
    except (KeyError, TypeError) as exc:
        raise SecAggError(f"malformed advertised keys: {exc}") from exc
    if len(keys.c_pk) != KEY_BYTES or len(keys.s_pk) != KEY_BYTES:
        raise SecAggError(f"advertised keys of {keys.client!r} are not {KEY_BYTES}-byte keys")
    return keys


def encode_shares(shares: list[EncryptedShare]) -> bytes:
    return _json([[m.sender, m.recipient, m.ciphertext.hex()] for m in shares])


def decode_shares(blob: bytes) -> list[EncryptedShare]:
    raw = _read(blob, "encrypted shares")
    try:
        return [EncryptedShare(str(s), str(r), _hex(c, "ciphertext")) for s, r, c in raw]
    except (TypeError, ValueError) as exc:
        raise SecAggError(f"malformed encrypted shares: {exc}") from exc


def encode_masked(masked: MaskedInput) -> bytes:
    return masked.words.astype("<u4").tobytes()


def decode_masked(client: str, blob: bytes, n_words: int) -> MaskedInput:
    """``client``'s masked input y_u from its ``n_words`` words."""
    if len(blob) != 4 * n_words:
        raise SecAggError(
            f"masked input of {client!r} has {len(blob)} bytes, expected {4 * n_words}"
        )
    return MaskedInput(client, np.frombuffer(blob, dtype="<u4").astype(np.uint32), _MINT)


def encode_request(request: UnmaskRequest) -> bytes:
    return _json(
        {
            "client": request.client,
            "survivors": sorted(request.survivors),
            "dropped": sorted(request.dropped),
        }
    )


def decode_request(blob: bytes) -> UnmaskRequest:
    raw = _read(blob, "unmask request")
    try:
        return UnmaskRequest(
            str(raw["client"]),
            frozenset(map(str, raw["survivors"])),
            frozenset(map(str, raw["dropped"])),
        )
    except (KeyError, TypeError) as exc:
        raise SecAggError(f"malformed unmask request: {exc}") from exc


def encode_response(response: UnmaskResponse) -> bytes:
    return _json(
        {
            "client": response.client,
            "b": {v: s.to_bytes().hex() for v, s in response.b_shares.items()},
            "s": {v: s.to_bytes().hex() for v, s in response.s_shares.items()},
        }
    )


def decode_response(blob: bytes) -> UnmaskResponse:
    raw = _read(blob, "unmask response")
    try:
        shares = {
            part: {str(v): shamir.Share.from_bytes(_hex(h, "share")) for v, h in raw[part].items()}
            for part in ("b", "s")
        }
        return UnmaskResponse(
            str(raw["client"]), MappingProxyType(shares["b"]), MappingProxyType(shares["s"])
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SecAggError(f"malformed unmask response: {exc}") from exc
