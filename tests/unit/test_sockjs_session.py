"""
Tests for shellserver.sockjs.session: the session state machine, driven
through fake receivers and a Clock.
"""

from attrs import define, field
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shellserver.sockjs import SockJSConnection, SockJSOptions
from shellserver.sockjs.framing import encode_message
from shellserver.sockjs.session import ForeignSession, SessionRegistry


@define
class RecordingReceiver:
    """
    A receiver that records frames; C{frames_per_attach} limits how many
    frames it takes before it ends itself (1 behaves like xhr polling).
    """

    transport_name: str = "xhr-streaming"
    frames_per_attach: int | None = None
    frames: list[str] = field(factory=list)
    ended: bool = False

    def _take(self, frame: str) -> bool:
        assert not self.ended, f"{frame!r} written to an ended receiver"
        self.frames.append(frame)
        if self.frames_per_attach is not None and len(self.frames) >= self.frames_per_attach:
            self.ended = True
            return False
        return True

    def write_open(self) -> bool:
        return self._take("o")

    def write_heartbeat(self) -> bool:
        return self._take("h")

    def write_messages(self, encoded: list[bytes]) -> bool:
        return self._take("a[" + ",".join(item.decode() for item in encoded) + "]")

    def write_close(self, code: int, reason: str) -> None:
        self._take(f"c[{code},{reason!r}]")
        self.ended = True


@define
class RecordingHandler:
    """
    The application side: records messages and the end of the session.
    """

    connection: SockJSConnection
    messages: list[str] = field(factory=list)
    closed_count: int = 0
    fail_on: str | None = None

    def message_received(self, text: str) -> None:
        if text == self.fail_on:
            raise ZeroDivisionError(text)
        self.messages.append(text)

    def closed(self) -> None:
        self.closed_count += 1


@implementer(IPushProducer)
@define
class RecordingProducer:
    """
    A push producer that records pause and resume calls.
    """

    calls: list[str] = field(factory=list)

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class SessionTestsMixin:
    """
    Builds a registry with a Clock and recording handlers.
    """

    options = SockJSOptions()

    def setUp(self) -> None:
        self.clock = Clock()
        self.handlers: list[RecordingHandler] = []
        self.registry = SessionRegistry(self.open_session, self.clock, self.options)

    def open_session(self, connection: SockJSConnection) -> RecordingHandler:
        handler = RecordingHandler(connection)
        self.handlers.append(handler)
        return handler

    def open(self, session_id: str = "s1", *, bound: bool = False) -> SockJSConnection:
        return self.registry.open(
            session_id=session_id,
            peer_host="10.0.0.7",
            origin="https://example.com",
            transport_name="xhr-streaming",
            encode=encode_message,
            bound=bound,
        )


class OpeningTests(SessionTestsMixin, SynchronousTestCase):
    def test_open_calls_open_session(self) -> None:
        """
        Opening a session hands the application its connection, with the
        request's details, and registers it under its id.
        """
        connection = self.open()
        self.assertEqual([handler.connection for handler in self.handlers], [connection])
        self.assertEqual(
            (connection.session_id, connection.peer_host, connection.origin),
            ("s1", "10.0.0.7", "https://example.com"),
        )
        self.assertTrue(connection.is_open)
        self.assertIs(self.registry.get("s1"), connection)

    def test_bound_sessions_are_not_registered(self) -> None:
        """
        Websocket sessions are not found by id (ids may be reused there).
        """
        self.open(bound=True)
        self.assertIsNone(self.registry.get("s1"))

    def test_open_frame_first(self) -> None:
        """
        The first receiver gets the open frame before messages the
        application sent while opening.
        """
        connection = self.open()
        connection.send("hello")
        receiver = RecordingReceiver()
        connection._attach(receiver)
        self.assertEqual(receiver.frames, ["o", 'a["hello"]'])

    def test_polling_open_frame_alone(self) -> None:
        """
        A polling receiver takes the open frame alone; queued messages wait
        for the next poll.
        """
        connection = self.open()
        connection.send("hello")
        first = RecordingReceiver(frames_per_attach=1)
        connection._attach(first)
        second = RecordingReceiver(frames_per_attach=1)
        connection._attach(second)
        self.assertEqual((first.frames, second.frames), (["o"], ['a["hello"]']))

    def test_open_session_raises(self) -> None:
        """
        If open_session raises, the failure is logged and the client gets
        the open frame then a 1011 close frame.
        """

        def broken(connection: SockJSConnection) -> RecordingHandler:
            raise ZeroDivisionError()

        registry = SessionRegistry(broken, self.clock, self.options)
        connection = registry.open(
            session_id="s1",
            peer_host="",
            origin=None,
            transport_name="xhr-streaming",
            encode=encode_message,
            bound=False,
        )
        receiver = RecordingReceiver()
        connection._attach(receiver)
        self.assertEqual(receiver.frames, ["o", "c[1011,'Internal error']"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_closed_while_opening(self) -> None:
        """
        A session closed inside open_session tells its handler once
        open_session returned, and serves the open and close frames.
        """
        handlers: list[RecordingHandler] = []

        def close_at_once(connection: SockJSConnection) -> RecordingHandler:
            connection.close()
            handler = RecordingHandler(connection)
            handlers.append(handler)
            return handler

        registry = SessionRegistry(close_at_once, self.clock, self.options)
        connection = registry.open(
            session_id="s1",
            peer_host="",
            origin=None,
            transport_name="xhr-polling",
            encode=encode_message,
            bound=False,
        )
        self.assertEqual(handlers[0].closed_count, 1)
        polls = [RecordingReceiver(frames_per_attach=1) for _ in range(3)]
        for poll in polls:
            connection._attach(poll)
        self.assertEqual(
            [poll.frames for poll in polls],
            [["o"], ["c[3000,'Go away!']"], ["c[3000,'Go away!']"]],
        )


class MessageTests(SessionTestsMixin, SynchronousTestCase):
    def test_send_while_attached(self) -> None:
        """
        Messages sent while a streaming receiver is attached go out at once.
        """
        connection = self.open()
        receiver = RecordingReceiver()
        connection._attach(receiver)
        connection.send("a")
        connection.send("b")
        self.assertEqual(receiver.frames, ["o", 'a["a"]', 'a["b"]'])
        self.assertEqual(connection.pending_bytes, 0)

    def test_queue_survives_reconnects(self) -> None:
        """
        Messages sent between receivers are delivered in order, batched, to
        the next receiver.
        """
        connection = self.open()
        first = RecordingReceiver(frames_per_attach=1)
        connection._attach(first)
        for text in ["1", "2", "3"]:
            connection.send(text)
        second = RecordingReceiver(frames_per_attach=1)
        connection._attach(second)
        connection.send("4")
        third = RecordingReceiver(frames_per_attach=1)
        connection._attach(third)
        self.assertEqual(
            [first.frames, second.frames, third.frames],
            [["o"], ['a["1","2","3"]'], ['a["4"]']],
        )

    def test_pending_bytes(self) -> None:
        """
        pending_bytes counts the encoded size of queued messages and drops
        to zero once they are handed to a receiver.
        """
        connection = self.open()
        connection._attach(RecordingReceiver(frames_per_attach=1))
        connection.send("abc")
        connection.send("é")
        self.assertEqual(connection.pending_bytes, len(b'"abc"') + len('"é"'.encode()))
        connection._attach(RecordingReceiver(frames_per_attach=1))
        self.assertEqual(connection.pending_bytes, 0)

    def test_deliver_in_order(self) -> None:
        """
        Messages from the client reach the handler in order.
        """
        connection = self.open()
        connection._deliver(["a", "b"])
        connection._deliver(["c"])
        self.assertEqual(self.handlers[0].messages, ["a", "b", "c"])

    def test_handler_exception_closes_session(self) -> None:
        """
        A handler that raises has its failure logged and its session closed
        with 1011; later messages of the batch are not delivered.
        """
        connection = self.open()
        receiver = RecordingReceiver()
        connection._attach(receiver)
        self.handlers[0].fail_on = "boom"
        connection._deliver(["a", "boom", "c"])
        self.assertEqual(self.handlers[0].messages, ["a"])
        self.assertEqual(receiver.frames[-1], "c[1011,'Internal error']")
        self.assertFalse(connection.is_open)
        self.assertEqual(self.handlers[0].closed_count, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_send_after_close_dropped(self) -> None:
        """
        Messages sent after the session closed are dropped.
        """
        connection = self.open()
        connection.close()
        connection.send("late")
        receiver = RecordingReceiver()
        connection._attach(receiver)
        self.assertEqual(receiver.frames, ["o", "c[3000,'Go away!']"])
        self.assertEqual(connection.pending_bytes, 0)


class CloseTests(SessionTestsMixin, SynchronousTestCase):
    def test_close_attached(self) -> None:
        """
        Closing sends the close frame to the attached receiver, ends it and
        tells the handler once.
        """
        connection = self.open()
        receiver = RecordingReceiver()
        connection._attach(receiver)
        connection.close(4001, "authentication failed")
        connection.close()
        self.assertEqual(receiver.frames, ["o", "c[4001,'authentication failed']"])
        self.assertTrue(receiver.ended)
        self.assertEqual(self.handlers[0].closed_count, 1)

    def test_close_delivers_queue_first(self) -> None:
        """
        Messages queued before close() reach the client before the close
        frame, even over polling.
        """
        connection = self.open()
        connection._attach(RecordingReceiver(frames_per_attach=1))
        connection.send("bye")
        connection.close(4003, "protocol error")
        polls = [RecordingReceiver(frames_per_attach=1) for _ in range(2)]
        for poll in polls:
            connection._attach(poll)
        self.assertEqual(
            [poll.frames for poll in polls],
            [['a["bye"]'], ["c[4003,'protocol error']"]],
        )

    def test_close_frame_served_until_expiry(self) -> None:
        """
        A closed session answers every new receiver with its close frame
        until disconnect_delay passes; then it is forgotten.
        """
        connection = self.open()
        connection._attach(RecordingReceiver(frames_per_attach=1))
        connection.close()
        self.clock.advance(self.options.disconnect_delay - 0.1)
        receiver = RecordingReceiver(frames_per_attach=1)
        connection._attach(receiver)
        self.assertEqual(receiver.frames, ["c[3000,'Go away!']"])
        self.assertIs(self.registry.get("s1"), connection)
        self.clock.advance(self.options.disconnect_delay)
        self.assertIsNone(self.registry.get("s1"))

    def test_second_receiver_gets_2010(self) -> None:
        """
        A second receiver while one is attached gets "Another connection
        still open" and the first one stays attached.
        """
        connection = self.open()
        first = RecordingReceiver()
        connection._attach(first)
        second = RecordingReceiver()
        connection._attach(second)
        connection.send("x")
        self.assertEqual(second.frames, ["c[2010,'Another connection still open']"])
        self.assertTrue(second.ended)
        self.assertEqual(first.frames, ["o", 'a["x"]'])
        self.assertTrue(connection.is_open)

    def test_receiver_lost_closes_with_1002(self) -> None:
        """
        A receiver whose connection breaks closes the session; later
        receivers get "Connection interrupted".
        """
        connection = self.open()
        first = RecordingReceiver()
        connection._attach(first)
        connection._receiver_lost(first)
        self.assertFalse(connection.is_open)
        self.assertEqual(self.handlers[0].closed_count, 1)
        second = RecordingReceiver(frames_per_attach=1)
        connection._attach(second)
        self.assertEqual(second.frames, ["c[1002,'Connection interrupted']"])

    def test_lost_detached_receiver_ignored(self) -> None:
        """
        Losing a receiver that is not attached (it ended already, or got
        2010) does not touch the session.
        """
        connection = self.open()
        first = RecordingReceiver()
        connection._attach(first)
        second = RecordingReceiver()
        connection._attach(second)
        connection._receiver_lost(second)
        self.assertTrue(connection.is_open)

    def test_bound_session_ends_with_receiver(self) -> None:
        """
        A websocket session closes as soon as its receiver is lost, without
        waiting for disconnect_delay.
        """
        connection = self.open(bound=True)
        receiver = RecordingReceiver(transport_name="websocket")
        connection._attach(receiver)
        connection._receiver_lost(receiver)
        self.assertEqual(self.handlers[0].closed_count, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TimerTests(SessionTestsMixin, SynchronousTestCase):
    def test_heartbeat(self) -> None:
        """
        An attached receiver gets an h frame every heartbeat_interval.
        """
        connection = self.open()
        receiver = RecordingReceiver()
        connection._attach(receiver)
        self.clock.advance(self.options.heartbeat_interval - 0.1)
        self.assertEqual(receiver.frames, ["o"])
        self.clock.advance(0.1)
        self.assertEqual(receiver.frames, ["o", "h"])
        self.clock.advance(self.options.heartbeat_interval)
        self.assertEqual(receiver.frames, ["o", "h", "h"])

    def test_heartbeat_ends_poll(self) -> None:
        """
        A waiting poll is answered with h after heartbeat_interval, and the
        session then waits disconnect_delay for the next one.
        """
        connection = self.open()
        connection._attach(RecordingReceiver(frames_per_attach=1))
        poll = RecordingReceiver(frames_per_attach=1)
        connection._attach(poll)
        self.clock.advance(self.options.heartbeat_interval)
        self.assertEqual(poll.frames, ["h"])
        self.assertTrue(connection.is_open)
        self.clock.advance(self.options.disconnect_delay)
        self.assertFalse(connection.is_open)

    def test_expiry_without_receiver(self) -> None:
        """
        A session without receiver closes disconnect_delay after the last
        one went, tells its handler, and is forgotten.
        """
        connection = self.open()
        connection._attach(RecordingReceiver(frames_per_attach=1))
        self.clock.advance(self.options.disconnect_delay - 0.1)
        self.assertTrue(connection.is_open)
        self.clock.advance(0.1)
        self.assertFalse(connection.is_open)
        self.assertEqual(self.handlers[0].closed_count, 1)
        self.assertIsNone(self.registry.get("s1"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_attached_receiver_keeps_session(self) -> None:
        """
        A session does not expire while a receiver is attached.
        """
        connection = self.open()
        connection._attach(RecordingReceiver())
        self.clock.advance(self.options.disconnect_delay * 100)
        self.assertTrue(connection.is_open)

    def test_no_heartbeat_after_detach(self) -> None:
        """
        The heartbeat stops with the receiver.
        """
        connection = self.open()
        receiver = RecordingReceiver(frames_per_attach=2)
        connection._attach(receiver)
        connection.send("x")
        self.clock.advance(self.options.heartbeat_interval)
        self.assertEqual(receiver.frames, ["o", 'a["x"]'])


class BackPressureTests(SessionTestsMixin, SynchronousTestCase):
    options = SockJSOptions(high_watermark=100, low_watermark=20)

    def test_recording_producer_is_a_push_producer(self) -> None:
        """
        The test producer provides IPushProducer.
        """
        self.assertTrue(verifyObject(IPushProducer, RecordingProducer()))

    def test_pause_above_high_watermark(self) -> None:
        """
        The producer is paused once pending output passes the high
        watermark, and resumed once it is handed to a receiver.
        """
        connection = self.open()
        connection._attach(RecordingReceiver(frames_per_attach=1))
        producer = RecordingProducer()
        connection.register_producer(producer)
        connection.send("x" * 50)
        self.assertEqual(producer.calls, [])
        connection.send("x" * 60)
        self.assertEqual(producer.calls, ["pause"])
        connection.send("x")
        self.assertEqual(producer.calls, ["pause"])
        connection._attach(RecordingReceiver(frames_per_attach=1))
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_register_when_already_above(self) -> None:
        """
        A producer registered while output is above the high watermark is
        paused at once.
        """
        connection = self.open()
        connection._attach(RecordingReceiver(frames_per_attach=1))
        connection.send("x" * 200)
        producer = RecordingProducer()
        connection.register_producer(producer)
        self.assertEqual(producer.calls, ["pause"])

    def test_second_producer_refused(self) -> None:
        """
        Only one producer can be registered at a time.
        """
        connection = self.open()
        connection.register_producer(RecordingProducer())
        self.assertRaises(RuntimeError, connection.register_producer, RecordingProducer())
        connection.unregister_producer()
        connection.register_producer(RecordingProducer())

    def test_paused_receiver_holds_output(self) -> None:
        """
        While the receiver's transport is paused, output stays queued (and
        counted), pausing the producer; resuming the transport flushes it
        and resumes the producer.
        """
        connection = self.open()
        receiver = RecordingReceiver()
        connection._attach(receiver)
        producer = RecordingProducer()
        connection.register_producer(producer)
        connection._pause_receiver(receiver)
        connection.send("x" * 120)
        self.assertEqual(receiver.frames, ["o"])
        self.assertEqual(connection.pending_bytes, 122)
        self.assertEqual(producer.calls, ["pause"])
        connection._resume_receiver(receiver)
        self.assertEqual(receiver.frames, ["o", 'a["' + "x" * 120 + '"]'])
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_close_flushes_paused_receiver(self) -> None:
        """
        Closing delivers queued output even to a paused receiver, then the
        close frame.
        """
        connection = self.open()
        receiver = RecordingReceiver()
        connection._attach(receiver)
        connection._pause_receiver(receiver)
        connection.send("last")
        connection.close()
        self.assertEqual(receiver.frames, ["o", 'a["last"]', "c[3000,'Go away!']"])


class OwnershipTests(SessionTestsMixin, SynchronousTestCase):
    options = SockJSOptions(max_sessions_per_address=2)

    def test_find_for_owner(self) -> None:
        """
        find returns a session to the address that opened it, and None for
        an unknown id.
        """
        connection = self.open()
        self.assertIs(self.registry.find("s1", peer_host="10.0.0.7", jsessionid=None), connection)
        self.assertIsNone(self.registry.find("s2", peer_host="10.0.0.7", jsessionid=None))

    def test_find_for_other_address(self) -> None:
        """
        find refuses a session to any other address.
        """
        self.open()
        with self.assertRaises(ForeignSession) as raised:
            self.registry.find("s1", peer_host="10.0.0.8", jsessionid=None)
        self.assertEqual(
            (raised.exception.session_id, raised.exception.peer_host), ("s1", "10.0.0.8")
        )

    def test_find_checks_cookie(self) -> None:
        """
        A session opened with a JSESSIONID is found only with that cookie.
        """
        self.registry.open(
            session_id="s1",
            peer_host="10.0.0.7",
            origin=None,
            transport_name="xhr-polling",
            encode=encode_message,
            bound=False,
            jsessionid=b"abc",
        )
        for other in [None, b"abd"]:
            self.assertRaises(
                ForeignSession, self.registry.find, "s1", peer_host="10.0.0.7", jsessionid=other
            )
        self.assertIsNotNone(self.registry.find("s1", peer_host="10.0.0.7", jsessionid=b"abc"))

    def test_room_counts_every_session(self) -> None:
        """
        has_room_for counts an address's sessions of every transport,
        websocket ones included, until they are forgotten.
        """
        self.open("s1")
        websocket = self.open("s2", bound=True)
        websocket._attach(RecordingReceiver(transport_name="websocket"))
        self.assertFalse(self.registry.has_room_for("10.0.0.7"))
        self.assertTrue(self.registry.has_room_for("10.0.0.8"))
        websocket.close()
        self.assertTrue(self.registry.has_room_for("10.0.0.7"))

    def test_no_limit_without_address(self) -> None:
        """
        Peers without an IP address (UNIX sockets) are not limited.
        """
        for session_id in ["a", "b", "c"]:
            self.registry.open(
                session_id=session_id,
                peer_host="",
                origin=None,
                transport_name="xhr-polling",
                encode=encode_message,
                bound=False,
            )
        self.assertTrue(self.registry.has_room_for(""))
