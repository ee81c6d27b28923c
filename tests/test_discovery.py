"""Discovery over zeroconf: servers advertise the farm, clients find it by themselves.

Zeroconf here is bound to 127.0.0.1 only (never multicast on other interfaces). Other farms may
be advertised on this machine's loopback at the same time (other test runs, `make demo`), so every
farm here has a unique name and clients are pointed at theirs with --farm.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LOOPBACK, Clients, Farm, RogueServer, connected, repo_env, submit
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from protocol.discovery import SERVICE_TYPE, Browser, advertised_addresses, find_farm, interface_addresses
from protocol.errors import DiscoveryError
from protocol.limits import PROTOCOL_VERSION
from tools.localfarm import REPO, start_server

pytestmark = pytest.mark.integration

#: Every wait on the network in these tests ends within this time.
WAIT_S = 30.0
#: How long a browser is given to see nothing, where nothing is what a test expects.
ABSENT_S = 2.0
MDNS_GROUP = "224.0.0.251"


def _loopback_multicast_problem() -> str | None:
    """Why multicast cannot travel over the loopback here, or None when it can (as zeroconf needs)."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind(("", 0))
        port = receiver.getsockname()[1]
        try:
            receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                socket.inet_aton(MDNS_GROUP) + socket.inet_aton(LOOPBACK))
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("b", 1))
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sender.sendto(b"microfarm", (MDNS_GROUP, port))
            receiver.settimeout(ABSENT_S)
            receiver.recvfrom(64)
        except OSError as exc:
            flags = Path("/sys/class/net/lo/flags")
            hint = f" (lo flags {flags.read_text().strip()}; IFF_MULTICAST is 0x1000)" if flags.exists() else ""
            return f"multicast over 127.0.0.1 does not work on this machine: {exc}{hint}"
    return None


@pytest.fixture(scope="module", autouse=True)
def loopback_multicast() -> None:
    problem = _loopback_multicast_problem()
    if problem:
        pytest.skip(problem)


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def advertised_farm(output: Path, name: str, **options: object) -> Iterator[Farm]:
    farm = Farm(output, name=name, discovery=True, **options)  # type: ignore[arg-type]
    try:
        yield farm
    finally:
        farm.stop()


def discover(*extra: str) -> tuple[str, ...]:
    """Client options: find the farm by discovery, on loopback only."""
    return ("--interface", LOOPBACK, *extra)


def frames(farm: Farm, job_id: str) -> list[str]:
    return sorted(p.name for p in (farm.output / job_id).glob("frame_*.png"))


# --- choosing addresses and interfaces (no network) --------------------------------------------

def test_advertised_addresses() -> None:
    assert advertised_addresses("192.0.2.7", None) == ["192.0.2.7"]
    assert advertised_addresses("0.0.0.0", [LOOPBACK]) == [LOOPBACK]
    assert LOOPBACK not in advertised_addresses("0.0.0.0", None), "other machines cannot reach 127.0.0.1"


def test_interface_addresses() -> None:
    assert interface_addresses([LOOPBACK, LOOPBACK]) == [LOOPBACK]
    if "lo" in {name for _, name in socket.if_nameindex()}:
        assert interface_addresses(["lo"]) == [LOOPBACK]
    with pytest.raises(DiscoveryError, match="not an address of this machine"):
        interface_addresses(["198.51.100.254"])
    with pytest.raises(DiscoveryError, match="neither"):
        interface_addresses(["no-such-if0"])


def test_client_option_errors() -> None:
    def client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "client", *args], cwd=REPO, env=repo_env(),
                              capture_output=True, text=True, timeout=60)

    result = client("--no-discovery")
    assert result.returncode == 2 and "--server HOST:PORT is required" in result.stderr, result.stderr
    result = client("--server", "127.0.0.1:9", "--farm", "x")
    assert result.returncode == 2 and "leave out --server" in result.stderr, result.stderr
    result = client("--interface", "198.51.100.254")
    assert result.returncode == 2 and "not an address of this machine" in result.stderr, result.stderr


# --- the server side ---------------------------------------------------------------------------

def test_advertised_properties(tmp_path: Path) -> None:
    secured, open_ = unique("secured"), unique("open")
    with advertised_farm(tmp_path / "a", secured, secret="s3cret") as a, advertised_farm(tmp_path / "b", open_) as b:
        found = find_farm(secured, [LOOPBACK], timeout=WAIT_S)
        assert found is not None, f"farm {secured!r} not found"
        assert found.properties == {"v": str(PROTOCOL_VERSION), "farm": secured, "auth": "1"}
        assert (found.addresses, found.port, found.auth_required) == ((LOOPBACK,), a.port, True)

        found = find_farm(open_, [LOOPBACK], timeout=WAIT_S)
        assert found is not None, f"farm {open_!r} not found"
        assert found.properties == {"v": str(PROTOCOL_VERSION), "farm": open_, "auth": "0"}
        assert (found.addresses, found.port, found.auth_required) == ((LOOPBACK,), b.port, False)


def test_stop_withdraws_the_service(tmp_path: Path) -> None:
    threads_before = set(threading.enumerate())
    name = unique("stopping")
    instance = f"{name}.{SERVICE_TYPE}"
    seen = {ServiceStateChange.Added: threading.Event(), ServiceStateChange.Removed: threading.Event()}

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == instance and state_change in seen:
            seen[state_change].set()

    farm = Farm(tmp_path / "out", name=name, discovery=True)
    try:
        with Zeroconf(interfaces=[LOOPBACK]) as zc:
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
            try:
                assert seen[ServiceStateChange.Added].wait(WAIT_S), "the farm was never advertised"
                farm.stop()
                assert seen[ServiceStateChange.Removed].wait(WAIT_S), "no goodbye after stop()"
            finally:
                browser.cancel()
    finally:
        farm.stop()
    assert find_farm(name, [LOOPBACK], timeout=ABSENT_S) is None, "a fresh browser still finds the stopped farm"
    left = [t.name for t in threading.enumerate() if t not in threads_before]
    assert left == [], f"threads left behind: {left}"


def test_headless_server_advertises_until_it_stops(tmp_path: Path) -> None:
    name = unique("headless")
    proc, port = start_server(tmp_path / "out", tmp_path / "server.log", token="s3cret", extra=("--farm-name", name))
    try:
        found = find_farm(name, [LOOPBACK], timeout=WAIT_S)
        assert found is not None, (tmp_path / "server.log").read_text()
        assert (found.addresses, found.port, found.properties["auth"]) == ((LOOPBACK,), port, "1")
    finally:
        proc.terminate()
        assert proc.wait(timeout=WAIT_S) == 0
    assert find_farm(name, [LOOPBACK], timeout=ABSENT_S) is None, "the stopped server is still advertised"


def test_headless_server_option_errors(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "server_addon", "--port", "0", "--output-dir", str(tmp_path),
                             "--interface", "no-such-if0"], cwd=REPO, env=repo_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--interface" in result.stderr, result.stderr


# --- choosing among farms ----------------------------------------------------------------------

def test_without_a_name_the_first_farm_by_name_is_chosen(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="protocol.discovery")
    tag = uuid.uuid4().hex[:8]
    alpha, beta = f"alpha-{tag}", f"beta-{tag}"
    with advertised_farm(tmp_path / "a", alpha), advertised_farm(tmp_path / "b", beta):
        for name in (alpha, beta):  # both advertised before the browsing starts
            assert find_farm(name, [LOOPBACK], timeout=WAIT_S) is not None, f"farm {name!r} not found"
        with Browser(None, [LOOPBACK]) as browser:
            chosen = browser.resolve(WAIT_S)
            seen = [f.farm for f in browser.farms()]
    assert chosen is not None and {alpha, beta} <= set(seen)
    # Other farms may be on this loopback too; the choice is the first by name of all seen.
    assert chosen.farm == min(seen)
    message = next(r.getMessage() for r in caplog.records if "the first by name" in r.getMessage())
    assert all(name in message for name in seen)


def test_other_protocol_versions_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="protocol.discovery")
    name = unique("future")
    info = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=9, parsed_addresses=[LOOPBACK],
                       properties={"v": "999", "farm": name, "auth": "0"}, server=f"{name}.local.")
    with Zeroconf(interfaces=[LOOPBACK]) as zc:
        zc.register_service(info)
        with Browser(name, [LOOPBACK]) as browser:
            assert browser.resolve(ABSENT_S) is None
    assert any(f"protocol version 999; this client speaks {PROTOCOL_VERSION}" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


# --- real clients ------------------------------------------------------------------------------

def test_client_finds_the_farm_and_renders(tmp_path: Path, clients: Clients, animation: Path) -> None:
    name = unique("found")
    with advertised_farm(tmp_path / "out", name) as farm:
        clients.start("finder", None, *discover("--farm", name))
        farm.wait_until(connected(1), what="the client to find the farm")
        result = submit(farm, animation, "--frames", "1-2")
        assert result.returncode == 0, result.stderr
        assert frames(farm, result.stdout.strip()) == ["frame_0001.png", "frame_0002.png"]
    assert f"found farm '{name}' at 127.0.0.1:{farm.port}" in clients.log("finder")


def test_client_finds_the_farm_again_after_a_restart(tmp_path: Path, clients: Clients, animation: Path) -> None:
    name, output = unique("restarted"), tmp_path / "out"
    with advertised_farm(output, name) as first:
        clients.start("rover", None, *discover("--farm", name))
        first.wait_until(connected(1), what="the client to find the first server")
        old_port = first.port

    with advertised_farm(output, name) as second:
        assert second.port != old_port
        second.wait_until(connected(1), what="the client to find the restarted server")
        result = submit(second, animation, "--frames", "3-4")
        assert result.returncode == 0, result.stderr
        assert frames(second, result.stdout.strip()) == ["frame_0003.png", "frame_0004.png"]
    log = clients.log("rover")
    assert f"127.0.0.1:{old_port}" in log and f"127.0.0.1:{second.port}" in log


def test_farm_option_picks_the_named_farm(tmp_path: Path, clients: Clients) -> None:
    tag = uuid.uuid4().hex[:8]
    alpha, beta = f"alpha-{tag}", f"beta-{tag}"  # without --farm, alpha would come first
    with advertised_farm(tmp_path / "a", alpha) as a, advertised_farm(tmp_path / "b", beta) as b:
        assert find_farm(alpha, [LOOPBACK], timeout=WAIT_S) is not None, "alpha is advertised"
        clients.start("picky", None, *discover("--farm", beta))
        b.wait_until(connected(1), what="the client on the farm it named")
        assert a.call(lambda s: len(s.farm.clients)) == 0


def test_clients_skip_a_rogue_farm_of_the_same_name(tmp_path: Path, clients: Clients) -> None:
    """A rogue advertises the farm's name first, as `NAME-2` (how zeroconf renames a second service of a name;
    it sorts before `NAME`); the real farm comes later. Every client meets the rogue once, never picks it
    again, and joins the real farm."""
    name, secret = unique("studio"), "studio-secret"
    with RogueServer("proof") as liar, Zeroconf(interfaces=[LOOPBACK]) as zc:
        zc.register_service(ServiceInfo(SERVICE_TYPE, f"{name}-2.{SERVICE_TYPE}", port=liar.port,
                                        parsed_addresses=[LOOPBACK], server=f"rogue-{name}.local.",
                                        properties={"v": str(PROTOCOL_VERSION), "farm": name, "auth": "1"}))
        names = [f"c{i}" for i in range(3)]
        for client in names:
            clients.start(client, None, *discover("--farm", name, "--token", secret))
        liar.wait_for(len(names), timeout=WAIT_S)
        with advertised_farm(tmp_path / "out", name, secret=secret) as farm:
            farm.wait_until(connected(len(names)), what="every client to join the real farm")
            assert liar.connections == len(names), "a client went back to the rogue farm"
    for client in names:
        log = clients.log(client)
        assert clients.procs[client].poll() is None, log
        assert log.count(f"server 127.0.0.1:{liar.port} could not prove it knows the farm secret") == 1, log
        assert f"connected to farm {name!r} at 127.0.0.1:{farm.port}" in log, log


def test_a_refused_farm_is_never_chosen_again() -> None:
    """Of two services with one farm name, the refused one (which sorts first) is passed over for good."""
    name = unique("twins")
    infos = [ServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}", port=port, parsed_addresses=[LOOPBACK],
                         properties={"v": str(PROTOCOL_VERSION), "farm": name, "auth": "1"},
                         server=f"{instance}.local.")
             for instance, port in ((f"{name}-2", 9), (name, 10))]
    with Zeroconf(interfaces=[LOOPBACK]) as zc:
        for info in infos:
            zc.register_service(info)
        with Browser(name, [LOOPBACK]) as browser:
            deadline = time.monotonic() + WAIT_S
            while len([f for f in browser.farms() if f.farm == name]) < 2:  # both seen: the order is by name
                assert time.monotonic() < deadline, "the two services were not both seen"
                with browser._changed:  # woken by the next service seen
                    browser._changed.wait(0.5)
            assert browser.target() == (LOOPBACK, 9), "the first by name"
            browser.refuse(LOOPBACK, 9, "could not prove it knows the farm secret")
            assert {browser.target() for _ in range(5)} == {(LOOPBACK, 10)}
