"""No network in tests: every connection or name lookup outside the loopback is refused and logged.

Installed in the test process by ``tests/conftest.py`` and, through ``sitecustomize.py`` beside
this file on ``PYTHONPATH``, in every Python process a test starts. An attempt is appended to the
file named by ``$QUADA_NETWORK_LOG``; the conftest fails the test that made it, even when the code
under test caught the error. A test that talks to a server of its own narrows the loopback to that
server's ports with ``$QUADA_LOOPBACK_PORTS`` (comma-separated): a connection to any other port
is refused and logged too.
"""

import ipaddress
import os
import socket

LOG_ENV = "QUADA_NETWORK_LOG"
PORTS_ENV = "QUADA_LOOPBACK_PORTS"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", ""}


def is_loopback(host) -> bool:
    if host is None or str(host).lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def is_allowed(address) -> bool:
    """A loopback address, on one of the ports of ``$QUADA_LOOPBACK_PORTS`` when that is set."""
    if not is_loopback(address[0]):
        return False
    ports = os.environ.get(PORTS_ENV)
    return ports is None or str(address[1]) in ports.split(",")


def _refuse(what: str, host) -> OSError:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as log:
            log.write(f"{what} {host}\n")
    return ConnectionRefusedError(f"network access is blocked in the tests ({what} {host})")


def install() -> None:
    """Wrap ``socket.socket.connect``/``connect_ex`` and ``socket.getaddrinfo`` (idempotent)."""
    if getattr(socket.socket.connect, "network_guard", False):
        return
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not is_allowed(address):
            raise _refuse("connect", f"{address[0]}:{address[1]}")
        return connect(self, address)

    def guarded_connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not is_allowed(address):
            raise _refuse("connect", f"{address[0]}:{address[1]}")
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not is_loopback(host):
            raise _refuse("lookup", host)
        return getaddrinfo(host, *args, **kwargs)

    guarded_connect.network_guard = True
    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo
