"""
TLS for servers without a configured certificate: a self-signed certificate,
generated once into the state directory, and the ``ssl:`` endpoint string
that serves it (the default ``--listen``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.endpoints import quoteStringArgument
from twisted.python.filepath import FilePath

CERTIFICATE_FILE = "certificate.pem"
PRIVATE_KEY_FILE = "private-key.pem"
VALIDITY = datetime.timedelta(days=3650)
# Tolerate clients whose clocks run a little behind ours.
BACKDATE = datetime.timedelta(days=1)


def self_signed_certificate(
    hostnames: Iterable[str],
    ip_addresses: Iterable[str],
    *,
    now: datetime.datetime,
) -> tuple[bytes, bytes]:
    """
    A new self-signed certificate and its private key, both PEM.

    It is its own trust anchor: a client may trust it as a CA file
    (``ssl.create_default_context(cafile=...)``; OpenSSL accepts a trusted
    self-signed end-entity certificate, even with X509 strict checks), and it
    names every host and address in its subjectAltName, which is what clients
    match. It is not a CA (CA:FALSE, serverAuth only): it can vouch for no
    other certificate, and browsers such as Firefox refuse a CA certificate
    used as a server's.
    """
    hostnames = list(hostnames)
    addresses = [ipaddress.ip_address(address) for address in ip_addresses]
    if not hostnames and not addresses:
        raise ValueError("a certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, hostnames[0] if hostnames else "localhost"
            )
        ]
    )
    alternative_names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    alternative_names += [x509.IPAddress(address) for address in addresses]
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        # 159 random bits: positive, at most 20 bytes, unique per generation.
        .serial_number(int.from_bytes(secrets.token_bytes(20), "big") >> 1)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate_pem, key_pem


def _write_new(path: str, content: bytes, mode: int) -> None:
    """Write ``content`` to ``path`` atomically, created with ``mode``."""
    temporary = f"{path}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def ensure_self_signed(
    directory: FilePath | str,
    hostnames: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = ("127.0.0.1", "::1"),
) -> tuple[str, str]:
    """
    The paths ``(certificate, private key)`` of a self-signed certificate in
    ``directory``, generated (directory 0700, key 0600) unless both files
    already exist, in which case they are reused as they are.
    """
    path = directory.path if isinstance(directory, FilePath) else os.fspath(directory)
    certificate_path = os.path.join(path, CERTIFICATE_FILE)
    key_path = os.path.join(path, PRIVATE_KEY_FILE)
    if os.path.exists(certificate_path) and os.path.exists(key_path):
        return certificate_path, key_path
    os.makedirs(path, mode=0o700, exist_ok=True)
    # makedirs leaves an existing directory's mode, and umask may weaken ours.
    os.chmod(path, 0o700)
    certificate_pem, key_pem = self_signed_certificate(
        hostnames, ip_addresses, now=datetime.datetime.now(datetime.UTC)
    )
    # The key first: a certificate file alone is never mistaken for a pair.
    _write_new(key_path, key_pem, 0o600)
    _write_new(certificate_path, certificate_pem, 0o644)
    return certificate_path, key_path


def endpoint_description(
    port: int,
    cert_path: str,
    key_path: str,
    interface: str = "",
    *,
    extra_cert_chain: str | None = None,
) -> str:
    """
    A Twisted ``ssl:`` server endpoint description, for
    L{twisted.application.strports.service}, with every path and the
    interface quoted (colons and backslashes escaped).

    Twisted's ``certKey`` loads only the first certificate of its file;
    intermediates go in ``extra_cert_chain``.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer from 0 to 65535, got {port!r}")
    parts = [
        "ssl",
        f"port={port}",
        f"privateKey={quoteStringArgument(key_path)}",
        f"certKey={quoteStringArgument(cert_path)}",
    ]
    if extra_cert_chain is not None:
        parts.append(f"extraCertChain={quoteStringArgument(extra_cert_chain)}")
    if interface:
        parts.append(f"interface={quoteStringArgument(interface)}")
    return ":".join(parts)
