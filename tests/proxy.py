"""A loopback TCP proxy that fails the way networks fail, for whoever connects through it and nobody else.

    proxy = TcpProxy(free_port(), "127.0.0.1", 5432)
    await proxy.start()
    await proxy.turn(Cut.BLACKHOLE)   # or: await proxy.cut() / await proxy.restore()

`Cut.PASS` forwards. `Cut.REFUSE` resets every connection and refuses new ones (a peer that is down). `Cut.BLACKHOLE`
keeps every connection open and accepts new ones, but forwards nothing: what is sent is silently dropped and no
answer ever comes (a partition behind a stateful firewall). `Cut.TRICKLE` forwards everything, `trickle_bytes_per_s`
at a time (a saturated or lossy link). Back to PASS, the connections that lost bytes are reset, as TCP would once
its retransmissions gave up; a trickle lost none, so its connections stay.
"""

from __future__ import annotations

import asyncio
from enum import Enum


class Cut(Enum):
    PASS = "pass"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    TRICKLE = "trickle"


class TcpProxy:
    def __init__(
        self, port: int, upstream_host: str, upstream_port: int, trickle_bytes_per_s: int = 20, host: str = "127.0.0.1"
    ) -> None:
        """Listens on `host:port` (port 0: a free one, kept from then on)."""
        self.host = host
        self.port = port
        self.upstream = (upstream_host, upstream_port)
        self.mode = Cut.PASS
        self.trickle_bytes_per_s = trickle_bytes_per_s
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._lossy: set[asyncio.StreamWriter] = set()  # connections that dropped bytes
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def turn(self, mode: Cut) -> None:
        self.mode = mode
        if mode is Cut.REFUSE:
            await self._close_server()
            self._reset(set(self._writers))
            return
        if mode is Cut.PASS:
            self._reset(set(self._lossy))
        if self._server is None:
            await self.start()

    async def cut(self) -> None:
        await self.turn(Cut.REFUSE)

    async def restore(self) -> None:
        await self.turn(Cut.PASS)

    async def close(self) -> None:
        """Reset every connection, and wait for their pipes to end (a trickle ends at its next write)."""
        await self.turn(Cut.REFUSE)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _reset(self, writers: set[asyncio.StreamWriter]) -> None:
        for writer in writers:
            writer.transport.abort()
            self._writers.discard(writer)
            self._lossy.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            if self.mode is Cut.BLACKHOLE:  # accepted, then silence: the upstream is never reached
                self._lossy.add(writer)
                while await reader.read(65536):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.close()
                return
            self._writers.add(up_writer)
            pair = {writer, up_writer}
            await asyncio.gather(self._pipe(reader, up_writer, pair), self._pipe(up_reader, writer, pair))
        finally:
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: set[asyncio.StreamWriter]
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode is Cut.BLACKHOLE:
                    self._lossy |= pair  # the other side will never see these bytes
                    continue
                if self.mode is Cut.TRICKLE:
                    for at in range(0, len(data), step := max(1, self.trickle_bytes_per_s // 10)):
                        if writer.is_closing():
                            return
                        writer.write(data[at : at + step])
                        await writer.drain()
                        await asyncio.sleep(0.1)
                    continue
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            self._lossy.discard(writer)
            writer.close()
