"""A party's identity: an Ed25519 key pair (``cryptography``), the private half in a file only its
owner can read (mode 0600, like an SSH key: a key file readable by others is refused), the public
half shared with the parties that must recognise it (:class:`KnownParties`)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: a party's name: what names a site in messages, pools and file names
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: the coordinator's name in envelopes
COORDINATOR = "coordinator"


class IdentityError(ValueError):
    """A key that cannot be used (the message names the party and the file)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise IdentityError(
            f"party name {name!r} is not allowed: 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key (the first 16 hex digits of its SHA-256)."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """One party's key pair."""

    name: str
    private: Ed25519PrivateKey = field(repr=False, compare=False)

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(check_name(name), Ed25519PrivateKey.generate())

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Writes ``NAME.key`` (PKCS8 PEM, mode 0600, the folder 0700) and ``NAME.pub`` (raw,
        hex); refuses to overwrite an existing key."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        key_path, pub_path = folder / f"{self.name}.key", folder / f"{self.name}.pub"
        if key_path.exists():
            raise IdentityError(
                f"party '{self.name}': a key already exists at {key_path}; not replaced"
            )
        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        pub_path.write_text(raw_public(self.public).hex() + "\n")
        return key_path, pub_path

    @classmethod
    def load(cls, folder: str | Path, name: str) -> Identity:
        """The key pair saved by :meth:`save`; refused when the key file is readable or
        writable by anyone but its owner."""
        path = Path(folder) / f"{check_name(name)}.key"
        if not path.exists():
            raise IdentityError(
                f"party '{name}': no key at {path} (create one with `fedmtl site init`)"
            )
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"party '{name}': key file {path} has mode {mode:o}; it must be readable by "
                f"its owner only (chmod 600 {path})"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"party '{name}': {path} does not hold an Ed25519 private key")
        return cls(name, key)


def public_from_hex(text: str, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 bytes as hex; ``where`` names it in the error."""
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.strip()))
    except ValueError as exc:
        raise IdentityError(
            f"{where} is not an Ed25519 public key (32 bytes as hex): {exc}"
        ) from None


def load_public(path: str | Path) -> Ed25519PublicKey:
    """A public key saved by :meth:`Identity.save` (``NAME.pub``: 32 bytes as hex)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise IdentityError(f"{path} is not an Ed25519 public key: {exc}") from None
    return public_from_hex(text, str(path))


@dataclass
class KnownParties:
    """The public keys a party trusts, by name."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    def add(self, name: str, key: Ed25519PublicKey) -> None:
        check_name(name)
        known = self.keys.get(name)
        if known is not None and raw_public(known) != raw_public(key):
            raise IdentityError(
                f"party '{name}' is already known with key {fingerprint(known)}; refusing a "
                f"second key {fingerprint(key)} under the same name"
            )
        self.keys[name] = key

    def key_of(self, name: str) -> Ed25519PublicKey | None:
        return self.keys.get(name)

    @classmethod
    def from_folder(cls, folder: str | Path) -> KnownParties:
        """Every ``NAME.pub`` in ``folder``."""
        known = cls()
        for path in sorted(Path(folder).glob("*.pub")):
            known.add(path.stem, load_public(path))
        return known
