"""Joining a Ray cluster: ``--executor ray`` and ``--ray-address`` for extraction and probes.

Why here: extraction (pipeline) and the probe sweep (probes) both spread work over Ray actors
and must fail the same way -- one line, in seconds -- when Ray is not installed or nothing
answers at the address, instead of ray.init retrying for minutes. Ray is imported on use only. Both hand their items (parts, targets) to a fixed pool of
actors the same way, so that loop lives here too (ActorQueue).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from kvpipe.errors import KvpipeError, UsageError

CONNECT_TIMEOUT_S = 5.0
# HTTP/2 client connection preface + an empty SETTINGS frame
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'kvpipe[ray]'") from None
    return ray


def check_address(address: str) -> None:
    """Fail in seconds, with one line, when nothing listens at a host:port address."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r} must look like HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S) as sock:
            # Ray's GCS (and the Ray Client server) speak gRPC: HTTP/2 in clear text. Without
            # this, a port where some other server listens makes ray.init retry for minutes.
            sock.sendall(H2_PREFACE)
            reply = b""
            while len(reply) < 9:
                chunk = sock.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError as err:
        raise UsageError(f"--ray-address {address}: no Ray cluster answers there ({err.strerror or err}); "
                         f"start one (ray start --head, or see docs/DEPLOY.md) or fix the address") from None
    if len(reply) < 9 or reply[3] != 0x04:  # a SETTINGS frame opens every HTTP/2 server's reply
        raise UsageError(f"--ray-address {address}: the server there is not a Ray cluster (no gRPC); "
                         f"give the head node's GCS port (6379) or ray://HOST:10001")


def one_line(err: BaseException) -> str:
    if isinstance(err, KvpipeError):
        return str(err)
    lines = [l for l in str(err).splitlines() if l.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def cause(err: BaseException) -> BaseException:
    """The worker's own exception inside a Ray error, when there is one."""
    inner = getattr(err, "cause", None)
    return inner if isinstance(inner, BaseException) else err


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``; none: start a private local one)
    unless this process already has; True when this call started Ray (the caller shuts it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address:
        check_address(address)
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if not address and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a private local instance starts faster without
    try:
        try:
            ray.init(address=address or None, **kwargs)
        except ValueError as err:  # joined a running cluster: its dashboard is not ours to set
            if "include_dashboard" not in kwargs or "dashboard" not in str(err):
                raise
            kwargs.pop("include_dashboard")
            ray.init(address=address or None, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"--ray-address {address}" if address else "Ray"
        raise UsageError(f"{where}: cannot connect ({one_line(err)})") from None
    return True


class ActorQueue:
    """Items handed to a pool of Ray actors, ``in_flight`` at a time each, in the order given.

    Iterating yields ``(item, ref)`` as each call finishes (the caller ``ray.get``s the ref and
    handles its errors); the finished call's actor then gets the next item. ``retry(item)``
    puts an item whose actor died first in line and replaces that actor -- once, however many
    of its calls are lost. ``stop()`` starts nothing new: what is in flight still finishes.
    ``actors`` is the caller's list, updated in place."""

    def __init__(self, ray: Any, actors: list[Any], items: Iterable[Any], call: Callable[[Any, Any], Any],
                 new_actor: Callable[[], Any], in_flight: int) -> None:
        self.ray, self.actors, self.call, self.new_actor = ray, actors, call, new_actor
        self.queue = deque(items)
        self.generation = [0] * len(actors)
        self.inflight: dict[Any, tuple[Any, int, int]] = {}  # ref -> (item, actor slot, generation)
        self._current = (0, 0)
        for slot in range(len(actors)):
            for _ in range(in_flight):
                if self.queue:
                    self._submit(slot)

    def _submit(self, slot: int) -> None:
        item = self.queue.popleft()
        self.inflight[self.call(self.actors[slot], item)] = (item, slot, self.generation[slot])

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        while self.inflight:
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1)
            item, slot, gen = self.inflight.pop(ready[0])
            self._current = (slot, gen)
            yield item, ready[0]
            if self.queue:
                self._submit(slot)

    def retry(self, item: Any) -> None:
        slot, gen = self._current
        self.queue.appendleft(item)
        if gen == self.generation[slot]:  # replace the dead actor once, not per lost item
            self.ray.kill(self.actors[slot])
            self.actors[slot] = self.new_actor()
            self.generation[slot] += 1

    def stop(self) -> None:
        self.queue.clear()
