"""The key agreement, key derivation and pseudo-random expansion SecAgg+ is built on (X25519,
HKDF-SHA256, ChaCha20)."""

from __future__ import annotations

import functools
import random

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmtl.privacy.secagg.messages import _CHACHA_NONCE, KEY_BYTES

# --------------------------------------------------------------------------- crypto helpers


def _label(u: str, v: str) -> bytes:
    """An unambiguous encoding of two client ids (length-prefixed UTF-8)."""
    return _id_label(u) + _id_label(v)


def _pair_label(u: str, v: str) -> bytes:
    """The label of the unordered pair {u, v}: the same for both ends."""
    return _id_label(u) + _id_label(v) if u < v else _id_label(v) + _id_label(u)


@functools.lru_cache(maxsize=65536)
def _id_label(u: str) -> bytes:
    raw = u.encode()
    return len(raw).to_bytes(4, "big") + raw


def _hkdf(secret: bytes, info: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def _share_key(own_c: X25519PrivateKey, peer_c_pk: bytes, u: str, v: str, session: bytes) -> bytes:
    shared = own_c.exchange(X25519PublicKey.from_public_bytes(peer_c_pk))
    return _hkdf(shared, b"fedmtl-secagg/share-encryption" + _pair_label(u, v), session)


def _pair_seed(own_s: X25519PrivateKey, peer_s_pk: bytes, u: str, v: str, session: bytes) -> bytes:
    shared = own_s.exchange(X25519PublicKey.from_public_bytes(peer_s_pk))
    return _hkdf(shared, b"fedmtl-secagg/pairwise-mask" + _pair_label(u, v), session)


def _self_mask_key(b_u: bytes, session: bytes) -> bytes:
    return _hkdf(b_u, b"fedmtl-secagg/self-mask", session)


def _prg(key: bytes, n_words: int) -> np.ndarray:
    """The ChaCha20 keystream of ``key`` as ``n_words`` little-endian uint32 words (read-only)."""
    stream = Cipher(algorithms.ChaCha20(key, _CHACHA_NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(_zeros(4 * n_words)), dtype="<u4")


@functools.lru_cache(maxsize=8)
def _zeros(n_bytes: int) -> bytes:
    """The all-zero plaintext whose ChaCha20 encryption is the keystream (immutable, shared)."""
    return bytes(n_bytes)


def _nonce(sender: str, recipient: str) -> bytes:
    """Both directions of a pair share the AEAD key; the direction keeps the nonces distinct."""
    return bytes(11) + (b"\x00" if sender < recipient else b"\x01")


def _x25519_key(rng: random.Random) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(rng.randbytes(KEY_BYTES))


def _public_raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()
