"""A TCP proxy that delays every byte by a fixed time each way: the Firestore and Storage a worker far from their
region sees, where the emulators answer within a millisecond (the bench's `latency` section)."""

from __future__ import annotations

import asyncio
import threading

from devtools import emulators as emu


class DelayProxy:
    """Listens on a free local port and forwards each connection to `target`, every chunk `delay` seconds later,
    in order, in both directions (a round trip costs twice `delay`)."""

    def __init__(self, target: tuple[str, int], delay: float, host: str = emu.HOST):
        self.target, self.delay, self.host = target, delay, host
        self.port = emu.free_port(host)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="delay-proxy", daemon=True)

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the delay proxy on {self.host_port} did not start")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _close(self) -> None:
        """Every connection ended (the worker is stopped by now) before the loop stops: none left pending."""
        self._server.close()
        await asyncio.sleep(0)  # a connection accepted just before gets its task
        while tasks := [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._connection, self.host, self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _connection(self, client_reader, client_writer) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(self._pipe(client_reader, target_writer), self._pipe(target_reader, client_writer))
        except (OSError, asyncio.CancelledError):
            pass  # a side reset (the other is closed below), or the proxy closing: the task ends as any other
        finally:
            for writer in (client_writer, target_writer):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: each chunk written `delay` after it was read; a queue keeps their order."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await chunks.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sending = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                chunks.put_nowait((loop.time() + self.delay, data))
            chunks.put_nowait((loop.time() + self.delay, b""))
            await sending
        finally:
            sending.cancel()
