"""Hugging Face hub access that fails fast.

Without a network, ``from_pretrained`` and ``load_dataset`` retry for a minute before they give
up. quada asks first: offline mode set, or no TCP connection to the hub endpoint within
:data:`PROBE_TIMEOUT` seconds, and the caller gets a :class:`~quada.errors.QuadaError` at once that
says what to use instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from quada.errors import QuadaError

PROBE_TIMEOUT = 1.5  # seconds; a reachable hub answers a TCP handshake far sooner
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_VALUES = {"1", "on", "yes", "true"}


def offline_mode() -> str | None:
    """The offline variable that is set (``HF_HUB_OFFLINE=1`` ...), or None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in TRUE_VALUES:
            return name
    return None


def endpoint() -> str:
    """The hub's address: ``$HF_ENDPOINT`` or the public hub."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def unavailable_reason(timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the hub cannot be used right now, or None when a connection to it opens in time."""
    variable = offline_mode()
    if variable:
        return f"{variable} is set"
    url = urlsplit(endpoint())
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port} is not reachable ({err.strerror or type(err).__name__})"
    return None


def require_hub(what: str, instead: str) -> None:
    """Raise at once, naming ``what`` needed the hub and what to do ``instead``, unless the hub
    answers. In offline mode nothing is raised: the libraries then read their local caches, fast."""
    if offline_mode():
        return
    reason = unavailable_reason()
    if reason is not None:
        raise QuadaError(
            f"{what} needs the Hugging Face hub, which is unavailable here: {reason}. {instead} "
            "(A copy cached earlier is used when HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 are set.)"
        )
