"""
Console tokens: short-lived, single-use, HMAC-signed permissions to open one
console, minted when the console page is served and redeemed by the first
message on the SockJS connection.

A token is ``v1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret,
"v1." + payload))>`` (base64url without padding). It is bound to the node,
the page's origin and the client address that fetched the page (kept as a
keyed hash, so the token does not show the address); redeemed tokens are
remembered until they expire, on disk too, so single use survives a restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import os
import re
import secrets
import stat
import time
from typing import Any

import attrs
from attrs import field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

MAX_TOKEN_LENGTH = 1024
# scheme://host:port with a host of at most 255 characters (the site refuses
# longer Host headers); anything longer or not printable ASCII is refused
# before minting, with a clear error, rather than a token that cannot be.
MAX_ORIGIN_LENGTH = 300
_ORIGIN_TEXT = re.compile(rf"[\x21-\x7e]{{1,{MAX_ORIGIN_LENGTH}}}")
SECRET_LENGTH = 32
# A shorter HMAC key would make forging tokens easier than it has to be.
MIN_SECRET_LENGTH = 16

_VERSION = "v1"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")

FORGED = "forged"
EXPIRED = "expired"
REPLAYED = "replayed"
WRONG_NODE = "wrong node"
MALFORMED = "malformed"
WRONG_ORIGIN = "wrong origin"
NO_ORIGIN = "no origin"
WRONG_CLIENT = "wrong client"

_MESSAGES = {
    FORGED: "console token has an invalid signature",
    EXPIRED: "console token expired",
    REPLAYED: "console token was already used",
    WRONG_NODE: "console token is for another node",
    MALFORMED: "console token is malformed",
    WRONG_ORIGIN: "console token was issued for another origin",
    NO_ORIGIN: "console token needs the Origin of its page, and this connection "
    "sent none",
    WRONG_CLIENT: "console token was issued to another address",
}


@attrs.define(auto_exc=True)
class TokenError(Exception):
    """
    A console token was refused. ``reason`` is one of L{FORGED},
    L{EXPIRED}, L{REPLAYED}, L{WRONG_NODE}, L{MALFORMED}, L{WRONG_ORIGIN}.
    """

    reason: str = field(validator=attrs.validators.in_(_MESSAGES))

    def __str__(self) -> str:
        return _MESSAGES[self.reason]


@frozen(kw_only=True)
class TokenClaims:
    """What a console token says: who may open a console, where, until when.

    ``client`` is a keyed hash of the address that fetched the page (see
    L{TokenAuthority.client_digest}), not the address itself.
    """

    user_id: str
    node: str
    origin: str
    client: str
    issued_at: float
    expires_at: float
    nonce: str

    def to_json(self) -> bytes:
        return json.dumps(
            attrs.asdict(self), sort_keys=True, separators=(",", ":")
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> TokenClaims:
        """Parse claims; raise ValueError for anything but exactly our fields."""
        document = json.loads(data)
        names = [a.name for a in attrs.fields(cls)]
        if not isinstance(document, dict) or sorted(document) != sorted(names):
            raise ValueError("not the claims object")
        for name in ("user_id", "node", "origin", "client", "nonce"):
            if not isinstance(document[name], str):
                raise ValueError(f"{name} is not a string")
        for name in ("issued_at", "expires_at"):
            value = document[name]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{name} is not a number")
        return cls(**document)


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@attrs.define
class TokenAuthority:
    """
    Mints console tokens and redeems each at most once.

    Redeemed nonces are remembered until their token expires (after which the
    expiry check refuses the token anyway) and then forgotten, so memory is
    bounded by the tokens redeemed within one C{ttl}. With C{used}, they are
    also written to a file and read back at start-up, so a token used before
    a restart stays used.

    @ivar allow_originless: whether a token may be redeemed on a connection
        that showed no Origin at all (C{console.allow_originless}).
    """

    _secret: bytes = field(repr=False)
    _node: str = field(kw_only=True)
    _clock: IReactorTime = field(kw_only=True, repr=False)
    _ttl: float = field(kw_only=True)
    allow_originless: bool = field(kw_only=True, default=False)
    _used: UsedTokenFile | None = field(kw_only=True, default=None, repr=False)
    _redeemed: dict[str, float] = field(init=False, factory=dict, repr=False)
    _expiries: list[tuple[float, str]] = field(init=False, factory=list, repr=False)

    @_secret.validator
    def _check_secret(self, attribute: Any, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"the token secret must be at least {MIN_SECRET_LENGTH} bytes"
            )

    @_ttl.validator
    def _check_ttl(self, attribute: Any, value: float) -> None:
        if not value > 0:
            raise ValueError(f"the token ttl must be positive, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self._used is not None:
            for nonce, expires_at in self._used.loaded.items():
                self._remember(nonce, expires_at)

    def _signature(self, payload: str) -> str:
        message = f"{_VERSION}.{payload}".encode("ascii")
        return _encode(hmac.new(self._secret, message, hashlib.sha256).digest())

    def client_digest(self, client_address: str) -> str:
        """
        What a token holds of the client's address: keyed, so that neither
        the token's holder nor a log that shows it learns the address, and
        nobody can find it by hashing every IPv4 address.
        """
        message = b"client address\0" + client_address.encode("utf-8", "replace")
        return _encode(hmac.new(self._secret, message, hashlib.sha256).digest()[:16])

    def _remember(self, nonce: str, expires_at: float) -> None:
        self._redeemed[nonce] = expires_at
        heapq.heappush(self._expiries, (expires_at, nonce))

    def _forget_expired(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, nonce = heapq.heappop(self._expiries)
            del self._redeemed[nonce]
        if self._used is not None:
            self._used.compact(self._redeemed)

    def mint(self, *, user_id: str, origin: str, client_address: str,
             node: str | None = None) -> str:
        """
        A token letting ``user_id`` open one console from a page on
        ``origin``, from ``client_address`` (the address that fetched it),
        on ``node`` (this node unless a cluster placed it elsewhere).

        @raise ValueError: ``origin`` is empty, not printable ASCII, or longer
            than L{MAX_ORIGIN_LENGTH}.
        """
        if not _ORIGIN_TEXT.fullmatch(origin):
            raise ValueError(
                f"an origin must be 1 to {MAX_ORIGIN_LENGTH} printable ASCII characters, "
                f"got {len(origin)} characters starting {origin[:40]!r}"
            )
        now = self._clock.seconds()
        self._forget_expired(now)
        claims = TokenClaims(
            user_id=user_id,
            node=node or self._node,
            origin=origin,
            client=self.client_digest(client_address),
            issued_at=now,
            expires_at=now + self._ttl,
            nonce=secrets.token_urlsafe(16),
        )
        payload = _encode(claims.to_json())
        token = f"{_VERSION}.{payload}.{self._signature(payload)}"
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError(
                f"a token for this user and origin would be {len(token)} characters, "
                f"more than {MAX_TOKEN_LENGTH}"
            )
        return token

    def redeem(self, token: str, *, origin: str | None, client_address: str) -> TokenClaims:
        """
        Check ``token`` and use it up.

        @param origin: the Origin the connection presenting it showed,
            compared with the page's origin in the token; None (no Origin
            at all) is refused unless C{allow_originless}.
        @param client_address: the address of the connection presenting
            it, which must be the one that fetched the page.
        @raise TokenError: in this order of checks: L{MALFORMED}, L{FORGED},
            L{WRONG_NODE}, L{EXPIRED}, L{NO_ORIGIN}, L{WRONG_ORIGIN},
            L{WRONG_CLIENT}, L{REPLAYED}.
        """
        now = self._clock.seconds()
        self._forget_expired(now)
        # Bound the work an attacker can cause before anything is decoded.
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise TokenError(MALFORMED)
        parts = token.split(".")
        if (
            len(parts) != 3
            or parts[0] != _VERSION
            or not _BASE64URL.fullmatch(parts[1])
            or not _BASE64URL.fullmatch(parts[2])
        ):
            raise TokenError(MALFORMED)
        _, payload, signature = parts
        # Comparing the encoded forms also refuses other spellings of the
        # same signature bytes.
        if not hmac.compare_digest(self._signature(payload), signature):
            raise TokenError(FORGED)
        try:
            claims = TokenClaims.from_json(_decode(payload))
        except (ValueError, TypeError, binascii.Error):
            raise TokenError(MALFORMED) from None
        if claims.node != self._node:
            raise TokenError(WRONG_NODE)
        if now >= claims.expires_at:
            raise TokenError(EXPIRED)
        if origin is None:
            if not self.allow_originless:
                raise TokenError(NO_ORIGIN)
        elif origin != claims.origin:
            raise TokenError(WRONG_ORIGIN)
        if not hmac.compare_digest(self.client_digest(client_address), claims.client):
            raise TokenError(WRONG_CLIENT)
        if claims.nonce in self._redeemed:
            raise TokenError(REPLAYED)
        self._remember(claims.nonce, claims.expires_at)
        if self._used is not None:
            self._used.record(claims.nonce, claims.expires_at)
        return claims

    @property
    def remembered(self) -> int:
        """How many redeemed nonces are held (for metrics and tests)."""
        return len(self._redeemed)


@attrs.define(auto_exc=True, kw_only=True)
class UsedTokenFileError(Exception):
    """The file of used console tokens cannot be used."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"used console tokens file {self.path}: {self.message}"


_NONCE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Rewrite the used-token file once it holds this many lines more than the
# tokens still valid: it stays within a few ttl's worth of console starts.
COMPACT_SLACK = 1024


@attrs.define
class UsedTokenFile:
    """
    The nonces of redeemed tokens, appended to a file as ``<nonce>
    <expires_at>`` lines, so that single use survives a restart.

    Each redemption is one small unbuffered append (a write into the page
    cache, microseconds): it survives the server's restart and even SIGKILL,
    though not a crash of the machine itself within C{token_ttl}, since it is
    not fsync'd (that would stall the reactor on the disk for every console).
    The file is compacted to the tokens still valid at start-up and whenever
    it holds C{COMPACT_SLACK} expired lines.

    @ivar loaded: the nonces still valid when the file was opened, with
        their expiry.
    """

    path: str
    loaded: dict[str, float]
    _descriptor: int = field(repr=False)
    _lines: int

    @classmethod
    def open(cls, path: str | os.PathLike[str], now: float | None = None) -> UsedTokenFile:
        """
        Read ``path`` (mode 0600, created if missing), keep the entries not
        expired at ``now`` (default: the time now) and rewrite it with them.
        Unparsable lines (one cut short by a crash) are skipped.

        @raise UsedTokenFileError: it cannot be read or written.
        """
        name = os.fspath(path)
        now = time.time() if now is None else now
        loaded: dict[str, float] = {}
        try:
            try:
                descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
            else:
                with os.fdopen(descriptor, "rb") as file:
                    for line in file:
                        entry = _parse_used(line)
                        if entry is not None and entry[1] > now:
                            loaded[entry[0]] = entry[1]
            used = cls(path=name, loaded=loaded, descriptor=-1, lines=0)
            used.rewrite(loaded)
        except OSError as error:
            raise UsedTokenFileError(path=name, message=error.strerror or str(error)) from None
        return used

    def compact(self, valid: dict[str, float]) -> None:
        """Rewrite the file with the ``valid`` entries once it holds
        C{COMPACT_SLACK} lines more; a failure is logged and tried again
        C{COMPACT_SLACK} lines later (appending to the old file stays correct)."""
        if self._lines <= len(valid) + COMPACT_SLACK:
            return
        try:
            self.rewrite(valid)
        except OSError as error:
            log.error("used console tokens {path}: cannot compact ({error})",
                      path=self.path, error=error)
            self._lines = len(valid)

    def record(self, nonce: str, expires_at: float) -> None:
        """Append one redeemed nonce; a failure is logged, not raised (the
        nonce is still remembered in memory)."""
        try:
            os.write(self._descriptor, f"{nonce} {expires_at!r}\n".encode("ascii"))
        except OSError as error:
            log.error("used console tokens {path}: cannot record one ({error}); it "
                      "could be used again after a restart", path=self.path, error=error)
            return
        self._lines += 1

    def rewrite(self, entries: dict[str, float]) -> None:
        """Replace the file with ``entries`` (atomically: a new file renamed
        over the old) and append to the new one from now on."""
        temporary = f"{self.path}.{secrets.token_hex(8)}.tmp"
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            data = "".join(f"{nonce} {expires!r}\n" for nonce, expires in entries.items())
            os.write(descriptor, data.encode("ascii"))
            os.replace(temporary, self.path)
        except BaseException:
            os.close(descriptor)
            os.unlink(temporary)
            raise
        os.close(descriptor)
        appending = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if self._descriptor >= 0:
            os.close(self._descriptor)
        self._descriptor = appending
        self._lines = len(entries)

    def close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1


def _parse_used(line: bytes) -> tuple[str, float] | None:
    parts = line.split()
    if len(parts) != 2 or not line.endswith(b"\n"):
        return None
    try:
        nonce, expires_at = parts[0].decode("ascii"), float(parts[1])
    except (UnicodeDecodeError, ValueError):
        return None
    if not _NONCE.fullmatch(nonce) or expires_at != expires_at:  # NaN
        return None
    return nonce, expires_at


@attrs.define(auto_exc=True, kw_only=True)
class SecretFileError(Exception):
    """The token secret file cannot be used."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"token secret file {self.path}: {self.message}"


def _read_secret(path: str) -> bytes:
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SecretFileError(path=path, message="is not a regular file")
        if mode & 0o077:
            raise SecretFileError(
                path=path,
                message=f"is accessible by group or others (mode "
                f"{stat.S_IMODE(mode):04o}); it must be 0600 (chmod 600 {path})",
            )
        secret = file.read(SECRET_LENGTH + 1)
    if len(secret) != SECRET_LENGTH:
        raise SecretFileError(
            path=path,
            message=f"must hold exactly {SECRET_LENGTH} bytes, has {len(secret)}",
        )
    return secret


def load_or_create_secret(path: str | os.PathLike[str]) -> bytes:
    """
    The 32-byte token secret at ``path``, created (mode 0600, its directory
    0700 if missing) on first use.

    @raise SecretFileError: the file is readable by group or others, is not
        32 bytes, or cannot be read or written.
    """
    name = os.fspath(path)
    try:
        try:
            return _read_secret(name)
        except FileNotFoundError:
            pass
        directory = os.path.dirname(os.path.abspath(name))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        temporary = f"{name}.{secrets.token_hex(8)}.tmp"
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(secrets.token_bytes(SECRET_LENGTH))
                file.flush()
                os.fsync(file.fileno())
            # link, unlike rename, never replaces a secret that another
            # process created meanwhile: the loser reads the winner's.
            try:
                os.link(temporary, name)
            except FileExistsError:
                pass
        finally:
            os.unlink(temporary)
        return _read_secret(name)
    except SecretFileError:
        raise
    except OSError as error:
        raise SecretFileError(path=name, message=error.strerror or str(error)) from None


@frozen(kw_only=True)
class UnregisteredUser:
    """A throwaway identity, created when a console page is served."""

    user_id: str
    created_at: float
    client_address: str
    host_origin: str = ""  # the page that embeds the console, when known


def new_unregistered_user(
    clock: IReactorTime, client_address: str, host_origin: str = ""
) -> UnregisteredUser:
    """A fresh unregistered user with a random, unguessable id."""
    return UnregisteredUser(
        user_id=secrets.token_urlsafe(12),
        created_at=clock.seconds(),
        client_address=client_address,
        host_origin=host_origin,
    )
