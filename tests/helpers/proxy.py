"""A refusing HTTP(S) proxy on loopback that counts the connections asked of it: point ``https_proxy`` at it and
every download attempt of a job (urllib's, httpx's) is seen, counted, and refused with 403."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class CountingProxy:
    def __init__(self) -> None:
        self.requests: list[str] = []  # the request line of each connection ("CONNECT host:443 HTTP/1.1", ...)
        self._server = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def env(self) -> dict[str, str]:
        """The environment that sends a job's web requests here."""
        return {name: self.url for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy")}

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:  # closed
                return
            with connection:
                connection.settimeout(5)
                try:
                    self.requests.append(connection.recv(4096).decode("latin-1").split("\r\n", 1)[0])
                    connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, traceback: TracebackType | None) -> None:
        self._server.close()
