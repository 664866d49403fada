"""A node's identity: an Ed25519 key kept in a file, its libp2p-style peer id, and the
self-signed TLS certificate the data plane presents.

The peer id is computed exactly as libp2p does for Ed25519 keys (base58btc of the identity
multihash of the protobuf-encoded public key, "12D3KooW..."), so the same key names the node on
both planes.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}
ED25519_PROTO_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def peer_id_of(public_key: bytes) -> str:
    proto = ED25519_PROTO_PREFIX + public_key
    return b58encode(bytes([0x00, len(proto)]) + proto)


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        n = n * 58 + B58.index(ch)
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def public_key_of(peer_id: str) -> bytes:
    """The Ed25519 key an identity-multihash peer id (12D3KooW...) carries; ValueError otherwise."""
    try:
        raw = b58decode(peer_id)
    except ValueError:
        raise ValueError(f"{peer_id!r} is not base58") from None
    prefix = bytes([0x00, 4 + 32]) + ED25519_PROTO_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValueError(f"{peer_id!r} is not an Ed25519 peer id")
    return raw[len(prefix):]


def reply_digest(request_id: int, body: bytes) -> bytes:
    """What a Scout signs for every forward it answers: the request's id and the output bytes."""
    return hashlib.sha256(request_id.to_bytes(8, "big") + hashlib.sha256(body).digest()).digest()


def verify_reply(peer_id: str, request_id: int, output_sha256: str, signature: str) -> bool:
    """Whether ``peer_id`` signed the reply to ``request_id`` whose body hashes to ``output_sha256``."""
    digest = hashlib.sha256(request_id.to_bytes(8, "big") + bytes.fromhex(output_sha256)).digest()
    return verify(public_key_of(peer_id), bytes.fromhex(signature), digest)


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Identity:
    def __init__(self, private_key: Ed25519PrivateKey):
        self.private_key = private_key
        self.public_key = raw_public(private_key.public_key())
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """The key in ``path`` (32 raw bytes), created with mode 0600 on first use."""
        path = Path(path)
        if path.exists():
            raw = path.read_bytes()
            if len(raw) != 32:
                raise ValueError(f"{path} is not an identity key file (expected 32 bytes, found {len(raw)})")
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        ident = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ident.private_bytes())
        return ident

    def private_bytes(self) -> bytes:
        """The raw 32-byte seed (the key file's content; what libp2p's Ed25519 key is made from)."""
        return self.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def tls_files(self, directory: Path) -> tuple[Path, Path]:
        """(certificate, key) PEM files for the data plane: self-signed with this identity's key."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / "tls-cert.pem", directory / "tls-key.pem"
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.peer_id)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.private_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .sign(self.private_key, None)
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return cert_path, key_path


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        return True
    except Exception:  # cryptography raises InvalidSignature, or ValueError for a malformed key
        return False


def peer_id_of_certificate(der: bytes) -> str:
    """The peer id whose key signed (and is in) a DER certificate; ValueError if not Ed25519."""
    cert = x509.load_der_x509_certificate(der)
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the peer's certificate key is not Ed25519")
    cert.verify_directly_issued_by(cert)  # self-signed by that key
    return peer_id_of(raw_public(key))


def certificate_digest(der: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(der)
    return h.finalize()
