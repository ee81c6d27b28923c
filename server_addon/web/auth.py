"""Who may use the web interface, and which requests may change anything.

With a farm secret, a request must carry it: HTTP Basic auth (any user name, the secret as the
password), `Authorization: Bearer SECRET`, or the session cookie that the login form sets. The
cookie holds an HMAC of a fixed label keyed by the secret, so it proves knowledge of the secret
without being the secret, stays valid across server restarts and dies when the secret changes.

Requests that change state (POST, DELETE) must come from this site's own pages or from a script,
never from another web site: a browser names the page's origin in `Origin` and `Sec-Fetch-Site`,
scripts (curl) send neither. When the interface listens on loopback only, the Host header must
name loopback too, which stops a DNS-rebinding page from reaching it through a name of its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
from collections import Counter
from urllib.parse import urlsplit

from aiohttp import web

from ..core.config import REFUSAL_LOG_INTERVAL_S
from ..core.tally import Tally

log = logging.getLogger(__name__)

SESSION_COOKIE = "microfarm_session"
#: The label whose HMAC under the secret is the session value; a new label logs every browser out.
SESSION_LABEL = b"microfarm web session v1"
SESSION_MAX_AGE_S = 30 * 24 * 3600
#: Wrong credentials wait this long, one at a time farm-wide: guessing the secret stays slow.
FAILED_AUTH_DELAY_S = 0.25
#: Wrong credentials waiting their turn at most from one address (an IPv6 /64), and from all addresses. While an
#: address has its most waiting (or all addresses have theirs), a request from it (from any) that sends the secret
#: is refused at once with 429, its secret not even checked: a flood of guesses gains no guesses (every guess
#: checked waits its turn, so they stay at one per FAILED_AUTH_DELAY_S in all) and holds no connections while it
#: waits, which would keep the web interface's slots from everyone else; and a stranger flooding from one address
#: does not lock out the metrics scraper or a script on another. A session cookie is always checked (an HMAC of 256
#: bits: not worth guessing), so a browser already logged in is never locked out.
MAX_WAITING_GUESSES = 4
MAX_WAITING_GUESSES_ALL = 64
TOO_MANY_GUESSES = "too many wrong credentials at once; try again in a moment"
#: Sent by the page's own scripts: their 401s must not open the browser's Basic-auth prompt.
PAGE_HEADER = "X-Requested-With"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


class Auth:
    def __init__(self, secret: str | None) -> None:
        self.secret = secret or None
        self._failures = asyncio.Lock()
        self._waiting: Counter[str] = Counter()  # address -> its wrong credentials waiting for their turn
        # Refused requests (wrong credentials, cross-site): a stranger can send them at any rate, so they are
        # logged as counted lines, their text cleaned and cut (see core.tally).
        self.refusals = Tally(log, "{reason} from {address}", "{count} more from {address} in the last {seconds} s: "
                              "{reason}", REFUSAL_LOG_INTERVAL_S)

    @property
    def required(self) -> bool:
        return self.secret is not None

    @property
    def session_value(self) -> str:
        assert self.secret is not None
        return hmac.new(self.secret.encode(), SESSION_LABEL, hashlib.sha256).hexdigest()

    def check_secret(self, candidate: str, address: str | None) -> bool:
        """Whether `candidate`, sent from `address`, is the secret; refused unchecked (TooManyGuesses) while too many
        wrong guesses wait (see MAX_WAITING_GUESSES)."""
        assert self.secret is not None
        self._admit(address)
        return hmac.compare_digest(candidate.encode(), self.secret.encode())

    def _admit(self, address: str | None) -> str:
        """The address's key in the waiting line, if it may be heard now; else TooManyGuesses."""
        key = _address_key(address)
        if self._waiting[key] >= MAX_WAITING_GUESSES or self._waiting.total() >= MAX_WAITING_GUESSES_ALL:
            raise TooManyGuesses(TOO_MANY_GUESSES)
        return key

    def credentials(self, request: web.Request) -> bool | None:
        """True: the right credentials; False: wrong ones; None: none given."""
        if self.secret is None:
            return True
        header = request.headers.get("Authorization")
        if header:
            scheme, _, value = header.partition(" ")
            scheme = scheme.lower()
            if scheme == "bearer":
                return self.check_secret(value.strip(), request.remote)
            if scheme == "basic":
                try:
                    decoded = base64.b64decode(value.strip(), validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    return False
                return self.check_secret(decoded.partition(":")[2], request.remote)
            return False
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie is not None:
            return hmac.compare_digest(cookie.encode(), self.session_value.encode())
        return None

    async def refuse_slowly(self, address: str | None) -> None:
        """Hold a wrong guess from `address` for a moment; guesses queue behind each other, as many as
        MAX_WAITING_GUESSES allows (the others are refused at once: TooManyGuesses)."""
        key = self._admit(address)
        self._waiting[key] += 1
        try:
            async with self._failures:
                await asyncio.sleep(FAILED_AUTH_DELAY_S)
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    def set_session(self, response: web.StreamResponse) -> None:
        response.set_cookie(SESSION_COOKIE, self.session_value, max_age=SESSION_MAX_AGE_S, path="/",
                            httponly=True, samesite="Strict")

    @staticmethod
    def clear_session(response: web.StreamResponse) -> None:
        response.del_cookie(SESSION_COOKIE, path="/")


def _address_key(address: str | None) -> str:
    """Whose guesses these are: the address; for IPv6 its /64 (one host often holds a whole /64)."""
    try:
        parsed = ipaddress.ip_address(address or "")
    except ValueError:
        return address or ""
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class TooManyGuesses(Exception):
    """Too many wrong credentials wait already: answer 429 with TOO_MANY_GUESSES and RETRY_AFTER."""


RETRY_AFTER = {"Retry-After": "1"}


def cross_site_reason(request: web.Request) -> str | None:
    """Why a state-changing request must be refused as cross-site, or None when it may go on."""
    if request.method not in UNSAFE_METHODS:
        return None
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"a {site} request may not change the farm"
    origin = request.headers.get("Origin")
    if origin is not None:
        netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
        if not netloc or netloc != request.host.lower():
            return f"a request from {origin} may not change the farm"
    return None


def is_loopback_host(host: str) -> bool:
    """Is `host` (a host or host:port, IPv6 in brackets) a name or address of this machine's loopback?"""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
