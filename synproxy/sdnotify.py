"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram to $NOTIFY_SOCKET.

Why: under `Type=notify`, `systemctl start synproxy` returns, and units ordered after it
start, only once the queues are bound and the rules are in place, so nothing reaches the
server unprotected because the proxy was still starting. Outside systemd this does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("synproxy")


def notify(message: str) -> bool:
    """Send `message` ("READY=1", "STOPPING=1", "STATUS=...", newline separated) to the
    service manager; False when there is none or it cannot be reached (logged, never fatal)."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        addr = "\0" + path[1:]  # an abstract socket
    elif path.startswith("/"):
        addr = path
    else:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
        return True
    except OSError as err:
        log.warning("could not notify systemd at %s: %s", path, err)
        return False
