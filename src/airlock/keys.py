"""Link identities: one private key and one self-signed certificate per domain.

Each domain (primary, vault) owns its private key; only the other side's
*public* certificate is ever copied across, where it is pinned as the one
trust anchor for the link's mutual TLS (airlock.link.tls).

Identity = ECDSA P-256 key + self-signed X.509 certificate with
  CN = SAN DNS = "airlock-<role>"    (the client checks the vault's name),
  basicConstraints CA=True (critical) so the certificate is its own trust anchor,
  keyUsage digitalSignature + keyCertSign, extendedKeyUsage serverAuth + clientAuth.
P-256 rather than Ed25519: every OpenSSL build Python links against accepts it
for TLS 1.3 client and server authentication.

Files: <role>.key (PKCS#8 PEM, mode 0600), <role>.crt (PEM, mode 0644), written
atomically (temp file, fsync, rename).  Existing keys are never overwritten
unless asked for explicitly.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from airlock.errors import ConfigError
from airlock.fsutil import fsync_dir

__all__ = ["ROLES", "CERT_DAYS", "subject_name", "create_identity", "ensure_local_pair",
           "fingerprint", "LocalPair"]

ROLES = ("primary", "vault")
CERT_DAYS = 3650              # days; link certs are pinned, not rotated by a CA, so they live long
BACKDATE = datetime.timedelta(days=1)  # not_valid_before slack for clock skew between the domains
KEY_MODE = 0o600
CERT_MODE = 0o644
KEYS_DIR_MODE = 0o700


def subject_name(role: str) -> str:
    """The CN and SAN DNS name of a role's certificate ("airlock-vault", "airlock-primary")."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return f"airlock-{role}"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # independent of the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _certificate(role: str, key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_name(role))])
    now = datetime.datetime.now(datetime.timezone.utc)
    pub = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(pub)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject_name(role))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def create_identity(directory, role: str, days: int = CERT_DAYS, overwrite: bool = False) -> tuple[Path, Path]:
    """Generate `<role>.key` + `<role>.crt` in `directory`; return (cert_path, key_path).

    Refuses (FileExistsError) if either file exists, unless overwrite=True.
    """
    subject_name(role)  # validates the role
    if days < 1:
        raise ValueError(f"certificate lifetime must be at least 1 day, not {days}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=KEYS_DIR_MODE)
    cert_path = directory / f"{role}.crt"
    key_path = directory / f"{role}.key"
    if not overwrite:
        for p in (key_path, cert_path):
            if p.exists():
                raise FileExistsError(f"{p} already exists; refusing to replace a link identity")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(role, key, days)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_atomic(key_path, key_pem, KEY_MODE)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
    fsync_dir(directory)
    return cert_path, key_path


def _der(cert_path) -> bytes:
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except ValueError as e:
        raise ConfigError(f"{cert_path}: not a PEM certificate ({e})") from None
    return cert.public_bytes(serialization.Encoding.DER)


def fingerprint(cert_path) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex (same as tls.peer_fingerprint)."""
    return hashlib.sha256(_der(cert_path)).hexdigest()


class LocalPair(NamedTuple):
    """Paths of both domains' link identities for `airlock up` (one machine, two data dirs)."""
    primary_cert: Path      # data/primary/keys/primary.crt
    primary_key: Path       # data/primary/keys/primary.key
    primary_peer: Path      # data/primary/keys/vault.crt  (the vault's public cert, pinned by the primary)
    vault_cert: Path        # data/vault/keys/vault.crt
    vault_key: Path         # data/vault/keys/vault.key
    vault_peer: Path        # data/vault/keys/primary.crt  (the primary's public cert, pinned by the vault)


def _ensure_identity(keys_dir: Path, role: str) -> tuple[Path, Path]:
    cert_path, key_path = keys_dir / f"{role}.crt", keys_dir / f"{role}.key"
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert and have_key:
        return cert_path, key_path
    if have_cert or have_key:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise ConfigError(f"incomplete {role} link identity: {present} exists but {missing} is missing; "
                          f"restore it or remove both and rerun")
    return create_identity(keys_dir, role)


def _ensure_peer_copy(source: Path, target: Path) -> None:
    """Copy a PUBLIC certificate across domains, or check an existing copy still matches."""
    if target.exists():
        if _der(target) != _der(source):
            raise ConfigError(f"{target} is not a copy of {source} (an identity was regenerated?); "
                              f"copy the current certificate over it to re-pin")
        return
    _der(source)  # only ever copy something that parses as a certificate
    _write_atomic(target, source.read_bytes(), CERT_MODE)
    fsync_dir(target.parent)


def ensure_local_pair(data_dir) -> LocalPair:
    """Create both domains' identities under data_dir if missing and pin each in the other.

    Layout: data_dir/primary/keys/{primary.crt,primary.key,vault.crt} and
    data_dir/vault/keys/{vault.crt,vault.key,primary.crt}.  Idempotent; never
    overwrites a key; never copies a private key across domains.
    """
    data_dir = Path(data_dir)
    pdir = data_dir / "primary" / "keys"
    vdir = data_dir / "vault" / "keys"
    for d in (pdir, vdir):
        d.mkdir(parents=True, exist_ok=True, mode=KEYS_DIR_MODE)
    primary_cert, primary_key = _ensure_identity(pdir, "primary")
    vault_cert, vault_key = _ensure_identity(vdir, "vault")
    primary_peer = pdir / "vault.crt"
    vault_peer = vdir / "primary.crt"
    _ensure_peer_copy(vault_cert, primary_peer)
    _ensure_peer_copy(primary_cert, vault_peer)
    return LocalPair(primary_cert, primary_key, primary_peer, vault_cert, vault_key, vault_peer)
