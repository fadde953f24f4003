"""The bench's delaying proxy (bench/latency_proxy.py): what its `latency` figures rest on."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from bench.latency_proxy import DelayProxy


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # a task left pending at the close
def test_each_way_is_delayed_in_order_and_closing_with_connections_open_is_quiet(capfd):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with DelayProxy(server.server_address, 0.1) as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            started = time.monotonic()
            for n in range(50):  # many chunks, each a write of its own: they must come back in order
                client.sendall(b"%03d" % n)
            received = b""
            while len(received) < 150:
                received += client.recv(65536)
            took = time.monotonic() - started
            assert received == b"".join(b"%03d" % n for n in range(50))
            assert 0.2 <= took < 2.0  # a round trip: twice the delay, not once per chunk
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10)  # left open as the proxy closes
        client.close()
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capfd.readouterr().err
