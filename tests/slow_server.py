"""A STAND-IN HTTP server that answers every request with a status line and then one header byte
every 0.2 s, for ever: a client whose timeout bounds each read, not the exchange, never returns."""

from __future__ import annotations

import socket
import threading
import time


class SlowHeaders:
    def __init__(self) -> None:
        self._srv = socket.socket()
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(8)
        self.conns: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self._srv.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    @staticmethod
    def _drip(conn: socket.socket) -> None:
        try:
            conn.recv(65536)
        except OSError:
            return
        drip_headers(conn, b"HTTP/1.1 200 OK")

    def close(self) -> None:
        self._srv.close()
        for c in self.conns:
            c.close()


def drip_headers(conn: socket.socket, status_line: bytes) -> None:
    """Answer on ``conn`` with ``status_line`` and then one header byte every 0.2 s, until the
    client goes away (a server whose request was already read: the Kubernetes API's stand-in)."""
    try:
        conn.sendall(status_line + b"\r\nX-Slow: ")
        while True:
            conn.sendall(b"a")
            time.sleep(0.2)
    except OSError:
        return
