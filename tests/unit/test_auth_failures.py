"""Wrong console tokens per address: counted by Admission, refused by the console."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.admission import Admission
from shellserver.auth import TokenAuthority
from shellserver.console import (
    CLOSE_AUTH_FAILED,
    CLOSE_NOT_ADMITTED,
    ConsoleFactory,
    ConsoleSettings,
)
from shellserver.testing import FakeConnection, FakeSandboxStarter

A, B = "192.0.2.1", "192.0.2.2"
ORIGIN = "https://console.example"


def admission(clock, limit=3):
    return Admission(clock, capacity=10, per_address=5, per_address_per_minute=50,
                     auth_failures_per_minute=limit)


class AdmissionFailureTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.admission = admission(self.clock)

    def test_below_the_limit(self):
        """Fewer failures than the limit within a minute refuse nothing."""
        for _ in range(2):
            self.admission.auth_failed(A)
        self.assertIsNone(self.admission.auth_retry_after(A))

    def test_at_the_limit(self):
        """At the limit the address waits until its oldest failure is a minute old."""
        self.admission.auth_failed(A)
        self.clock.advance(10)
        self.admission.auth_failed(A)
        self.admission.auth_failed(A)
        self.assertEqual(self.admission.auth_retry_after(A), 50)
        self.assertIsNone(self.admission.auth_retry_after(B))
        self.clock.advance(50)
        self.assertIsNone(self.admission.auth_retry_after(A))

    def test_no_limit(self):
        """With a limit of 0, failures are not even counted."""
        unlimited = admission(self.clock, limit=0)
        for _ in range(100):
            unlimited.auth_failed(A)
        self.assertIsNone(unlimited.auth_retry_after(A))
        self.assertEqual(unlimited._failures, {})

    def test_addressless_peers_not_limited(self):
        """Peers without an address (UNIX sockets) are not limited."""
        for _ in range(10):
            self.admission.auth_failed("")
        self.assertIsNone(self.admission.auth_retry_after(""))

    def test_memory_bounded(self):
        """Per address at most the limit is kept, and old addresses are forgotten."""
        for _ in range(100):
            self.admission.auth_failed(A)
        self.assertEqual(len(self.admission._failures[A]), 3)
        self.clock.advance(61)
        self.admission.auth_failed(B)
        self.assertNotIn(A, self.admission._failures)


class ConsoleFailureTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.tokens = TokenAuthority(b"k" * 32, node="node-1", clock=self.clock, ttl=60.0)
        self.starter = FakeSandboxStarter()
        self.admission = admission(self.clock, limit=2)
        self.factory = ConsoleFactory(
            self.clock, self.tokens, self.starter,
            ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0),
            self.admission)

    def present(self, token, peer=A):
        connection = FakeConnection(origin=ORIGIN, peer_host=peer)
        session = self.factory(connection)
        connection.handler = session
        session.message_received("a" + token)
        return connection

    def test_wrong_tokens_counted(self):
        """Each wrong token gets 4001 and counts against its address."""
        for _ in range(2):
            self.assertEqual(self.present("v1.AAAA.BBBB").close_code, CLOSE_AUTH_FAILED)
        self.assertIsNotNone(self.admission.auth_retry_after(A))

    def test_refused_past_the_limit(self):
        """Past the limit even a good token gets 4004, starts nothing and is not used up."""
        self.present("x")
        self.present("y")
        token = self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=A)
        connection = self.present(token)
        self.assertEqual(connection.close_code, CLOSE_NOT_ADMITTED)
        self.assertIn("too many wrong console tokens", connection.close_reason)
        self.assertIn("Try again in 60 seconds", connection.close_reason)
        self.assertEqual(self.starter.started, [])
        self.assertEqual(self.tokens.remembered, 0)

    def test_other_addresses_unaffected(self):
        """One address's failures do not refuse another's good token."""
        self.present("x")
        self.present("y")
        token = self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=B)
        self.assertIsNone(self.present(token, peer=B).close_code)
        self.assertEqual(len(self.starter.started), 1)
