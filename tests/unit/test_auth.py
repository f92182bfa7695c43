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
    EXPIRED,
    FORGED,
    MALFORMED,
    MAX_TOKEN_LENGTH,
    REPLAYED,
    WRONG_NODE,
    WRONG_ORIGIN,
    SecretFileError,
    TokenAuthority,
    TokenClaims,
    TokenError,
    UnregisteredUser,
    load_or_create_secret,
    new_unregistered_user,
)

SECRET = b"s" * 32
ORIGIN = "https://console.example.org"
TTL = 60.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(payload: str, secret: bytes = SECRET) -> str:
    """A token for ``payload`` signed the documented way, independently of auth."""
    mac = hmac.new(secret, f"v1.{payload}".encode(), hashlib.sha256).digest()
    return f"v1.{payload}.{b64(mac)}"


def claims_payload(**changes: object) -> str:
    claims = {
        "user_id": "u1",
        "node": "node-a",
        "origin": ORIGIN,
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
        self, token: str, reason: str, origin: str | None = ORIGIN
    ) -> None:
        error = self.assertRaises(
            TokenError, self.authority.redeem, token, origin=origin
        )
        self.assertEqual(error.reason, reason)


class MintTests(TokenTestCase):
    def test_round_trip(self) -> None:
        """A minted token redeems to its claims."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.clock.advance(5)
        claims = self.authority.redeem(token, origin=ORIGIN)
        self.assertEqual(claims.user_id, "u1")
        self.assertEqual(claims.origin, ORIGIN)
        self.assertEqual(claims.node, "node-a")
        self.assertEqual(claims.issued_at, 100.0)
        self.assertEqual(claims.expires_at, 160.0)

    def test_format(self) -> None:
        """A token is v1.<base64url claims>.<base64url HMAC-SHA256 of v1.payload>."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        version, payload, _ = token.split(".")
        self.assertEqual(version, "v1")
        self.assertEqual(token, sign(payload))
        claims = json.loads(
            base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        )
        self.assertEqual(
            set(claims),
            {"user_id", "node", "origin", "issued_at", "expires_at", "nonce"},
        )
        self.assertNotIn("=", token)

    def test_nonces_differ(self) -> None:
        """Two tokens for the same user and time carry different nonces."""
        first = self.authority.mint(user_id="u1", origin=ORIGIN)
        second = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.assertNotEqual(
            self.authority.redeem(first, origin=ORIGIN).nonce,
            self.authority.redeem(second, origin=ORIGIN).nonce,
        )

    def test_mint_refuses_overlong_token(self) -> None:
        """Minting a token that could never be redeemed is refused."""
        self.assertRaises(
            ValueError,
            self.authority.mint,
            user_id="u1",
            origin="https://" + "a" * 1000,
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
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.authority.redeem(token, origin=ORIGIN)
        self.assertRefused(token, REPLAYED)

    def test_expired(self) -> None:
        """A token is refused once its ttl has passed."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.clock.advance(TTL)
        self.assertRefused(token, EXPIRED)

    def test_valid_until_just_before_expiry(self) -> None:
        """A token is accepted until its expiry time."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.clock.advance(TTL - 0.001)
        self.assertEqual(self.authority.redeem(token, origin=ORIGIN).user_id, "u1")

    def test_wrong_origin(self) -> None:
        """A token presented from another origin is refused."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.assertRefused(token, WRONG_ORIGIN, origin="https://evil.example")

    def test_wrong_origin_does_not_use_up_the_token(self) -> None:
        """A refused attempt from another origin leaves the token usable."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.assertRefused(token, WRONG_ORIGIN, origin="https://evil.example")
        self.assertEqual(self.authority.redeem(token, origin=ORIGIN).user_id, "u1")

    def test_no_origin_skips_the_check(self) -> None:
        """Without an origin to compare, the origin check is skipped."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.assertEqual(self.authority.redeem(token, origin=None).origin, ORIGIN)

    def test_wrong_node(self) -> None:
        """A token minted by another node with the same secret is refused."""
        token = self.make_authority(node="node-b").mint(user_id="u1", origin=ORIGIN)
        self.assertRefused(token, WRONG_NODE)

    def test_other_secret_is_forged(self) -> None:
        """A token signed with another secret is forged."""
        token = self.make_authority(secret=b"t" * 32).mint(user_id="u1", origin=ORIGIN)
        self.assertRefused(token, FORGED)

    def test_changed_claims_are_forged(self) -> None:
        """Changing the claims without re-signing makes the token forged."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        _, _, signature = token.split(".")
        self.assertRefused(f"v1.{claims_payload(user_id='admin')}.{signature}", FORGED)

    def test_changed_signature_is_forged(self) -> None:
        """Changing one character of the signature makes the token forged."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        last = "A" if token[-2] != "A" else "B"
        self.assertRefused(token[:-2] + last + token[-1], FORGED)

    def test_malformed_envelopes(self) -> None:
        """Tokens that are not v1.<base64url>.<base64url> are malformed."""
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
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
            self.authority.redeem(token, origin=ORIGIN).user_id, "u" * length
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
        """Refusals follow the order: malformed, forged, node, expiry, origin, reuse."""
        other_node = self.make_authority(node="node-b")
        # Forged beats wrong node.
        token = other_node.mint(user_id="u1", origin=ORIGIN)
        self.assertRefused(token[:-1] + ("A" if token[-1] != "A" else "B"), FORGED)
        # Wrong node beats expired.
        self.clock.advance(TTL)
        self.assertRefused(token, WRONG_NODE)
        # Expired beats wrong origin and replayed.
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.authority.redeem(token, origin=ORIGIN)
        self.clock.advance(TTL)
        self.assertRefused(token, EXPIRED, origin="https://evil.example")
        # Wrong origin beats replayed.
        token = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.authority.redeem(token, origin=ORIGIN)
        self.assertRefused(token, WRONG_ORIGIN, origin="https://evil.example")
        self.assertRefused(token, REPLAYED)


class NonceMemoryTests(TokenTestCase):
    def test_redeemed_nonces_are_remembered(self) -> None:
        """Each redeemed token's nonce is held while the token is valid."""
        for _ in range(3):
            self.authority.redeem(
                self.authority.mint(user_id="u1", origin=ORIGIN), origin=ORIGIN
            )
        self.assertEqual(self.authority.remembered, 3)

    def test_expired_nonces_are_forgotten(self) -> None:
        """Nonces are forgotten as their tokens expire, oldest first."""
        early = self.authority.mint(user_id="u1", origin=ORIGIN)
        self.authority.redeem(early, origin=ORIGIN)
        self.clock.advance(30)
        late = self.authority.mint(user_id="u2", origin=ORIGIN)
        self.authority.redeem(late, origin=ORIGIN)
        self.assertEqual(self.authority.remembered, 2)
        self.clock.advance(30)
        self.authority.mint(user_id="u3", origin=ORIGIN)
        self.assertEqual(self.authority.remembered, 1)
        self.assertRefused(late, REPLAYED)
        self.clock.advance(30)
        self.assertRefused(late, EXPIRED)
        self.assertEqual(self.authority.remembered, 0)

    def test_memory_stays_bounded(self) -> None:
        """Under a steady stream of consoles, remembered nonces stay within one ttl."""
        for _ in range(500):
            token = self.authority.mint(user_id="u", origin=ORIGIN)
            self.authority.redeem(token, origin=ORIGIN)
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
            user_id="u", node="n", origin=ORIGIN, issued_at=0, expires_at=1, nonce="x"
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
