"""A WebSocket test client: simple_websocket's, with its handshake race closed.

``simple_websocket.Client.handshake`` takes only the first wsproto event (the 101 response). When the server's
first frame arrives in the same ``recv`` as the 101 - our server sends ``hello`` right after the upgrade, and a
busy machine makes the client read late enough for both to be waiting - that frame stays parsed but unread
inside wsproto until the next bytes arrive, so ``receive`` sees nothing. Browsers have no such problem; the
tests must not either, so the frames that came with the handshake are taken at once."""

from __future__ import annotations

import threading

import simple_websocket


class DaemonThread(threading.Thread):
    """simple_websocket's reader thread, as a daemon: a connection left open must not keep pytest alive."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.daemon = True


class Client(simple_websocket.Client):
    def handshake(self):
        super().handshake()
        self._handle_events()  # frames that arrived with the 101 (before the reader thread starts)


def connect(url: str, headers=None) -> Client:
    return Client.connect(url, headers=headers, thread_class=DaemonThread)
