"""Joining a Ray cluster: the one place Ray is imported and ``ray.init`` is called."""

from __future__ import annotations

import socket

from ..errors import DistributedError, Llama2npError


def import_ray():
    """The ``ray`` module, or a Llama2npError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise Llama2npError("tensor parallelism needs Ray, which is not installed: "
                            "pip install 'llama2np[distributed]'") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a "HOST:PORT" or "ray://HOST:PORT" address; None for "auto", "local" and the like."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def join_cluster(ray_address: str | None, timeout: float):
    """The ``ray`` module, joined to ``ray_address`` (None: the one already joined, else Ray's own choice).

    A "HOST:PORT" address is first probed with a plain TCP connection (at most ``timeout`` seconds):
    Ray itself retries an unreachable address for minutes while flooding stderr with warnings.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if ray_address is not None and not isinstance(ray_address, str):
        raise DistributedError(f"ray_address must be a str such as 'HOST:6379' or 'auto', got {ray_address!r}")
    target = _host_port(ray_address) if ray_address else None
    if target is not None:
        try:
            socket.create_connection(target, timeout=timeout).close()
        except (OSError, ValueError, OverflowError) as e:
            why = getattr(e, "strerror", None) or e
            raise DistributedError(f"cannot join the Ray cluster at {ray_address!r}: nothing answers at "
                                   f"{target[0]}:{target[1]} within {timeout:g} s ({why})") from None
    kwargs = {"include_dashboard": False} if ray_address is None else {}
    try:
        ray.init(address=ray_address, log_to_driver=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {ray_address!r}" if ray_address else "a local Ray cluster"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__  # Ray's messages run to many lines
        raise DistributedError(f"cannot join {where}: {first}") from None
    return ray
