"""Websocket ping floods: answered up to a budget per minute, then closed with 1008."""

from test_sockjs_websocket import CLOSE, TEXT, WebSocketTestsMixin
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sockjs import SockJSOptions

PING, PONG = 0x9, 0xA


class PingFloodTests(WebSocketTestsMixin, SynchronousTestCase):
    options = SockJSOptions(max_client_pings_per_minute=5)

    def test_pings_answered_within_budget(self):
        """Up to the budget, every ping gets a pong with its payload."""
        client = self.connect("/sockjs/websocket")
        for index in range(5):
            client.send(b"p%d" % index, PING)
        self.assertEqual(client.received(), [(PONG, b"p%d" % i) for i in range(5)])

    def test_flood_closed_with_1008(self):
        """Past the budget the raw websocket closes with 1008 and answers no more."""
        client = self.connect("/sockjs/websocket")
        for index in range(50):
            client.send(b"%d" % index, PING)
        frames = client.received()
        self.assertEqual(len([f for f in frames if f[0] == PONG]), 5)
        self.assertEqual(frames[-1], (CLOSE, b"\x03\xf0Too many pings"))
        self.assertEqual(self.handlers[0].closed_count, 1)

    def test_framed_says_why(self):
        """The framed websocket sends c[1008,...] before its close frame."""
        client = self.connect()
        client.received()
        for _ in range(6):
            client.send(b"", PING)
        frames = [f for f in client.received() if f[0] != PONG]
        self.assertEqual(frames, [(TEXT, b'c[1008,"Too many pings"]'),
                                  (CLOSE, b"\x03\xf0Too many pings")])

    def test_budget_renews_each_minute(self):
        """The budget is per minute: a patient client is never closed."""
        client = self.connect("/sockjs/websocket")
        for _ in range(3):
            for _ in range(5):
                client.send(b"", PING)
            self.clock.advance(60)
        frames = client.received()
        self.assertEqual(frames, [(PONG, b"")] * 15)
