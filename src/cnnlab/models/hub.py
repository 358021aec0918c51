"""Whether a weights server answers, asked once per process in about a second, before any download.

Offline, huggingface_hub retries each request five times with backoff (1 + 2 + 4 + 8 + 8 s) and timm asks for two
files: ~50 s before cnnlab could say what to do. A TCP connect to the hub (or to the proxy that would carry the
request) that fails within CONNECT_TIMEOUT means nothing will answer, so cnnlab puts the hub in offline mode, as
HF_HUB_OFFLINE=1 would: weights already in the local cache still load, missing ones fail at once, with no retry.
"""
from __future__ import annotations

import functools
import socket
import threading
import urllib.parse
import urllib.request

CONNECT_TIMEOUT = 1.5        # seconds: a reachable server accepts a connection in well under that


def _address(url: str) -> tuple[str, int]:
    """(host, port) a request to `url` connects to first: the proxy's, when one is configured for it."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or (443 if p.scheme == "https" else 80)
    return host, port


@functools.cache
def reachable(url: str) -> bool:
    """Whether the server of `url` (or its proxy) accepts a TCP connection within CONNECT_TIMEOUT; asked once per
    address and process. On a thread: the name lookup has no timeout of its own, and a resolver that does not
    answer would otherwise hold the run for its retries."""
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(_address(url), timeout=CONNECT_TIMEOUT):
                answered.append(True)
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=connect, daemon=True, name="cnnlab-hub-check")
    t.start()
    t.join(CONNECT_TIMEOUT + 0.5)
    return bool(answered)


def unreachable_reason(url: str) -> str:
    host, port = _address(url)
    return f"{host}:{port} did not answer within {CONNECT_TIMEOUT:g} s, so nothing was downloaded or retried"


def prepare_hf_hub() -> str:
    """Before timm asks the Hugging Face hub for weights: offline mode when the hub does not answer. Returns why
    the hub is offline ('' when it is online), for the error a missing download then gives."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so only the local cache was looked at"
    if reachable(constants.ENDPOINT):
        return ""
    # huggingface_hub reads its constant at each request. The environment is left alone: a process started
    # later (a suite's next row) asks again, and may find the network back.
    constants.HF_HUB_OFFLINE = True
    return unreachable_reason(constants.ENDPOINT) + " (offline mode: only the local cache was looked at)"
