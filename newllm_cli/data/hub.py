"""The Hugging Face hub, asked only when a user names it: reachable in seconds or not at all."""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers, decided in seconds (the hub clients retry for minutes)."""
    if any(
        os.environ.get(v, "").upper() in ("1", "TRUE", "ON", "YES") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def quiet_hub_logs() -> None:
    for name in ("datasets", "huggingface_hub", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)
