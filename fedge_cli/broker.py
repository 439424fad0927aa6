"""An embedded MQTT broker for the one-command demo: amqtt (a real MQTT 3.1.1
broker in pure Python) on a loopback port, in a background thread.

Production fleets run Mosquitto, EMQX, HiveMQ or a cloud broker; this exists
so that ``fedge demo`` needs nothing installed beyond ``pip``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: object | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise RuntimeError("the embedded broker needs amqtt: pip install 'fedge[demo]' "
                               "(or pass --broker mqtt://host:port)") from None
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                broker = Broker(config, loop=loop)
                _iterate_subscriptions_safely(broker)
                self._broker = broker
                loop.run_until_complete(broker.start())
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="fedge-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"embedded MQTT broker failed to start on {self.url}: {self._error}")
        return self.url

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            fut.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(timeout=10)


class _SnapshotDict(dict[str, Any]):
    """A dict whose iteration walks a copy of its keys."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))


def _iterate_subscriptions_safely(broker: object) -> None:
    """amqtt 0.11-0.12 walks its subscription table with awaits inside the
    loop when a client connects ("publish retained messages to a pre-existing
    session"), so a device subscribing to a new topic at that moment raises
    "dictionary changed size during iteration" and drops the connecting
    client. Iterating a snapshot of the keys is what the loop meant."""
    table = getattr(broker, "_subscriptions", None)
    if isinstance(table, dict) and not isinstance(table, _SnapshotDict):
        broker._subscriptions = _SnapshotDict(table)  # type: ignore[attr-defined]
