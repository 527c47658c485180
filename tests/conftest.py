"""Shared fixtures: test certificates and helpers for real servers on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _write_pki(root: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def save_key(k, path: Path) -> Path:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        return path

    def save_cert(c, path: Path) -> Path:
        path.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        return path

    def ca(name: str):
        k = key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(k.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(k, hashes.SHA256()))
        return k, cert

    def leaf(ca_key, ca_cert, name: str, usage):
        k = key()
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_cert.subject).public_key(k.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return k, cert

    ca_key, ca_cert = ca("epicycle test CA")
    _, other_cert = ca("some other CA")
    s_key, s_cert = leaf(ca_key, ca_cert, "localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    c_key, c_cert = leaf(ca_key, ca_cert, "coordinator", ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=save_cert(ca_cert, root / "ca.pem"),
        server_cert=save_cert(s_cert, root / "server.pem"),
        server_key=save_key(s_key, root / "server.key"),
        client_cert=save_cert(c_cert, root / "client.pem"),
        client_key=save_key(c_key, root / "client.key"),
        other_ca=save_cert(other_cert, root / "other-ca.pem"),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """A throw-away CA with a server certificate for 127.0.0.1/localhost and a client certificate."""
    return _write_pki(tmp_path_factory.mktemp("pki"))
