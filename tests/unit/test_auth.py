"""Tests for shellserver.auth: console tokens, the token secret, unregistered users."""

import base64
import hashlib
import hmac
import json
import os
import shutil
import stat
import tempfile

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.auth import (
    COMPACT_SLACK,
    EXPIRED,
    FORGED,
    MALFORMED,
    MAX_TOKEN_LENGTH,
    NO_ORIGIN,
    REPLAYED,
    WRONG_CLIENT,
    WRONG_NODE,
    WRONG_ORIGIN,
    SecretFileError,
    TokenAuthority,
    TokenClaims,
    TokenError,
    UnregisteredUser,
    UsedTokenFile,
    UsedTokenFileError,
    load_or_create_secret,
    new_unregistered_user,
)

SECRET = b"s" * 32
ORIGIN = "https://console.example.org"
CLIENT = "192.0.2.7"
TTL = 60.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(payload: str, secret: bytes = SECRET) -> str:
    """A token for ``payload`` signed the documented way, independently of auth."""
    mac = hmac.new(secret, f"v1.{payload}".encode(), hashlib.sha256).digest()
    return f"v1.{payload}.{b64(mac)}"


def client_digest(address: str, secret: bytes = SECRET) -> str:
    """The documented keyed hash of a client address, independently of auth."""
    mac = hmac.new(secret, b"client address\0" + address.encode(), hashlib.sha256)
    return b64(mac.digest()[:16])


def claims_payload(**changes: object) -> str:
    claims = {
        "user_id": "u1",
        "node": "node-a",
        "origin": ORIGIN,
        "client": client_digest(CLIENT),
        "issued_at": 100.0,
        "expires_at": 160.0,
        "nonce": "n1",
    }
    claims.update(changes)
    return b64(json.dumps(claims).encode())


class TokenTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.authority = self.make_authority()

    def make_authority(
        self, secret: bytes = SECRET, node: str = "node-a"
    ) -> TokenAuthority:
        return TokenAuthority(secret, node=node, clock=self.clock, ttl=TTL)

    def assertRefused(
        self, token: str, reason: str, origin: str | None = ORIGIN, client: str = CLIENT
    ) -> None:
        error = self.assertRaises(
            TokenError, self.authority.redeem, token, origin=origin, client_address=client
        )
        self.assertEqual(error.reason, reason)


class MintTests(TokenTestCase):
    def test_round_trip(self) -> None:
        """A minted token redeems to its claims."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.clock.advance(5)
        claims = self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT)
        self.assertEqual(claims.user_id, "u1")
        self.assertEqual(claims.origin, ORIGIN)
        self.assertEqual(claims.node, "node-a")
        self.assertEqual(claims.issued_at, 100.0)
        self.assertEqual(claims.expires_at, 160.0)

    def test_format(self) -> None:
        """A token is v1.<base64url claims>.<base64url HMAC-SHA256 of v1.payload>."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        version, payload, _ = token.split(".")
        self.assertEqual(version, "v1")
        self.assertEqual(token, sign(payload))
        claims = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
        self.assertEqual(
            set(claims),
            {"user_id", "node", "origin", "client", "issued_at", "expires_at", "nonce"},
        )
        self.assertNotIn("=", token)

    def test_nonces_differ(self) -> None:
        """Two tokens for the same user and time carry different nonces."""
        first = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        second = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.assertNotEqual(
            self.authority.redeem(first, origin=ORIGIN, client_address=CLIENT).nonce,
            self.authority.redeem(second, origin=ORIGIN, client_address=CLIENT).nonce,
        )

    def test_mint_refuses_overlong_token(self) -> None:
        """Minting a token that could never be redeemed is refused."""
        self.assertRaises(
            ValueError,
            self.authority.mint,
            user_id="u1",
            origin="https://" + "a" * 1000,
            client_address=CLIENT,
        )

    def test_short_secret_refused(self) -> None:
        """An HMAC secret shorter than 16 bytes is refused."""
        self.assertRaises(ValueError, self.make_authority, secret=b"short")

    def test_ttl_must_be_positive(self) -> None:
        """A token lifetime of zero is refused."""
        self.assertRaises(
            ValueError, TokenAuthority, SECRET, node="n", clock=self.clock, ttl=0
        )


class RedeemTests(TokenTestCase):
    def test_replayed(self) -> None:
        """A token can be redeemed only once."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT)
        self.assertRefused(token, REPLAYED)

    def test_expired(self) -> None:
        """A token is refused once its ttl has passed."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.clock.advance(TTL)
        self.assertRefused(token, EXPIRED)

    def test_valid_until_just_before_expiry(self) -> None:
        """A token is accepted until its expiry time."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.clock.advance(TTL - 0.001)
        self.assertEqual(self.authority.redeem(token, origin=ORIGIN,
                                               client_address=CLIENT).user_id, "u1")

    def test_wrong_origin(self) -> None:
        """A token presented from another origin is refused."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.assertRefused(token, WRONG_ORIGIN, origin="https://evil.example")

    def test_wrong_origin_does_not_use_up_the_token(self) -> None:
        """A refused attempt from another origin leaves the token usable."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.assertRefused(token, WRONG_ORIGIN, origin="https://evil.example")
        self.assertEqual(self.authority.redeem(token, origin=ORIGIN,
                                               client_address=CLIENT).user_id, "u1")

    def test_no_origin_refused(self) -> None:
        """A connection that showed no Origin is refused, and the token stays usable."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.assertRefused(token, NO_ORIGIN, origin=None)
        self.assertEqual(
            self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT).user_id, "u1")

    def test_no_origin_allowed_by_operator(self) -> None:
        """With allow_originless, a connection without Origin may redeem a token."""
        authority = TokenAuthority(SECRET, node="node-a", clock=self.clock, ttl=TTL,
                                   allow_originless=True)
        token = authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.assertEqual(authority.redeem(token, origin=None, client_address=CLIENT).origin,
                         ORIGIN)

    def test_wrong_client(self) -> None:
        """A token presented from another address than the one that fetched it is refused."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.assertRefused(token, WRONG_CLIENT, client="198.51.100.1")
        self.assertRefused(token, WRONG_CLIENT, client="")
        self.assertEqual(
            self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT).user_id, "u1")

    def test_token_does_not_show_the_address(self) -> None:
        """The claims hold a keyed hash of the address, not the address."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        payload = token.split(".")[1]
        claims = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        self.assertNotIn(CLIENT.encode(), claims)
        self.assertEqual(json.loads(claims)["client"], client_digest(CLIENT))
        self.assertNotEqual(client_digest(CLIENT, secret=b"t" * 32), client_digest(CLIENT))

    def test_wrong_node(self) -> None:
        """A token minted by another node with the same secret is refused."""
        token = self.make_authority(node="node-b").mint(user_id="u1", origin=ORIGIN,
                                                        client_address=CLIENT)
        self.assertRefused(token, WRONG_NODE)

    def test_other_secret_is_forged(self) -> None:
        """A token signed with another secret is forged."""
        token = self.make_authority(secret=b"t" * 32).mint(user_id="u1", origin=ORIGIN,
                                                           client_address=CLIENT)
        self.assertRefused(token, FORGED)

    def test_changed_claims_are_forged(self) -> None:
        """Changing the claims without re-signing makes the token forged."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        _, _, signature = token.split(".")
        self.assertRefused(f"v1.{claims_payload(user_id='admin')}.{signature}", FORGED)

    def test_changed_signature_is_forged(self) -> None:
        """Changing one character of the signature makes the token forged."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        last = "A" if token[-2] != "A" else "B"
        self.assertRefused(token[:-2] + last + token[-1], FORGED)

    def test_malformed_envelopes(self) -> None:
        """Tokens that are not v1.<base64url>.<base64url> are malformed."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        version, payload, signature = token.split(".")
        for bad in (
            "",
            "v1",
            "v1..",
            f"v2.{payload}.{signature}",
            f"{payload}.{signature}",
            f"{token}.x",
            f"v1.{payload}=.{signature}",
            f"v1.{payload}.{signature}+",
            f"v1.{payload} .{signature}",
        ):
            self.assertRefused(bad, MALFORMED)

    def test_not_a_string(self) -> None:
        """A token that is not text is malformed."""
        self.assertRefused(b"v1.a.b", MALFORMED)  # type: ignore[arg-type]

    def test_overlong_is_malformed_before_anything_else(self) -> None:
        """A token over 1024 characters is malformed, even if correctly signed."""
        payload = claims_payload(user_id="u" * 900)
        token = sign(payload)
        self.assertGreater(len(token), MAX_TOKEN_LENGTH)
        self.assertRefused(token, MALFORMED)

    def test_longest_token_is_accepted(self) -> None:
        """A signed token of (nearly) 1024 characters is not refused for its length."""
        length = 0
        while len(sign(claims_payload(user_id="u" * (length + 1)))) <= MAX_TOKEN_LENGTH:
            length += 1
        token = sign(claims_payload(user_id="u" * length))
        # base64 grows in steps, so exactly 1024 may not be reachable.
        self.assertGreaterEqual(len(token), MAX_TOKEN_LENGTH - 2)
        self.assertEqual(
            self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT).user_id, "u" * length
        )

    def test_signed_garbage_is_malformed(self) -> None:
        """Signed payloads that are not exactly the claims are malformed."""
        for payload in (
            b64(b"not json"),
            b64(b"\xff\xfe"),
            b64(json.dumps(["a"]).encode()),
            b64(json.dumps({"user_id": "u1"}).encode()),
            claims_payload(extra="x"),
            claims_payload(user_id=1),
            claims_payload(expires_at="160"),
            claims_payload(expires_at=True),
            "A",
        ):
            self.assertRefused(sign(payload), MALFORMED)

    def test_check_order(self) -> None:
        """Refusals follow the order: malformed, forged, node, expiry, origin, address, reuse."""
        other_node = self.make_authority(node="node-b")
        # Forged beats wrong node.
        token = other_node.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.assertRefused(token[:-1] + ("A" if token[-1] != "A" else "B"), FORGED)
        # Wrong node beats expired.
        self.clock.advance(TTL)
        self.assertRefused(token, WRONG_NODE)
        # Expired beats wrong origin and replayed.
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT)
        self.clock.advance(TTL)
        self.assertRefused(token, EXPIRED, origin="https://evil.example")
        # Wrong origin beats replayed.
        token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT)
        self.assertRefused(token, WRONG_ORIGIN, origin="https://evil.example")
        self.assertRefused(token, REPLAYED)
        # No origin beats wrong address; wrong origin beats wrong address,
        # which beats replayed.
        self.assertRefused(token, NO_ORIGIN, origin=None, client="198.51.100.1")
        self.assertRefused(token, WRONG_ORIGIN, origin="https://evil.example",
                           client="198.51.100.1")
        self.assertRefused(token, WRONG_CLIENT, client="198.51.100.1")


class NonceMemoryTests(TokenTestCase):
    def test_redeemed_nonces_are_remembered(self) -> None:
        """Each redeemed token's nonce is held while the token is valid."""
        for _ in range(3):
            token = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
            self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT)
        self.assertEqual(self.authority.remembered, 3)

    def test_expired_nonces_are_forgotten(self) -> None:
        """Nonces are forgotten as their tokens expire, oldest first."""
        early = self.authority.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        self.authority.redeem(early, origin=ORIGIN, client_address=CLIENT)
        self.clock.advance(30)
        late = self.authority.mint(user_id="u2", origin=ORIGIN, client_address=CLIENT)
        self.authority.redeem(late, origin=ORIGIN, client_address=CLIENT)
        self.assertEqual(self.authority.remembered, 2)
        self.clock.advance(30)
        self.authority.mint(user_id="u3", origin=ORIGIN, client_address=CLIENT)
        self.assertEqual(self.authority.remembered, 1)
        self.assertRefused(late, REPLAYED)
        self.clock.advance(30)
        self.assertRefused(late, EXPIRED)
        self.assertEqual(self.authority.remembered, 0)

    def test_memory_stays_bounded(self) -> None:
        """Under a steady stream of consoles, remembered nonces stay within one ttl."""
        for _ in range(500):
            token = self.authority.mint(user_id="u", origin=ORIGIN, client_address=CLIENT)
            self.authority.redeem(token, origin=ORIGIN, client_address=CLIENT)
            self.clock.advance(1)
        self.assertEqual(self.authority.remembered, int(TTL))


class TokenErrorTests(SynchronousTestCase):
    def test_messages(self) -> None:
        """Each reason has a clear message about the console token."""
        self.assertEqual(str(TokenError(EXPIRED)), "console token expired")
        for reason in (FORGED, EXPIRED, REPLAYED, WRONG_NODE, MALFORMED, WRONG_ORIGIN):
            self.assertTrue(str(TokenError(reason)).startswith("console token "))

    def test_reason_is_a_field(self) -> None:
        """The reason is kept as a structured field."""
        self.assertEqual(TokenError(REPLAYED).reason, "replayed")
        self.assertEqual(TokenError(WRONG_NODE).reason, "wrong node")

    def test_unknown_reason(self) -> None:
        """An unknown reason is a programming error."""
        self.assertRaises(ValueError, TokenError, "tired")

    def test_claims_frozen(self) -> None:
        """Token claims are an immutable value."""
        claims = TokenClaims(
            user_id="u", node="n", origin=ORIGIN, client="c", issued_at=0, expires_at=1,
            nonce="x",
        )
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            claims.user_id = "v"  # type: ignore[misc]


class UnregisteredUserTests(SynchronousTestCase):
    def test_new_user(self) -> None:
        """A new user gets a random URL-safe id, the clock's time and the address."""
        clock = Clock()
        clock.advance(42)
        user = new_unregistered_user(clock, "192.0.2.7")
        self.assertEqual(user.created_at, 42)
        self.assertEqual(user.client_address, "192.0.2.7")
        self.assertEqual(len(user.user_id), 16)
        self.assertRegex(user.user_id, r"^[A-Za-z0-9_-]+$")

    def test_ids_are_unique(self) -> None:
        """Every new user gets a different id."""
        clock = Clock()
        ids = {new_unregistered_user(clock, "192.0.2.7").user_id for _ in range(100)}
        self.assertEqual(len(ids), 100)

    def test_frozen(self) -> None:
        """An unregistered user is an immutable value."""
        user = UnregisteredUser(user_id="u", created_at=0.0, client_address="::1")
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            user.user_id = "v"  # type: ignore[misc]


class SecretFileTests(SynchronousTestCase):
    """
    The secret lives on disk and its protection is a file mode, so these
    tests use a temporary directory.
    """

    def setUp(self) -> None:
        # Not self.mktemp(): under pytest that lands in the current directory.
        self.directory = tempfile.mkdtemp(prefix="shellserver-test-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "secret")

    def test_created_once(self) -> None:
        """A missing secret is created with 32 random bytes, then reused."""
        secret = load_or_create_secret(self.path)
        self.assertEqual(len(secret), 32)
        self.assertEqual(load_or_create_secret(self.path), secret)
        self.assertNotEqual(secret, b"\0" * 32)

    def test_created_private(self) -> None:
        """A created secret file is mode 0600 and no temporary file is left."""
        load_or_create_secret(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.directory), ["secret"])

    def test_creates_private_directory(self) -> None:
        """A missing parent directory is created mode 0700."""
        path = os.path.join(self.directory, "state", "secret")
        load_or_create_secret(path)
        mode = os.stat(os.path.dirname(path)).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o700)

    def test_existing_secret_read(self) -> None:
        """An existing 0600 secret file is read as it is."""
        with open(self.path, "wb") as file:
            file.write(b"k" * 32)
        os.chmod(self.path, 0o600)
        self.assertEqual(load_or_create_secret(self.path), b"k" * 32)

    def test_group_readable_refused(self) -> None:
        """A secret readable by group or others is refused, naming the file."""
        load_or_create_secret(self.path)
        for mode in (0o640, 0o604, 0o660):
            os.chmod(self.path, mode)
            error = self.assertRaises(SecretFileError, load_or_create_secret, self.path)
            self.assertIn(self.path, str(error))
            self.assertIn("chmod 600", str(error))

    def test_wrong_length_refused(self) -> None:
        """A secret file that is not 32 bytes is refused."""
        with open(self.path, "wb") as file:
            file.write(b"short")
        os.chmod(self.path, 0o600)
        error = self.assertRaises(SecretFileError, load_or_create_secret, self.path)
        self.assertIn("32 bytes", str(error))

    def test_symlink_refused(self) -> None:
        """A secret path that is a symbolic link is refused."""
        target = os.path.join(self.directory, "target")
        with open(target, "wb") as file:
            file.write(b"k" * 32)
        os.chmod(target, 0o600)
        os.symlink(target, self.path)
        self.assertRaises(SecretFileError, load_or_create_secret, self.path)


class UsedTokenFileTests(SynchronousTestCase):
    """
    Single use across restarts rests on a file, so these tests use a
    temporary directory.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="shellserver-test-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "used-tokens")
        self.clock = Clock()
        self.clock.advance(1000)

    def authority(self) -> TokenAuthority:
        used = UsedTokenFile.open(self.path, now=self.clock.seconds())
        self.addCleanup(used.close)
        return TokenAuthority(SECRET, node="node-a", clock=self.clock, ttl=TTL, used=used)

    def test_used_token_stays_used_after_restart(self) -> None:
        """A token redeemed before a restart is refused as replayed after it."""
        first = self.authority()
        token = first.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        unused = first.mint(user_id="u2", origin=ORIGIN, client_address=CLIENT)
        first.redeem(token, origin=ORIGIN, client_address=CLIENT)
        restarted = self.authority()
        error = self.assertRaises(TokenError, restarted.redeem, token, origin=ORIGIN,
                                  client_address=CLIENT)
        self.assertEqual(error.reason, REPLAYED)
        self.assertEqual(
            restarted.redeem(unused, origin=ORIGIN, client_address=CLIENT).user_id, "u2")

    def test_created_private(self) -> None:
        """The file is created mode 0600 and no temporary file is left."""
        self.authority()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.directory), ["used-tokens"])

    def test_expired_entries_dropped_at_start(self) -> None:
        """Entries of expired tokens are dropped when the file is opened."""
        with open(self.path, "w") as file:
            file.write("old 999.0\nfresh 1030.5\n")
        used = UsedTokenFile.open(self.path, now=1000.0)
        self.addCleanup(used.close)
        self.assertEqual(used.loaded, {"fresh": 1030.5})
        with open(self.path) as file:
            self.assertEqual(file.read(), "fresh 1030.5\n")

    def test_damaged_lines_skipped(self) -> None:
        """Lines that are not <nonce> <expiry> (one cut short by a crash) are skipped."""
        with open(self.path, "wb") as file:
            file.write(b"a 2000.0\n\xff\xfe 2000\nb nan\nc 2000 x\nd;rm 2000\n\ne 2000.0")
        used = UsedTokenFile.open(self.path, now=1000.0)
        self.addCleanup(used.close)
        self.assertEqual(used.loaded, {"a": 2000.0})

    def test_compacted_while_running(self) -> None:
        """The file is rewritten once it holds COMPACT_SLACK expired lines."""
        authority = self.authority()
        for _ in range(2 * COMPACT_SLACK):
            token = authority.mint(user_id="u", origin=ORIGIN, client_address=CLIENT)
            authority.redeem(token, origin=ORIGIN, client_address=CLIENT)
            self.clock.advance(1)
        with open(self.path) as file:
            lines = file.read().splitlines()
        self.assertLessEqual(len(lines), int(TTL) + COMPACT_SLACK + 1)
        self.assertLess(len(lines), 2 * COMPACT_SLACK)
        # The tokens still valid are all in it.
        now = self.clock.seconds()
        reopened = UsedTokenFile.open(self.path, now=now)
        self.addCleanup(reopened.close)
        self.assertEqual(len(reopened.loaded), int(TTL) - 1)

    def test_unusable_file(self) -> None:
        """A path that cannot be written is a clear error naming it."""
        path = os.path.join(self.directory, "missing-dir", "used-tokens")
        error = self.assertRaises(UsedTokenFileError, UsedTokenFile.open, path)
        self.assertIn(path, str(error))
