"""The processes' rendezvous before JAX's distributed runtime connects them.

JAX's client aborts the process when a peer is missing (a fatal log, no exception, no word on
which peer); here process 0 listens at the coordinator's address and knows exactly which
process ids never arrived, so :func:`kd_jax.parallel.maybe_initialize_distributed` can say so
in one line.
"""

from __future__ import annotations

import re
import socket
import time

_ADDRESS = re.compile(r"^(\[[^\s\[\]]+\]|[^\s:\[\]]+):(\d{1,5})$")
_HELLO = "kd_jax-rendezvous-1"


class DistributedInitError(RuntimeError):
    """A multi-process launch was detected or requested, but its processes did not start as one.

    The message is one line: the launch (cluster type, this process), what failed, and the
    flags that override the detected settings.
    """


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."



# The processes meet at the coordinator's address before JAX connects: JAX's client aborts the
# process when a peer is missing (a fatal log, no exception, no word on which peer), while
# here process 0 knows exactly which process ids never arrived.


def _rendezvous(address: str, count: int, index: int, timeout: float, who: str,
                hint: str) -> None:
    match = _ADDRESS.match(address)
    host, port = match.group(1).strip("[]"), int(match.group(2))
    deadline = time.monotonic() + timeout
    if index == 0:
        _await_peers(port, count, deadline, timeout, address, who, hint)
    else:
        _join_coordinator(host, port, count, index, deadline, timeout, address, who, hint)


def _read_line(conn: socket.socket) -> str:
    """One short ``\\n``-terminated line; "" when the peer closed first."""
    data = b""
    while b"\n" not in data and len(data) < 256:
        chunk = conn.recv(256)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("ascii", "replace").strip()


def _ids(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:20]))
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


def _listen(port: int) -> socket.socket:
    """A socket listening on ``port`` of every local address, IPv6 and IPv4 where possible."""
    if socket.has_dualstack_ipv6():
        try:
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        except OSError:
            pass  # IPv6 switched off in the kernel: IPv4 alone.
    return socket.create_server(("", port))


def _await_peers(port, count, deadline, timeout, address, who, hint) -> None:
    try:
        server = _listen(port)
    except OSError as err:
        raise DistributedInitError(
            f"{who}: cannot listen on port {port} of the coordinator address {address} "
            f"({_one_line(err)}); choose a free port (--coordinator-address host:PORT or "
            "JAX_COORDINATOR_PORT)"
        ) from err
    peers: dict[int, socket.socket] = {}
    try:
        with server:
            while len(peers) < count - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(1, count)) - set(peers))
                    raise DistributedInitError(
                        f"{who}: timed out after {timeout:g} s waiting at {address} for "
                        f"process{'es' if len(missing) > 1 else ''} {_ids(missing)}, which never "
                        f"connected; start all {count} processes with the same settings and "
                        f"check that they reach {address}; {hint}"
                    )
                server.settimeout(remaining)
                try:
                    conn, _ = server.accept()
                except OSError:  # Timed out: the loop reports who is missing.
                    continue
                peer = _greet(conn, count, peers, min(remaining, 10.0))
                if peer is None:
                    conn.close()
                    continue
                if isinstance(peer, str):
                    conn.close()
                    raise DistributedInitError(f"{who}: {peer}; {hint}")
                peers[peer] = conn
            for conn in peers.values():
                conn.sendall(b"ok\n")
            for conn in peers.values():  # Let each peer close first (no TIME_WAIT on the port).
                conn.settimeout(5.0)
                try:
                    conn.recv(1)
                except OSError:
                    pass
    finally:
        for conn in peers.values():
            conn.close()


def _greet(conn, count, peers, timeout) -> int | str | None:
    """The peer's process id, an error (told to the peer too), or None for a stray connection."""
    try:
        conn.settimeout(timeout)
        parts = _read_line(conn).split()
    except OSError:
        return None
    if len(parts) != 3 or parts[0] != _HELLO or not all(p.isdigit() for p in parts[1:]):
        return None
    peer_count, peer = int(parts[1]), int(parts[2])
    error = None
    if peer_count != count:
        error = (f"process {peer} was started for {peer_count} processes, process 0 for "
                 f"{count}; every process needs the same process count")
    elif not 0 < peer < count or peer in peers:
        error = f"two processes have process id {peer}; each needs its own in 1..{count - 1}"
    if error is not None:
        try:
            conn.sendall(f"error {error}\n".encode())
        except OSError:
            pass
        return error
    return peer


def _join_coordinator(host, port, count, index, deadline, timeout, address, who, hint) -> None:
    reached, last_error = False, "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if reached:
                what = (f"process 0 at {address} answered, but not all {count} processes "
                        "arrived (its own error names the missing ones)")
            else:
                what = f"the coordinator, process 0, at {address} never answered ({last_error})"
            raise DistributedInitError(
                f"{who}: timed out after {timeout:g} s: {what}; check that process 0 runs and "
                f"that {address} is its address as seen from here; {hint}"
            )
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 5.0)) as conn:
                conn.sendall(f"{_HELLO} {count} {index}\n".encode())
                reached = True
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                reply = _read_line(conn)
        except OSError as err:  # Not listening yet, unreachable, or timed out waiting.
            last_error = _one_line(err)
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))
            continue
        if reply == "ok":
            return
        if reply.startswith("error "):
            raise DistributedInitError(f"{who}: process 0 at {address} refused this process: "
                                       f"{reply[len('error '):]}; {hint}")
        time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))  # Closed without a word.
