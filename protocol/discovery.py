"""Finding a farm on the LAN: servers advertise `_microfarm._tcp.local.` over zeroconf (mDNS/DNS-SD)
and render clients browse for it.

The TXT record carries the protocol version (`v`), the farm's name (`farm`) and whether the farm
wants its secret (`auth`, 1 or 0). What a browser learns is a hint, never trust: the handshake
still checks the version and, with a secret, that the server knows it (a LAN can hold a rogue
server that advertises itself too).

The server side (Advertiser) runs on the server's own event loop and starts no thread; the client
side (Browser) owns a Zeroconf instance with its own threads, so it is a context manager and
always closes them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import ifaddr
from zeroconf import Error as ZeroconfError
from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncZeroconf

from .errors import DiscoveryError
from .limits import PROTOCOL_VERSION
from .names import clean_name

log = logging.getLogger(__name__)

SERVICE_TYPE = "_microfarm._tcp.local."

#: How long one look-up waits for a farm to answer before its caller backs off and asks again.
DISCOVERY_WAIT_S = 5.0
#: Without a farm name, farms seen within this time after browsing starts are all candidates, so
#: that the choice among several does not depend on which one answered first.
SETTLE_S = 1.5
#: Resolving one advertised service (SRV, TXT, addresses); normally answered from the cache.
RESOLVE_TIMEOUT_MS = 2000
#: DNS limits: one label of a name, one string of a TXT record.
MAX_LABEL_BYTES = 63
MAX_TXT_BYTES = 255

_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


@dataclass(frozen=True)
class FarmService:
    """A farm seen on the LAN that speaks this protocol version."""

    name: str  # the mDNS instance name, unique on the LAN
    farm: str
    port: int
    addresses: tuple[str, ...]
    auth_required: bool
    properties: dict[str, str | None]

    @property
    def host(self) -> str:
        return self.addresses[0]


class _Skip(Exception):
    """An advertised service that this client cannot use; the text says why."""


# --- addresses and names ---------------------------------------------------------------------

def _local_addresses() -> list[str]:
    """This machine's addresses, leaving out IPv6 link-local ones (unusable without a scope)."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4:
                found.append(str(ip.ip))
            elif not ipaddress.ip_address(ip.ip[0]).is_link_local:
                found.append(str(ip.ip[0]))
    return found


def interface_addresses(specs: Sequence[str]) -> list[str]:
    """Each spec is an address of this machine or an interface name (`lo`, `eth0`: its IPv4 addresses)."""
    local = _local_addresses()
    chosen: list[str] = []
    for spec in specs:
        try:
            address = str(ipaddress.ip_address(spec))
        except ValueError:
            named = [ip.ip for adapter in ifaddr.get_adapters() if spec in (adapter.name, adapter.nice_name)
                     for ip in adapter.ips if ip.is_IPv4]
            if not named:
                raise DiscoveryError(f"{spec!r} is neither an address of this machine nor an interface with an "
                                     "IPv4 address") from None
            chosen.extend(str(ip) for ip in named)
        else:
            if address not in local:
                raise DiscoveryError(f"{address} is not an address of this machine")
            chosen.append(address)
    return list(dict.fromkeys(chosen))


def advertised_addresses(host: str, interfaces: Sequence[str] | None) -> list[str]:
    """Where clients can reach a server listening on `host`: that address itself, or for a wildcard
    the addresses of the chosen interfaces (all but loopback when none are chosen)."""
    if host not in _WILDCARD_HOSTS:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        try:
            return [socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]]
        except OSError as exc:
            raise DiscoveryError(f"cannot resolve the server's host {host!r}: {exc}") from exc
    candidates = list(interfaces) if interfaces else [a for a in _local_addresses()
                                                      if not ipaddress.ip_address(a).is_loopback]
    if host == "0.0.0.0":
        candidates = [a for a in candidates if ipaddress.ip_address(a).version == 4]
    return candidates or ["127.0.0.1"]


def _truncate(text: str, limit_bytes: int) -> str:
    return text.encode()[:limit_bytes].decode(errors="ignore")


def _label(text: str) -> str:
    """A DNS label from free text: printable, no dots, at most 63 bytes."""
    clean = "".join(ch if ch.isprintable() and ch != "." else "-" for ch in text).strip()
    return _truncate(clean or "microfarm", MAX_LABEL_BYTES)


def service_properties(farm: str, auth_required: bool) -> dict[str, str]:
    return {"v": str(PROTOCOL_VERSION), "farm": _truncate(farm, MAX_TXT_BYTES - len("farm=")),
            "auth": "1" if auth_required else "0"}


def _zeroconf_interfaces(addresses: Sequence[str] | None) -> Any:
    return list(addresses) if addresses else InterfaceChoice.All


# --- the server side -------------------------------------------------------------------------

class Advertiser:
    """Advertises one farm on the server's running event loop; close() withdraws it (goodbye packets)."""

    def __init__(self, farm: str, port: int, host: str = "0.0.0.0", auth_required: bool = False,
                 interfaces: Sequence[str] | None = None) -> None:
        chosen = interface_addresses(interfaces) if interfaces else None
        self.addresses = advertised_addresses(host, chosen)
        if chosen is None and host not in _WILDCARD_HOSTS:
            # A server bound to one address is reachable through that interface only: answer there.
            chosen = self.addresses
        self.interfaces = chosen
        self.farm = farm
        self.port = port
        self.properties = service_properties(farm, auth_required)
        self.name: str | None = None  # the instance name once registered (renamed if another farm had it)
        self._zc: AsyncZeroconf | None = None
        self._announcing: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        host_label = _label(f"microfarm-{self.port}-{socket.gethostname().split('.')[0]}")
        info = ServiceInfo(SERVICE_TYPE, f"{_label(self.farm)}.{SERVICE_TYPE}", port=self.port,
                           properties=self.properties, parsed_addresses=self.addresses, server=f"{host_label}.local.")
        try:
            self._zc = AsyncZeroconf(interfaces=_zeroconf_interfaces(self.interfaces))
            self._announcing = asyncio.ensure_future(
                await self._zc.async_register_service(info, allow_name_change=True))
        except (OSError, RuntimeError, ZeroconfError) as exc:  # RuntimeError: no usable interface
            await self.close()
            raise DiscoveryError(f"cannot advertise farm {self.farm!r} over zeroconf: {exc}") from exc
        self.name = info.name
        log.info("farm %r advertised as %r at %s port %d (interfaces: %s)", self.farm, info.name,
                 ", ".join(self.addresses), self.port, ", ".join(self.interfaces or ["all"]))

    async def close(self) -> None:
        zc, self._zc = self._zc, None
        if self._announcing is not None:
            # Announcements still going out after the goodbyes would bring the service back.
            self._announcing.cancel()
            await asyncio.gather(self._announcing, return_exceptions=True)
            self._announcing = None
        if zc is not None:
            await zc.async_close()  # sends the goodbyes, then closes the sockets
        if self.name is not None:
            log.info("farm %r no longer advertised", self.farm)
            self.name = None

    async def __aenter__(self) -> Advertiser:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


# --- the client side -------------------------------------------------------------------------

def _parse(info: ServiceInfo) -> FarmService:
    props = info.decoded_properties
    try:
        version = int(props.get("v") or "")
    except ValueError:
        raise _Skip("it advertises no protocol version") from None
    if version != PROTOCOL_VERSION:
        raise _Skip(f"it speaks protocol version {version}; this client speaks {PROTOCOL_VERSION}")
    addresses = (*info.parsed_scoped_addresses(IPVersion.V4Only), *info.parsed_scoped_addresses(IPVersion.V6Only))
    if not addresses or not info.port:
        raise _Skip("it advertises no address")
    instance = info.name.removesuffix("." + SERVICE_TYPE)
    farm = clean_name(props.get("farm") or instance)
    return FarmService(name=info.name, farm=farm, port=info.port, addresses=addresses,
                       auth_required=props.get("auth") == "1", properties=props)


class Browser:
    """Watches the LAN for farms; with `farm` only the farm of that name is wanted."""

    def __init__(self, farm: str | None = None, interfaces: Sequence[str] | None = None) -> None:
        self.farm = farm
        self.interfaces = interface_addresses(interfaces) if interfaces else None
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._names: set[str] = set()
        self._version = 0
        self._changed = threading.Condition()
        self._closed = False
        self._started = 0.0
        self._skipped: set[tuple[str, str]] = set()
        self._chosen: tuple[str, int, tuple[str, ...]] | None = None
        self._attempts = 0
        self._current: FarmService | None = None  # what target() gave last
        # Services that failed the handshake (the secret, the version): never chosen again by this browser.
        # A rogue can take the farm's name (zeroconf renames it `studio-2`) and sort first; it must not win.
        self._refused: set[tuple[str, int, tuple[str, ...]]] = set()

    def start(self) -> Browser:
        try:
            self._zc = Zeroconf(interfaces=_zeroconf_interfaces(self.interfaces))
            self._started = time.monotonic()
            self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        except (OSError, RuntimeError, ZeroconfError) as exc:  # RuntimeError: no usable interface
            self.close()
            raise DiscoveryError(f"cannot browse for farms over zeroconf: {exc}") from exc
        return self

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        browser, self._browser = self._browser, None
        zc, self._zc = self._zc, None
        if browser is not None:
            browser.cancel()
        if zc is not None:
            zc.close()

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        with self._changed:
            if state_change is ServiceStateChange.Removed:
                self._names.discard(name)
            else:
                self._names.add(name)
            self._version += 1
            self._changed.notify_all()

    def farms(self) -> list[FarmService]:
        """Farms seen now that speak this protocol version, by farm name (then instance name)."""
        with self._changed:
            names = sorted(self._names)
        found = []
        for name in names:
            zc = self._zc
            try:
                info = zc.get_service_info(SERVICE_TYPE, name, RESOLVE_TIMEOUT_MS) if zc is not None else None
            except (ZeroconfError, RuntimeError) as exc:  # closed under us
                log.debug("cannot resolve %r: %s", name, exc)
                info = None
            if info is None:
                continue
            try:
                found.append(_parse(info))
            except _Skip as exc:
                if (name, str(exc)) not in self._skipped:
                    self._skipped.add((name, str(exc)))
                    log.warning("skipping the service %r on the network: %s", name, exc)
        return sorted(found, key=lambda f: (f.farm, f.name))

    def resolve(self, timeout: float = DISCOVERY_WAIT_S) -> FarmService | None:
        """The wanted farm, waiting up to `timeout` for it to appear; None if it did not."""
        deadline = time.monotonic() + timeout
        settle_until = self._started + SETTLE_S
        while True:
            with self._changed:
                version, closed = self._version, self._closed
            if closed:
                return None
            farms = [f for f in self.farms() if _key(f) not in self._refused]
            matching = [f for f in farms if self.farm is None or f.farm == self.farm]
            now = time.monotonic()
            if matching and (self.farm is not None or now >= settle_until):
                return self._choose(matching, farms)
            if now >= deadline:
                if self.farm is not None and farms:
                    log.info("farm %r not found; farms seen: %s", self.farm, ", ".join(f.farm for f in farms))
                return None
            wake = min(deadline, settle_until) if matching else deadline
            with self._changed:
                if self._version == version and not self._closed:
                    self._changed.wait(max(0.0, wake - now))

    def target(self) -> tuple[str, int] | None:
        """A connect target for the client's link, looked up anew on every call. A farm with several
        addresses is tried at each of them in turn, as some may not be reachable from here."""
        found = self.resolve()
        if found is None:
            return None
        address = found.addresses[self._attempts % len(found.addresses)]
        self._attempts += 1
        self._current = found
        return address, found.port

    def refuse(self, host: str, port: int, reason: str) -> None:
        """The server at host:port failed the handshake (the farm secret, the protocol version): the service
        that gave that address is never chosen again, and the other farms of that name are tried."""
        found = self._current
        if found is None or found.port != port or host not in found.addresses:
            return
        if _key(found) not in self._refused:
            self._refused.add(_key(found))
            log.debug("not using the service %r (%s at port %d) again: %s", found.name,
                      ", ".join(found.addresses), port, reason)

    def _choose(self, matching: list[FarmService], farms: list[FarmService]) -> FarmService:
        chosen = matching[0]
        key = _key(chosen)
        if key != self._chosen:  # said again when the farm moves (a restart on another port)
            self._chosen = key
            others = [f.farm for f in farms if f is not chosen]
            if self.farm is None and others:
                log.info("found %d farms; using %r at %s:%d, the first by name (others: %s; choose with --farm NAME)",
                         len(farms), chosen.farm, chosen.host, chosen.port, ", ".join(others))
            else:
                log.info("found farm %r at %s:%d", chosen.farm, chosen.host, chosen.port)
        return chosen


def _key(found: FarmService) -> tuple[str, int, tuple[str, ...]]:
    """One advertised service: its instance name and where it says it is."""
    return found.name, found.port, found.addresses


def find_farm(farm: str | None = None, interfaces: Sequence[str] | None = None,
              timeout: float = DISCOVERY_WAIT_S) -> FarmService | None:
    """Browse once: the farm named `farm` (or the first by name of those seen), or None."""
    with Browser(farm, interfaces) as browser:
        return browser.resolve(timeout)
