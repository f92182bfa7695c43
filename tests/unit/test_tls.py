"""
Tests for shellserver.tls: the self-signed certificate and the ssl: endpoint.

Generation writes real files, so these tests use a small temporary
directory; TLS handshakes run over memory BIOs, with no sockets.
"""

import datetime
import ipaddress
import os
import shutil
import ssl
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from shellserver.tls import endpoint_description, ensure_self_signed


def temporary_directory(case: SynchronousTestCase) -> str:
    """A fresh directory removed after the test (not self.mktemp(), which
    pytest would put in the current directory)."""
    directory = tempfile.mkdtemp(prefix="shellserver-test-")
    case.addCleanup(shutil.rmtree, directory)
    return directory


def handshake(cafile: str, cert: str, key: str, hostname: str, strict: bool) -> str:
    """
    Run a TLS handshake between a client trusting ``cafile`` and a server
    using ``cert``/``key``, in memory; return the negotiated version.
    """
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cafile)
    if strict:
        # Python 3.13 sets this by default: stay acceptable to it.
        client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, server_out = to_client, ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, to_server, server_hostname=hostname)
    server_in = ssl.MemoryBIO()
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(5):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        server_in.write(to_server.read())
        client_in.write(server_out.read())
    client.do_handshake()
    version = client.version()
    assert version is not None
    return version


class SelfSignedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.join(temporary_directory(self), "tls")

    def load(self, path: str) -> x509.Certificate:
        with open(path, "rb") as file:
            return x509.load_pem_x509_certificate(file.read())

    def test_trusted_for_localhost_names(self) -> None:
        """Clients trusting the certificate accept it for localhost and loopback IPs."""
        cert, key = ensure_self_signed(self.directory)
        for hostname in ("localhost", "127.0.0.1", "::1"):
            for strict in (False, True):
                self.assertIn("TLS", handshake(cert, cert, key, hostname, strict))

    def test_other_names_refused(self) -> None:
        """The certificate is not valid for names it does not list."""
        cert, key = ensure_self_signed(self.directory)
        for hostname in ("example.org", "127.0.0.2"):
            with self.assertRaises(ssl.SSLCertVerificationError):
                handshake(cert, cert, key, hostname, strict=False)

    def test_chosen_names(self) -> None:
        """Given host names and addresses are the ones in the certificate."""
        cert, key = ensure_self_signed(
            self.directory,
            hostnames=("shell.test", "alt.test"),
            ip_addresses=("10.1.2.3",),
        )
        names = self.load(cert).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        self.assertEqual(
            names.value.get_values_for_type(x509.DNSName), ["shell.test", "alt.test"]
        )
        self.assertEqual(
            names.value.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("10.1.2.3")],
        )
        self.assertIn("TLS", handshake(cert, cert, key, "alt.test", strict=True))

    def test_certificate_properties(self) -> None:
        """EC P-256, CN localhost, self-issued, valid for about ten years from now."""
        cert, _ = ensure_self_signed(self.directory)
        certificate = self.load(cert)
        public_key = certificate.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        self.assertEqual(public_key.curve.name, "secp256r1")
        common_name = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual(common_name[0].value, "localhost")
        self.assertEqual(certificate.issuer, certificate.subject)
        now = datetime.datetime.now(datetime.UTC)
        self.assertLess(certificate.not_valid_before_utc, now)
        lifetime = certificate.not_valid_after_utc - now
        self.assertGreater(lifetime, datetime.timedelta(days=3640))
        self.assertLess(lifetime, datetime.timedelta(days=3660))
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
        # Not a CA: it vouches for nothing else, and browsers refuse CA
        # certificates used as a server's.
        self.assertFalse(constraints.ca)

    def test_file_modes(self) -> None:
        """The key is 0600 and the directory 0700."""
        _, key = ensure_self_signed(self.directory)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_existing_directory_made_private(self) -> None:
        """An existing, more open directory is made 0700 when generating."""
        os.makedirs(self.directory, mode=0o755)
        os.chmod(self.directory, 0o755)
        ensure_self_signed(self.directory)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_generated_once(self) -> None:
        """A second call reuses the files instead of generating new ones."""
        first = ensure_self_signed(self.directory)
        with open(first[0], "rb") as file:
            before = file.read()
        second = ensure_self_signed(self.directory)
        self.assertEqual(first, second)
        with open(second[0], "rb") as file:
            self.assertEqual(file.read(), before)
        self.assertEqual(
            sorted(os.listdir(self.directory)),
            sorted(os.path.basename(path) for path in first),
        )

    def test_half_pair_regenerated(self) -> None:
        """A certificate without its key is replaced by a fresh pair."""
        cert, key = ensure_self_signed(self.directory)
        with open(cert, "rb") as file:
            before = file.read()
        os.unlink(key)
        self.assertEqual(ensure_self_signed(self.directory), (cert, key))
        with open(cert, "rb") as file:
            self.assertNotEqual(file.read(), before)
        self.assertIn("TLS", handshake(cert, cert, key, "localhost", strict=True))

    def test_file_path(self) -> None:
        """The directory may be given as a FilePath."""
        cert, key = ensure_self_signed(FilePath(self.directory))
        self.assertEqual(os.path.dirname(cert), self.directory)
        self.assertEqual(os.path.dirname(key), self.directory)


class EndpointDescriptionTests(SynchronousTestCase):
    def listen(self, description: str) -> tuple:
        reactor = MemoryReactor()
        endpoint = serverFromString(reactor, description)
        endpoint.listen(Factory.forProtocol(Protocol))
        [server] = reactor.sslServers
        return server

    def test_plain(self) -> None:
        """Simple paths give a readable ssl: description."""
        self.assertEqual(
            endpoint_description(8443, "/s/tls/cert.pem", "/s/tls/key.pem"),
            "ssl:port=8443:privateKey=/s/tls/key.pem:certKey=/s/tls/cert.pem",
        )

    def test_interface_and_chain(self) -> None:
        """An interface and an extra chain file are added when given."""
        self.assertEqual(
            endpoint_description(
                443, "/c.pem", "/k.pem", "::", extra_cert_chain="/chain.pem"
            ),
            "ssl:port=443:privateKey=/k.pem:certKey=/c.pem"
            r":extraCertChain=/chain.pem:interface=\:\:",
        )

    def test_escaping(self) -> None:
        """Colons and backslashes in paths are escaped for Twisted's parser."""
        description = endpoint_description(1, r"/a:b\c=d.pem", "/k:.pem")
        self.assertIn(r"certKey=/a\:b\\c=d.pem", description)
        self.assertIn(r"privateKey=/k\:.pem", description)

    def test_twisted_parses_it(self) -> None:
        """Twisted listens on the port and interface with the generated pair."""
        directory = os.path.join(temporary_directory(self), r"odd:name\x")
        cert, key = ensure_self_signed(directory)
        port, _, options, _, interface = self.listen(
            endpoint_description(8443, cert, key, interface="::1")
        )
        self.assertEqual((port, interface), (8443, "::1"))
        with open(cert, "rb") as file:
            expected = crypto.load_certificate(crypto.FILETYPE_PEM, file.read())
        self.assertEqual(
            options.certificate.digest("sha256"), expected.digest("sha256")
        )

    def test_bad_port(self) -> None:
        """A port outside 0-65535, or not an integer, is refused."""
        for port in (-1, 65536, "443", True):
            self.assertRaises(ValueError, endpoint_description, port, "/c", "/k")
