"""Hosts simulated on one machine with Linux network namespaces, so a deployment crosses real interfaces.

On loopback the SuperLink, the SuperNodes and `flwr` share one interface and one address, so a
deployment there cannot show that it works across hosts: that the SuperLink listens on an address the
others can reach, that its certificate names that address, that nothing quietly dials 127.0.0.1. A
network namespace is a network stack of its own (its own loopback, interfaces, addresses and routes):
`Network` makes one per simulated host, joins them with veth pairs to a bridge, gives each an address
from a private /24 that no route of this machine uses, and deletes it all on exit, exceptions included.

Nothing is added to the caller's own namespace: the bridge lives in a namespace of its own, and each
veth pair is made directly between two of ours, so deleting the namespaces deletes every device.
A process joins a namespace with `ip netns exec NAME`, which execs the program in place: its pid stays
the one `subprocess.Popen` returned, so it is still stopped by pid (`Place.command`).

Linux only; needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root) and iproute2's `ip`. Whether they are there is
found by trying: `Network` raises `NetnsUnavailable`, with the reason, when it cannot make a namespace.
If the process that made a Network is killed, `ip netns list | grep fedapp-` shows what to delete.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from fedapp.deploy.processes import HOST

T = TypeVar("T")
PREFIX = "fedapp-"  # every namespace made here is named fedapp-<tag>-<name>
DEVICE = "veth0"  # each namespace's end of its veth pair (device names are per namespace)
BRIDGE = "br0"
CLONE_NEWNET = 0x40000000


def ip_binary() -> str | None:
    """iproute2's `ip`: on PATH, or in the sbin directories a non-login root shell may lack."""
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")


class NetnsUnavailable(RuntimeError):
    """This machine cannot make a network namespace or veth pair here (not root, no `ip`, no veth)."""


@dataclass(frozen=True)
class Place:
    """Where a process runs: a network namespace (None: the caller's own) and its address there.

    The SuperLink listens on its place's address; a SuperNode's own API stays on its place's loopback.
    """

    netns: str | None = None
    address: str = HOST

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in this place: `ip netns exec` joins the namespace and execs, keeping the pid."""
        if self.netns is None:
            return list(argv)
        if (ip := ip_binary()) is None:
            raise NetnsUnavailable(f"no `ip` binary (iproute2) to run {argv[0]} in namespace {self.netns}")
        return [ip, "netns", "exec", self.netns, *argv]

    def socket(self) -> socket.socket:
        """A TCP socket of this place's namespace: a socket stays in the namespace it was made in."""
        if self.netns is None:
            return socket.socket()
        return in_netns(self.netns, socket.socket)


@dataclass(frozen=True)
class Placement:
    """Where each process of a deployment runs; the default puts all of them on this machine's loopback."""

    superlink: Place = Place()
    supernodes: tuple[Place, ...] = ()  # SuperNode i runs at supernodes[i], on loopback past its end
    flwr: Place = Place()  # `flwr run`, `flwr supernode register/list`: a place that reaches the SuperLink

    def supernode(self, i: int) -> Place:
        return self.supernodes[i] if i < len(self.supernodes) else Place()


def in_netns(netns: str, make: Callable[[], T]) -> T:
    """`make()` on a thread that joined `netns`: setns(2) moves the calling thread only, and it ends here."""
    result: list[T] = []
    failure: list[BaseException] = []

    def join_and_make() -> None:
        try:
            with open(f"/run/netns/{netns}", "rb") as handle:
                if hasattr(os, "setns"):  # Python 3.12+
                    os.setns(handle.fileno(), CLONE_NEWNET)
                else:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                        errno = ctypes.get_errno()
                        raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
            result.append(make())
        except BaseException as err:  # handed to the caller's thread below
            failure.append(err)

    thread = threading.Thread(target=join_and_make, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _ip(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    if (ip := ip_binary()) is None:
        raise NetnsUnavailable("no `ip` binary (iproute2) on PATH, /usr/sbin or /sbin")
    return subprocess.run([ip, *args], capture_output=True, text=True, timeout=timeout, check=False)


def _check(done: subprocess.CompletedProcess[str], what: str,
           error: type[RuntimeError] = RuntimeError) -> None:
    if done.returncode != 0:
        raise error(f"{what}: `{' '.join(done.args[1:])}` failed: {(done.stderr or done.stdout).strip()}")


def _pids(netns: str) -> list[int]:
    done = _ip("netns", "pids", netns)
    return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []


def namespaces() -> list[str]:
    """The names `ip netns list` shows (it adds "(id: N)" to some)."""
    done = _ip("netns", "list")
    _check(done, "listing network namespaces")
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def free_subnet(attempts: int = 200) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no route or address of this machine's own namespace."""
    used: list[ipaddress.IPv4Network] = []
    for args in (("-4", "-j", "route", "show", "table", "all"), ("-4", "-j", "addr", "show")):
        done = _ip(*args)
        _check(done, "reading this machine's routes and addresses")
        for entry in json.loads(done.stdout or "[]"):
            prefixes = [entry.get("dst", "")] + [f"{a['local']}/{a['prefixlen']}"
                                                 for a in entry.get("addr_info", [])]
            for prefix in prefixes:
                with suppress(ValueError):  # "default", "broadcast" entries and the like
                    used.append(ipaddress.IPv4Network(prefix, strict=False))
    for _ in range(attempts):
        candidate = ipaddress.IPv4Network(f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise RuntimeError(f"no 10.x.y.0/24 free of this machine's routes in {attempts} random tries")


class Network:
    """Context manager: one namespace per name, each with one address of a /24, all on one bridge.

    `place(name)` says where to run a process and what address it has; `counters(name)` reads the bytes
    its interface received and sent, which only traffic between namespaces can raise.
    """

    def __init__(self, names: Sequence[str], subnet: str | None = None, tag: str | None = None) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"namespace names must be distinct and at least one, got {list(names)}")
        if bad := [name for name in names if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,20}", name)]:
            raise ValueError(f"namespace names must be short, lowercase, digits and '-': {bad}")
        self.tag = tag or secrets.token_hex(3)
        self.names = list(names)
        self.switch = f"{PREFIX}{self.tag}-switch"
        self.netns = {name: f"{PREFIX}{self.tag}-{name}" for name in names}
        self._subnet = ipaddress.IPv4Network(subnet) if subnet else None
        self.addresses: dict[str, str] = {}
        self.made: list[str] = []  # namespaces that exist, in the order made

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        if self._subnet is None:
            raise RuntimeError("the network has no subnet before it is entered")
        return self._subnet

    def __enter__(self) -> Network:
        try:
            if ip_binary() is None:
                raise NetnsUnavailable("no `ip` binary (iproute2) on PATH, /usr/sbin or /sbin")
            self._subnet = self._subnet or free_subnet()
            hosts = self.subnet.hosts()
            self.addresses = {name: str(next(hosts)) for name in self.names}
            self._add_netns(self.switch)
            _check(_ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge"), "making the bridge",
                   NetnsUnavailable)
            _check(_ip("-n", self.switch, "link", "set", BRIDGE, "up"), "bringing the bridge up")
            for i, name in enumerate(self.names):
                netns, port = self.netns[name], f"port{i}"
                self._add_netns(netns)
                _check(_ip("link", "add", DEVICE, "netns", netns, "type", "veth", "peer", "name", port,
                           "netns", self.switch), f"making {name}'s veth pair", NetnsUnavailable)
                _check(_ip("-n", self.switch, "link", "set", port, "master", BRIDGE, "up"),
                       f"putting {name}'s veth on the bridge")
                _check(_ip("-n", netns, "addr", "add", f"{self.addresses[name]}/{self.subnet.prefixlen}",
                           "dev", DEVICE), f"giving {name} its address")
                _check(_ip("-n", netns, "link", "set", DEVICE, "up"), f"bringing {name}'s veth up")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def _add_netns(self, netns: str) -> None:
        done = _ip("netns", "add", netns)
        if done.returncode == 0:
            self.made.append(netns)
        _check(done, f"cannot make network namespace {netns}", NetnsUnavailable)
        _check(_ip("-n", netns, "link", "set", "lo", "up"), f"bringing up lo in {netns}")

    def place(self, name: str) -> Place:
        return Place(self.netns[name], self.addresses[name])

    def counters(self, name: str) -> tuple[int, int]:
        """(received, sent) bytes of `name`'s veth since it was made."""
        done = _ip("-n", self.netns[name], "-s", "-j", "link", "show", "dev", DEVICE)
        _check(done, f"reading {name}'s interface counters")
        (stats,) = [entry["stats64"] for entry in json.loads(done.stdout)]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def pids(self, name: str) -> list[int]:
        """The processes in `name`'s namespace now: after a deployment is stopped, there should be none."""
        return _pids(self.netns[name])

    def remove(self) -> None:
        """Every namespace made, and with it its veth ends and the bridge; safe to call twice.

        A process left inside one (our namespaces hold only what was started in them) is killed by
        pid first, since a namespace, and its devices, outlive `ip netns del` while a process uses it.
        """
        failures = []
        for netns in reversed(self.made):
            for pid in _pids(netns):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            done = _ip("netns", "del", netns)
            if done.returncode != 0:
                failures.append(f"{netns}: {done.stderr.strip()}")
        self.made.clear()
        if failures:
            raise RuntimeError(f"could not delete network namespaces: {'; '.join(failures)}")
