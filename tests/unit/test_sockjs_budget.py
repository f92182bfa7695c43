"""
Tests for shellserver.sockjs.budget (the token bucket) and the input budget
of sessions and their transports, on a Clock.
"""

from test_sockjs_http import HTTPTestsMixin
from test_sockjs_session import SessionTestsMixin
from test_sockjs_websocket import WebSocketTestsMixin, client_frame
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sockjs import SockJSOptions
from shellserver.sockjs.budget import InputBudget
from shellserver.sockjs.receiver import MAX_HELD_SENDS
from shellserver.sockjs.session import COUNTED_BEFORE_TIMER, DELIVER_PER_TURN

# 10 messages and 100 bytes a second, bursts of 5 and 50
SMALL = SockJSOptions(
    input_messages_per_second=10,
    input_bytes_per_second=100,
    input_burst_messages=5,
    input_burst_bytes=50,
)


def small_budget(clock: Clock) -> InputBudget:
    return InputBudget(clock=clock, messages_per_second=10, bytes_per_second=100,
                       burst_messages=5, burst_bytes=50)


class InputBudgetTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """
        A full budget lets a burst through; then one message per refill.
        """
        clock = Clock()
        budget = small_budget(clock)
        for _ in range(5):
            self.assertTrue(budget.allows())
            budget.charge(1)
        self.assertFalse(budget.allows())
        self.assertAlmostEqual(budget.seconds_until_allowed(), 0.1, places=2)
        clock.advance(0.05)
        self.assertFalse(budget.allows())
        clock.advance(0.06)
        self.assertTrue(budget.allows())

    def test_large_message_goes_into_debt(self) -> None:
        """
        A message larger than what is left is let through whole, and the
        next waits until the bytes have refilled above zero.
        """
        clock = Clock()
        budget = small_budget(clock)
        budget.charge(150)
        self.assertFalse(budget.allows())
        self.assertAlmostEqual(budget.seconds_until_allowed(), 1.0, places=2)
        clock.advance(budget.seconds_until_allowed())
        self.assertTrue(budget.allows())

    def test_refill_is_capped_at_the_burst(self) -> None:
        """
        A long quiet spell refills no more than the burst.
        """
        clock = Clock()
        budget = small_budget(clock)
        clock.advance(3600)
        self.assertTrue(budget.is_full())
        for _ in range(5):
            budget.charge(1)
        self.assertFalse(budget.allows())
        self.assertFalse(budget.is_full())


class SessionBudgetTests(SessionTestsMixin, SynchronousTestCase):
    options = SMALL

    def test_within_budget_at_once(self) -> None:
        """
        Messages within the budget reach the application at once, and
        _receive says so (their done callback is not called).
        """
        connection = self.open()
        done: list[bool] = []
        self.assertTrue(connection._receive(["a", "b"], done.append))
        self.assertEqual(self.handlers[0].messages, ["a", "b"])
        self.assertEqual(done, [])

    def test_past_budget_held_in_order(self) -> None:
        """
        Past the burst, messages are held, in order, and handed over as the
        budget refills; none is lost, and done(True) follows the last.
        """
        connection = self.open()
        first: list[bool] = []
        second: list[bool] = []
        self.assertFalse(connection._receive([str(i) for i in range(8)], first.append))
        self.assertFalse(connection._receive(["8", "9"], second.append))
        self.assertEqual(self.handlers[0].messages, ["0", "1", "2", "3", "4"])
        self.clock.advance(0.11)
        self.assertEqual(self.handlers[0].messages, [str(i) for i in range(6)])
        self.clock.pump([0.1] * 10)
        self.assertEqual(self.handlers[0].messages, [str(i) for i in range(10)])
        self.assertEqual((first, second), ([True], [True]))
        self.assertEqual(connection._held_count, 0)

    def test_rate_over_time(self) -> None:
        """
        A client that keeps sending gets the rate, not more: 10 a second
        after the burst of 5.
        """
        connection = self.open()
        connection._receive(["x"] * 100, lambda delivered: None)
        self.clock.pump([0.01] * 300)  # 3 s
        self.assertIn(len(self.handlers[0].messages), range(33, 37))

    def test_bytes_budget(self) -> None:
        """
        Bytes are budgeted too: a 100-byte message takes the byte bucket 50
        below zero, and the next waits half a second.
        """
        connection = self.open()
        connection._receive(["y" * 100, "z"], lambda delivered: None)
        self.assertEqual(self.handlers[0].messages, ["y" * 100])
        self.clock.advance(0.4)
        self.assertEqual(len(self.handlers[0].messages), 1)
        self.clock.advance(0.2)
        self.assertEqual(self.handlers[0].messages, ["y" * 100, "z"])

    def test_close_drops_held(self) -> None:
        """
        When the session closes, held input is never handed over and its
        done is called with False; no timer is left behind.
        """
        connection = self.open()
        done: list[bool] = []
        connection._receive(["x"] * 8, done.append)
        connection.close()
        self.assertEqual(done, [False])
        self.assertIsNone(connection._drain_call)
        self.clock.advance(10)
        self.assertEqual(len(self.handlers[0].messages), 5)

    def test_received_after_close(self) -> None:
        """
        Messages for a closed session are taken (and ignored) at once.
        """
        connection = self.open()
        connection.close()
        self.assertTrue(connection._receive(["x"], lambda delivered: None))
        self.assertEqual(self.handlers[0].messages, [])


class DeliverPerTurnTests(SessionTestsMixin, SynchronousTestCase):
    options = SockJSOptions()

    def test_large_batch_spread_over_turns(self) -> None:
        """
        Within the budget, a large batch is handed over at most
        DELIVER_PER_TURN messages per reactor turn, so other sessions get
        their turn in between.
        """
        connection = self.open()
        done: list[bool] = []
        count = DELIVER_PER_TURN * 2 + 10
        self.assertFalse(connection._receive(["x"] * count, done.append))
        self.assertEqual(len(self.handlers[0].messages), DELIVER_PER_TURN)
        # the rest follows on the next turn, without waiting for any refill
        self.assertEqual(connection._drain_call.getTime(), self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual((len(self.handlers[0].messages), done), (count, [True]))

    def test_single_message_after_a_full_turn_waits(self) -> None:
        """
        A single message after a turn's share has been handed over waits
        for the next turn, behind what is held, in order.
        """
        connection = self.open()
        done: list[bool] = []
        self.assertFalse(connection._receive(["x"] * (DELIVER_PER_TURN + 1), done.append))
        self.assertFalse(connection._receive(["last"], done.append))
        self.assertEqual(len(self.handlers[0].messages), DELIVER_PER_TURN)
        self.clock.advance(0)
        self.assertEqual(self.handlers[0].messages[-2:], ["x", "last"])
        self.assertEqual(done, [True, True])

    def test_lone_messages_cost_no_timer(self) -> None:
        """
        A message now and then (a keystroke) is handed over without starting
        a call for the next turn.
        """
        connection = self.open()
        calls = len(self.clock.getDelayedCalls())
        for _ in range(COUNTED_BEFORE_TIMER - 1):
            self.assertTrue(connection._receive(["k"], lambda delivered: None))
            self.assertEqual(len(self.clock.getDelayedCalls()), calls)
            self.clock.advance(0.01)
        self.assertEqual(len(self.handlers[0].messages), COUNTED_BEFORE_TIMER - 1)

    def test_earlier_messages_never_raise_a_turns_share(self) -> None:
        """
        Messages counted in earlier turns may shorten a turn's share, by
        fewer than COUNTED_BEFORE_TIMER, and never lengthen it.
        """
        connection = self.open()
        for _ in range(COUNTED_BEFORE_TIMER - 1):
            connection._receive(["k"], lambda delivered: None)
            self.clock.advance(0.01)
        before = len(self.handlers[0].messages)
        self.assertFalse(connection._receive(["x"] * DELIVER_PER_TURN * 2, lambda d: None))
        share = len(self.handlers[0].messages) - before
        self.assertLessEqual(share, DELIVER_PER_TURN)
        self.assertGreater(share, DELIVER_PER_TURN - COUNTED_BEFORE_TIMER)
        # the next turn starts a count of its own
        self.clock.advance(0)
        self.assertEqual(len(self.handlers[0].messages) - before, DELIVER_PER_TURN * 2)


class WebSocketBudgetTests(WebSocketTestsMixin, SynchronousTestCase):
    options = SMALL

    def test_socket_not_read_past_budget(self) -> None:
        """
        Past the budget the websocket's transport is paused (the socket is
        not read) and the frames read already wait unparsed behind the held
        one; they are handed over in order as the budget refills, and then
        reading resumes.
        """
        client = self.connect("/sockjs/websocket")
        for i in range(8):
            client.send(str(i).encode())
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(self.handlers[0].messages, ["0", "1", "2", "3", "4"])
        self.assertEqual(self.handlers[0].connection._held_count, 1)
        self.clock.pump([0.1] * 5)
        self.assertEqual(self.handlers[0].messages, [str(i) for i in range(8)])
        self.assertEqual(client.transport.producerState, "producing")

    def test_framed_batch_past_budget(self) -> None:
        """
        One framed websocket message carrying many SockJS messages is
        budgeted per message: the connection is paused until all are in.
        """
        client = self.connect()
        client.send(b'["a","b","c","d","e","f","g"]')
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(len(self.handlers[0].messages), 5)
        self.clock.pump([0.1] * 3)
        self.assertEqual(self.handlers[0].messages, list("abcdefg"))
        self.assertEqual(client.transport.producerState, "producing")

    def test_close_while_held_resumes_reading(self) -> None:
        """
        A session that ends with input held reads its socket again (for the
        closing handshake) and hands nothing more over.
        """
        client = self.connect("/sockjs/websocket")
        for i in range(8):
            client.send(str(i).encode())
        self.handlers[0].connection.close()
        self.clock.advance(0)
        self.assertEqual(client.transport.producerState, "producing")
        self.clock.advance(10)
        self.assertEqual(len(self.handlers[0].messages), 5)


class XhrSendBudgetTests(HTTPTestsMixin, SynchronousTestCase):
    options = SMALL

    def test_answer_held_until_delivered(self) -> None:
        """
        An xhr_send past the budget is answered 204 only once its messages
        have been handed over.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        body = b'["0","1","2","3","4","5","6"]'
        exchange = self.request("POST", "/sockjs/000/s1/xhr_send", body)
        self.assertFalse(exchange.response().complete)
        self.assertEqual(len(self.handlers[0].messages), 5)
        self.clock.pump([0.1] * 3)
        response = exchange.response()
        self.assertEqual((response.status, response.complete), (204, True))
        self.assertEqual(self.handlers[0].messages, [str(i) for i in range(7)])

    def test_jsonp_send_held_until_delivered(self) -> None:
        """
        jsonp_send is budgeted like xhr_send: "ok" comes once delivered.
        """
        self.fetch("GET", "/sockjs/000/s1/jsonp?c=x")
        exchange = self.request("POST", "/sockjs/000/s1/jsonp_send",
                                b'["0","1","2","3","4","5"]',
                                {"Content-Type": "text/plain"})
        self.assertFalse(exchange.response().complete)
        self.clock.advance(0.11)
        self.assertEqual((exchange.response().status, exchange.response().body), (200, b"ok"))

    def test_too_many_held_sends(self) -> None:
        """
        Past MAX_HELD_SENDS waiting requests of one session (sockjs-client
        sends one at a time), a send is refused 429 and nothing of it is
        delivered.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        self.request("POST", "/sockjs/000/s1/xhr_send", b'["0","1","2","3","4","5"]')
        for _ in range(MAX_HELD_SENDS - 1):
            self.request("POST", "/sockjs/000/s1/xhr_send", b'["h"]')
        refused = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["refused"]')
        self.assertEqual(refused.status, 429)
        self.assertIn(b"Too many sends", refused.body)
        self.clock.pump([0.1] * 20)
        self.assertNotIn("refused", self.handlers[0].messages)
        self.assertEqual(self.handlers[0].messages.count("h"), MAX_HELD_SENDS - 1)

    def test_session_closed_while_held(self) -> None:
        """
        A send held when its session closes is answered 404, as a send to a
        session that is gone.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        exchange = self.request("POST", "/sockjs/000/s1/xhr_send",
                                b'["0","1","2","3","4","5"]')
        self.handlers[0].connection.close()
        self.assertEqual(exchange.response().status, 404)

    def test_client_gone_while_held(self) -> None:
        """
        A client that drops its held send costs nothing more: the messages
        are still handed over, and no answer is written to the lost request.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        exchange = self.request("POST", "/sockjs/000/s1/xhr_send",
                                b'["0","1","2","3","4","5"]')
        exchange.lose_connection()
        self.clock.advance(0.2)
        self.assertEqual(len(self.handlers[0].messages), 6)



class WebSocketTurnTests(WebSocketTestsMixin, SynchronousTestCase):
    options = SockJSOptions()

    def test_one_read_of_many_frames(self) -> None:
        """
        One read carrying many raw websocket frames, within the budget, is
        handed over DELIVER_PER_TURN messages per reactor turn: the rest
        wait unparsed, and the socket is paused until they are in.
        """
        client = self.connect("/sockjs/websocket")
        count = DELIVER_PER_TURN + 44
        client.protocol.dataReceived(
            b"".join(client_frame(str(i).encode()) for i in range(count)))
        self.assertEqual(len(self.handlers[0].messages), DELIVER_PER_TURN)
        self.assertEqual(client.transport.producerState, "paused")
        self.clock.advance(0)
        self.assertEqual(self.handlers[0].messages, [str(i) for i in range(count)])
        self.assertEqual(client.transport.producerState, "producing")
