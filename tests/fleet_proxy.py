"""A TCP proxy on loopback between a host's daemon and Redis, for the fleet's fault tests:
``pass`` forwards both ways; ``dark`` holds everything (a partition: what was sent waits in
the buffers and arrives, in order, once it heals, as TCP's retransmissions make it);
``drop_replies`` forwards requests, and a connection whose answer comes back is cut instead
(a reply lost after the store applied the request). Bytes are never dropped from the middle
of a connection that goes on: no real network does that to TCP."""

from __future__ import annotations

import select
import socket
import threading
import time


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.mode = "pass"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        while True:
            if self.mode == "dark":
                time.sleep(0.01)  # held: not read, so the sender's data waits for the heal
                continue
            try:
                readable, _, _ = select.select([source], [], [], 0.05)
                if not readable or self.mode == "dark":
                    continue
                data = source.recv(65536)
            except (OSError, ValueError):
                break
            if not data:
                break
            if replies and self.mode == "drop_replies":
                break  # the answer is lost with its connection
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
