"""Whether the Hugging Face Hub can be reached, decided in at most a few seconds.

losa touches the network only when the user names a Hub model or dataset.  Without a network
the Hub libraries retry for half a minute before failing; one quick TCP connection answers the
question first, so a Hub name fails in seconds with a message naming the local alternatives.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
#: what to use instead of a Hub dataset, for the error messages
LOCAL_DATA = "a local .txt/.jsonl file or saved datasets folder (e.g. ../shared/data/c4-sample.txt)"


def offline_by_env() -> str | None:
    """The variable that puts the Hub libraries in offline mode (they then read only their cache)."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return variable
    return None


def hub_unreachable() -> str | None:
    """None when the Hub answers; otherwise why not, in a few words."""
    variable = offline_by_env()
    if variable:
        return f"{variable} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"no connection to {endpoint.hostname}: {exc.strerror or exc}"
    return None
