"""Mutual TLS for the controlled link, with pinned self-signed certificates.

Each domain has its own key and self-signed certificate (airlock.keys); each
side loads the other's certificate as its ONLY trust anchor, so a peer is
accepted only if it proves possession of the pinned key.  TLS 1.3 minimum.

The vault's certificate carries SAN DNS "airlock-vault"; the primary connects
with server_hostname=VAULT_SERVER_NAME, so ordinary hostname checking stays on
whatever address the vault actually listens on.  (The server side of OpenSSL
does not check client names; the pinned trust anchor is the check there.)
"""
from __future__ import annotations

import hashlib
import ssl

from airlock.keys import subject_name

__all__ = ["VAULT_SERVER_NAME", "PRIMARY_NAME", "server_context", "client_context", "peer_fingerprint"]

VAULT_SERVER_NAME = subject_name("vault")     # pass as server_hostname when connecting to the vault
PRIMARY_NAME = subject_name("primary")


def _harden(ctx: ssl.SSLContext, cert_path, key_path, peer_cert_path) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.verify_mode = ssl.CERT_REQUIRED
    # only the pinned peer certificate -- no system CAs are ever loaded
    ctx.load_verify_locations(cafile=str(peer_cert_path))
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(cert_path, key_path, peer_cert_path) -> ssl.SSLContext:
    """The vault's context: presents the vault cert, requires the pinned primary cert."""
    return _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_path, key_path, peer_cert_path)


def client_context(cert_path, key_path, peer_cert_path) -> ssl.SSLContext:
    """The primary's context: presents the primary cert, trusts only the pinned vault cert.

    Connect with server_hostname=VAULT_SERVER_NAME ("airlock-vault").
    """
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_path, key_path, peer_cert_path)
    ctx.check_hostname = True
    return ctx


def peer_fingerprint(ssl_object) -> str:
    """SHA-256 hex of the peer's DER certificate (an ssl.SSLObject or ssl.SSLSocket), for logs.

    Equal to airlock.keys.fingerprint() of the same certificate file.
    """
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ValueError("the peer presented no certificate")
    return hashlib.sha256(der).hexdigest()
