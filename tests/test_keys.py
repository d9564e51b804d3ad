"""Link identities (airlock.keys) and pinned mutual TLS (airlock.link.tls) over real loopback."""
from __future__ import annotations

import asyncio
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from airlock.errors import ConfigError
from airlock.keys import create_identity, ensure_local_pair, fingerprint
from airlock.link import tls

TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return ensure_local_pair(tmp_path_factory.mktemp("up"))


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["primary", "vault"])
def test_create_identity_writes_a_pinnable_self_signed_p256_cert(tmp_path, role):
    cert_path, key_path = create_identity(tmp_path / "keys", role)
    assert (cert_path.name, key_path.name) == (f"{role}.crt", f"{role}.key")
    assert _mode(key_path) == 0o600 and _mode(cert_path) == 0o644
    assert b"PRIVATE KEY" not in cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    name = f"airlock-{role}"
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == [name]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca and bc.critical
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert len(fingerprint(cert_path)) == 64


def test_create_identity_refuses_to_replace_an_existing_key(tmp_path):
    cert_path, key_path = create_identity(tmp_path, "vault")
    before = key_path.read_bytes()
    with pytest.raises(FileExistsError):
        create_identity(tmp_path, "vault")
    assert key_path.read_bytes() == before
    create_identity(tmp_path, "vault", overwrite=True)
    assert key_path.read_bytes() != before
    with pytest.raises(ValueError):
        create_identity(tmp_path, "gateway")


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_ensure_local_pair_lays_out_both_domains_without_crossing_private_keys(tmp_path):
    pair = ensure_local_pair(tmp_path)
    assert _tree(tmp_path) == ["primary/keys/primary.crt", "primary/keys/primary.key", "primary/keys/vault.crt",
                               "vault/keys/primary.crt", "vault/keys/vault.crt", "vault/keys/vault.key"]
    assert fingerprint(pair.primary_peer) == fingerprint(pair.vault_cert)
    assert fingerprint(pair.vault_peer) == fingerprint(pair.primary_cert)
    assert fingerprint(pair.primary_cert) != fingerprint(pair.vault_cert)
    # no private key material anywhere in the other domain
    vault_key, primary_key = pair.vault_key.read_bytes(), pair.primary_key.read_bytes()
    for f in (tmp_path / "primary").rglob("*"):
        if f.is_file():
            assert vault_key not in f.read_bytes()
    for f in (tmp_path / "vault").rglob("*"):
        if f.is_file():
            assert primary_key not in f.read_bytes()
    for f in (pair.primary_peer, pair.vault_peer):
        assert b"PRIVATE KEY" not in f.read_bytes() and _mode(f) == 0o644
    assert _mode(pair.primary_key) == _mode(pair.vault_key) == 0o600


def test_ensure_local_pair_is_idempotent_and_never_overwrites(tmp_path):
    first = ensure_local_pair(tmp_path)
    contents = {p: p.read_bytes() for p in first}
    stats = {p: os.stat(p).st_mtime_ns for p in first}
    second = ensure_local_pair(tmp_path)
    assert second == first
    assert {p: p.read_bytes() for p in second} == contents
    assert {p: os.stat(p).st_mtime_ns for p in second} == stats
    # a lost peer copy is re-copied from the other domain, nothing else changes
    first.primary_peer.unlink()
    ensure_local_pair(tmp_path)
    assert {p: p.read_bytes() for p in first} == contents


def test_ensure_local_pair_refuses_half_identities_and_stale_pins(tmp_path):
    pair = ensure_local_pair(tmp_path)
    key = pair.vault_key.read_bytes()
    pair.vault_cert.unlink()
    with pytest.raises(ConfigError, match="incomplete vault link identity"):
        ensure_local_pair(tmp_path)
    assert pair.vault_key.read_bytes() == key            # not regenerated behind the user's back

    other = tmp_path / "elsewhere"
    stale = ensure_local_pair(other)
    pair.vault_cert.write_bytes(stale.vault_cert.read_bytes())
    pair.vault_key.write_bytes(stale.vault_key.read_bytes())
    with pytest.raises(ConfigError, match="not a copy"):
        ensure_local_pair(tmp_path)


# --------------------------------------------------------------------------
# mutual TLS over loopback
# --------------------------------------------------------------------------
async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                     server_hostname: str = tls.VAULT_SERVER_NAME):
    """One TLS connection; returns (server outcome, client outcome).

    Outcomes: ("ok", peer fingerprint) or ("refused", exception).  The server
    upgrades with start_tls so its handshake failure is observable here.
    """
    server_result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        try:
            await writer.start_tls(server_ctx)
            fp = tls.peer_fingerprint(writer.get_extra_info("ssl_object"))
            writer.write(b"pong:" + await reader.readexactly(4))
            await writer.drain()
            server_result.set_result(("ok", fp))
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as e:
            server_result.set_result(("refused", e))
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                          server_hostname=server_hostname)
            try:
                # TLS 1.3: the client finishes before the server has judged its certificate,
                # so a refused client only learns of it on the first read.
                writer.write(b"ping")
                answer = await asyncio.wait_for(reader.readexactly(9), TIMEOUT_S)
                client = ("ok", (answer, tls.peer_fingerprint(writer.get_extra_info("ssl_object"))))
            finally:
                writer.close()
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as e:
            client = ("refused", e)
        server_outcome = await asyncio.wait_for(server_result, TIMEOUT_S)
    return server_outcome, client


def _contexts(pair):
    return (tls.server_context(pair.vault_cert, pair.vault_key, pair.vault_peer),
            tls.client_context(pair.primary_cert, pair.primary_key, pair.primary_peer))


def test_pinned_pair_completes_a_tls13_mutual_handshake(pair):
    server_ctx, client_ctx = _contexts(pair)
    assert server_ctx.minimum_version == client_ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server_ctx.verify_mode == client_ctx.verify_mode == ssl.CERT_REQUIRED
    assert client_ctx.check_hostname
    server, client = asyncio.run(_handshake(server_ctx, client_ctx))
    assert server == ("ok", fingerprint(pair.primary_cert))
    assert client == ("ok", (b"pong:ping", fingerprint(pair.vault_cert)))


def test_a_different_primary_identity_is_refused_by_the_vault(pair, tmp_path):
    impostor_cert, impostor_key = create_identity(tmp_path, "primary")   # same name, different key
    server_ctx, _ = _contexts(pair)
    client_ctx = tls.client_context(impostor_cert, impostor_key, pair.primary_peer)
    server, client = asyncio.run(_handshake(server_ctx, client_ctx))
    assert server[0] == "refused" and isinstance(server[1], ssl.SSLError)
    assert client[0] == "refused"


def test_a_client_without_a_certificate_is_refused(pair):
    server_ctx, _ = _contexts(pair)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cafile=str(pair.primary_peer))
    server, client = asyncio.run(_handshake(server_ctx, client_ctx))
    assert server[0] == "refused" and isinstance(server[1], ssl.SSLError)
    assert client[0] == "refused"


def test_the_primary_refuses_an_impostor_vault(pair, tmp_path):
    impostor_cert, impostor_key = create_identity(tmp_path, "vault")
    server_ctx = tls.server_context(impostor_cert, impostor_key, pair.vault_peer)
    _, client_ctx = _contexts(pair)
    server, client = asyncio.run(_handshake(server_ctx, client_ctx))
    assert client[0] == "refused" and isinstance(client[1], ssl.SSLCertVerificationError)
    assert server[0] == "refused"


def test_the_primary_checks_the_vault_name(pair):
    server_ctx, client_ctx = _contexts(pair)
    server, client = asyncio.run(_handshake(server_ctx, client_ctx, server_hostname="airlock-primary"))
    assert client[0] == "refused" and isinstance(client[1], ssl.SSLCertVerificationError)
    assert server[0] == "refused"


def test_peer_fingerprint_needs_a_certificate():
    with pytest.raises(ValueError):
        tls.peer_fingerprint(None)
