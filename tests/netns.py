"""Test hosts: network namespaces joined to this machine by veth pairs, so that one test runs a service on several
machines' worth of network stacks and can lose one of them as a machine is lost.

    async with Network.create() as net:            # pytest.skip, saying why, where namespaces cannot be made
        api = await net.host("api-1")
        db = await net.forward(api, 5432)          # api-1 reaches 127.0.0.1:5432 at f"{api.gateway}:{db.port}"
        server = await api.start("apiops", "serve", env={"APIOPS_HOST": api.ip, ...})
        ...                                        # this machine reaches the server at api.ip
        await api.lose()                           # its link down, then every process in it SIGKILLed

Each host is a network namespace with a hostname of its own (a UTS namespace per process started, so a worker's
id names its host) and one veth pair on a /30: `gateway` is this machine's end, `ip` the host's. Its only route
is that link, so it reaches nothing but this machine's `gateway` address: PostgreSQL and Redis, which listen on
127.0.0.1, are offered there by a `TcpProxy` per host and service (`forward`), whose `cut()` partitions that one
host from that one service. `cut()` on a host takes its link down: packets are dropped, nobody is told (no FIN, no
RST), as when a machine's cable is pulled. The /30s come from one 10.231.X.0/24 that no interface of this machine
uses; names carry this process's id, so runs side by side do not meet, and the namespaces of a run that was killed
are removed by the next one. Everything a network made is removed when its block ends, however it ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from tests.proxy import TcpProxy

PREFIX = "aot"  # namespaces aot<run>-<n>, this machine's ends of the links aot<run>h<n> (15 characters at most)
BLOCK = ipaddress.IPv4Network("10.231.0.0/16")
COMMAND_TIMEOUT_S = 10.0
_runs = itertools.count()


class IpCommandFailed(Exception):
    pass


async def ip(*args: str) -> str:
    """`ip ARGS...`; its output, or IpCommandFailed with what it said."""
    process = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(COMMAND_TIMEOUT_S):
        out, err = await process.communicate()
    if process.returncode != 0:
        raise IpCommandFailed(f"ip {' '.join(args)}: {err.decode().strip() or f'exit status {process.returncode}'}")
    return out.decode()


async def why_not() -> str | None:
    """Why network namespaces cannot be made here, or None if they can (tried, not guessed)."""
    if os.geteuid() != 0:
        return "test hosts (network namespaces) need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"test hosts need the `{tool}` command (iproute2, util-linux)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        await ip("netns", "add", probe)
    except IpCommandFailed as exc:
        return f"cannot make a network namespace (no CAP_NET_ADMIN?): {exc}"
    await ip("netns", "del", probe)
    return None


@dataclass
class Host:
    name: str  # also its hostname
    namespace: str
    link: str  # this machine's end of the veth pair
    gateway: str  # this machine's address on the link
    ip: str  # the host's address
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    killed: bool = False  # by `kill`: its processes' ends were meant

    async def start(self, *command: str, env: Mapping[str, str]) -> asyncio.subprocess.Process:
        """`command` in the host, with `env` as its whole environment; its output goes to the test's capture."""
        process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.namespace,
            # A UTS namespace of its own, named after the host; each `exec` keeps the process id.
            "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *command,
            env=dict(env),
        )  # fmt: skip
        self.processes.append(process)
        return process

    async def pids(self) -> list[int]:
        """Every process in the host's network namespace, started by `start` or not."""
        return [int(pid) for pid in (await ip("netns", "pids", self.namespace)).split()]

    async def cut(self) -> None:
        """The link down: the host and this machine stop hearing each other, and nobody is told."""
        await ip("link", "set", self.link, "down")

    async def restore(self) -> None:
        await ip("link", "set", self.link, "up")

    async def kill(self) -> None:
        """SIGKILL every process in the host; returns once those it started have exited."""
        self.killed = True
        _kill(await self.pids())
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            await asyncio.gather(*(process.wait() for process in self.processes))

    async def lose(self) -> None:
        """As a machine is lost: off the network first (so its dying sockets tell nobody), then every process
        killed."""
        await self.cut()
        await self.kill()

    async def remove(self) -> None:
        await self.kill()
        # Deleting this end deletes the pair. Not left to the namespace's end: sockets that were closing when the
        # link went down keep a namespace alive (unnamed, and its end of the pair with it) until they time out.
        if await _exists(self.link):
            await ip("link", "del", self.link)
        await ip("netns", "del", self.namespace)


class Network:
    """The test hosts of one test, on the /24 `subnet`."""

    def __init__(self, run: str, subnet: ipaddress.IPv4Network) -> None:
        self.run = run
        self.subnet = subnet
        self.hosts: list[Host] = []
        self.proxies: list[TcpProxy] = []

    @classmethod
    @asynccontextmanager
    async def create(cls) -> AsyncIterator[Network]:
        reason = await why_not()
        if reason is not None:
            pytest.skip(reason)
        await _remove_leftovers()
        # <run>: this process's id and a letter, for a second network in one process
        network = cls(f"{os.getpid()}{chr(ord('a') + next(_runs) % 26)}", await _free_subnet())
        try:
            yield network
        finally:
            await network._remove()

    async def host(self, name: str) -> Host:
        """A new host on a link of its own, up, with loopback up too."""
        n = len(self.hosts)
        link, inside = f"{PREFIX}{self.run}h{n}", f"{PREFIX}{self.run}n{n}"
        gateway, address = self.subnet[4 * n + 1], self.subnet[4 * n + 2]
        host = Host(name, f"{PREFIX}{self.run}-{n}", link, str(gateway), str(address))
        await ip("netns", "add", host.namespace)
        self.hosts.append(host)  # from here on, removed at the end whatever happens next
        await ip("link", "add", link, "type", "veth", "peer", "name", inside, "netns", host.namespace)
        await ip("addr", "add", f"{gateway}/30", "dev", link)
        await ip("link", "set", link, "up")
        await ip("-n", host.namespace, "addr", "add", f"{address}/30", "dev", inside)
        await ip("-n", host.namespace, "link", "set", inside, "up")
        await ip("-n", host.namespace, "link", "set", "lo", "up")
        return host

    async def forward(self, host: Host, port: int, upstream_host: str = "127.0.0.1") -> TcpProxy:
        """`upstream_host:port` offered to `host` at `host.gateway` on the returned proxy's port."""
        proxy = TcpProxy(0, upstream_host, port, host=host.gateway)
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    async def _remove(self) -> None:
        errors = []
        for host in self.hosts:
            try:
                await host.remove()
            except (IpCommandFailed, TimeoutError) as exc:
                errors.append(f"{host.name}: {exc}")
        for proxy in self.proxies:
            await proxy.cut()
        if errors:
            raise RuntimeError("test hosts not removed: " + "; ".join(errors))


async def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of BLOCK on which no interface of this machine has an address, tried from one this process's id picks."""
    used = {ipaddress.ip_interface(a).ip for a in re.findall(r"inet (\S+)", await ip("-4", "-o", "addr", "show"))}
    subnets = list(BLOCK.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(address in subnet for address in used):
            return subnet
    raise RuntimeError(f"no free /24 left in {BLOCK} for test hosts")


async def _remove_leftovers() -> None:
    """The namespaces and links of test runs whose process is gone (killed before it could clean up)."""
    for line in (await ip("netns", "list")).splitlines():
        name = line.split()[0] if line.strip() else ""
        found = re.fullmatch(rf"{PREFIX}(\d+)[a-z]-\d+", name)
        if found is None or _alive(int(found[1])):
            continue
        _kill([int(pid) for pid in (await ip("netns", "pids", name)).split()])
        await ip("netns", "del", name)
    for link in re.findall(rf"^\d+: ({PREFIX}(\d+)[a-z]h\d+)[@:]", await ip("-o", "link", "show"), re.MULTILINE):
        if not _alive(int(link[1])):
            await ip("link", "del", link[0])


async def _exists(link: str) -> bool:
    try:
        await ip("link", "show", "dev", link)
    except IpCommandFailed:
        return False
    return True


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
