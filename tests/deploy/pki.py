"""Certificates as docs/deploy.md ("TLS") tells an operator to issue them, for checking the tls component.

One CA; per role a certificate with the Service names its clients dial as DNS SANs and the usages it
needs (servers: server auth for their clients, client auth for their own exec probe — and the sampler's
stream to the learner; the coordinator: client auth only).  Written as the Secrets hold them:
``<role>/tls.crt``, ``<role>/tls.key``, ``<role>/ca.crt``.
"""

from __future__ import annotations

import datetime
from pathlib import Path


def service_sans(namespace: str) -> dict[str, list[str]]:
    """DNS names each role's certificate carries (docs/deploy.md, "TLS"; coordinator: a client only)."""

    def names(service: str) -> list[str]:
        return [service, f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]

    return {
        "oracle": names("oracle-headless"),
        "learner": names("learner"),
        "sampler": names("sampler") + names("sampler-headless"),
        "coordinator": ["coordinator"],
    }


def write_secrets(root: Path, sans: dict[str, list[str]]) -> dict[str, Path]:
    """A CA and one Secret-like directory per role; returns ``{role: directory}``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epicycle test CA")])
    ca_cert = (builder("epicycle test CA", ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    out = {}
    for role, dns in sans.items():
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role != "coordinator":
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (builder(dns[0], ca_cert.subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(ca_key, hashes.SHA256()))
        d = root / role
        d.mkdir(parents=True, exist_ok=True)
        (d / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        (d / "ca.crt").write_bytes(ca_pem)
        out[role] = d
    return out
