"""A model's ``config.json`` by its Hugging Face Hub id: the local cache first, then the Hub.

Only ``config.json`` is read, as JSON: no weights, no code (``trust_remote_code`` is never
passed). ``huggingface_hub`` finds the user's token itself (``HF_TOKEN``, ``hf auth login``),
so gated repositories work once their license is accepted. Offline (``HF_HUB_OFFLINE=1`` or no
network) only the cache is read, and a miss says how to pass a ``config.json`` instead.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._optional import require
from ..errors import ConfigError

__all__ = ["is_hub_id", "load_hub_config"]

# owner/name as the Hub spells repository ids: letters, digits, '-', '_', '.'; 96 at most
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(text: str) -> bool:
    """True for ``owner/name`` strings that could be a Hub repository id (not a file name).

    Example:
        >>> is_hub_id("Qwen/Qwen2.5-7B"), is_hub_id("configs/llama.json"), is_hub_id("a/b/c")
        (True, False, False)
    """
    return bool(_HUB_ID.match(text)) and not text.endswith(".json") and ".." not in text


def _how_to_pass(repo_id: str) -> str:
    return (
        f"download https://huggingface.co/{repo_id}/blob/main/config.json where the Hub is "
        "reachable and pass its path (gradckpt plan path/to/config.json)"
    )


def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why the Hub at ``endpoint`` cannot be reached (None: a TCP connection opens).

    ``huggingface_hub`` retries a failed connection with backoff (about 25 s offline); one
    connection attempt first lets an offline machine get its answer at once.
    """
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or type(e).__name__}"
    return None


def load_hub_config(
    repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> tuple[dict[str, Any], str]:
    """The ``config.json`` of Hub repository ``repo_id`` as a dict, and the file it was read from.

    Args:
        repo_id: ``owner/name`` (``"meta-llama/Llama-3.1-8B"``).
        revision: branch, tag or commit (default: ``main``).
        cache_dir: the Hugging Face cache to read first (default: ``HF_HUB_CACHE``, i.e.
            ``~/.cache/huggingface/hub`` unless the environment says otherwise).

    Raises:
        ConfigError: not in the cache and the Hub cannot be reached (offline), the repository
            or its ``config.json`` does not exist, it is gated and the user has no access, or
            the file is not a JSON object. Each message says what to do.
    """
    why = "reading a model's config from the Hub"
    hub = require("huggingface_hub", "hf", purpose=why)
    errors = require("huggingface_hub.errors", "hf", purpose=why)
    constants = require("huggingface_hub.constants", "hf", purpose=why)
    cached = hub.try_to_load_from_cache(
        repo_id, "config.json", cache_dir=cache_dir, revision=revision
    )
    if isinstance(cached, str):
        path = cached
    else:
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"{repo_id}: config.json is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                f"is set; {_how_to_pass(repo_id)}"
            )
        down = _unreachable(constants.ENDPOINT)
        if down is not None:
            raise ConfigError(
                f"{repo_id}: config.json is not in the local Hugging Face cache and the Hub cannot "
                f"be reached ({down}); {_how_to_pass(repo_id)}"
            )
        try:
            path = hub.hf_hub_download(
                repo_id, "config.json", revision=revision, cache_dir=cache_dir
            )
        except errors.GatedRepoError:
            raise ConfigError(
                f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id} and log "
                "in (hf auth login, or set HF_TOKEN), or pass a config.json path"
            ) from None
        except errors.RepositoryNotFoundError:
            raise ConfigError(
                f"{repo_id} is not a model on the Hugging Face Hub (or it is private and no token "
                "gives access); check the id, or pass a config.json path"
            ) from None
        except errors.RevisionNotFoundError:
            raise ConfigError(f"{repo_id} has no revision {revision!r}") from None
        except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
            # no connection (or offline mode) and no cached copy
            raise ConfigError(
                f"{repo_id}: config.json is not in the local Hugging Face cache and the Hub cannot "
                f"be reached ({type(e).__name__}); {_how_to_pass(repo_id)}"
            ) from None
        except errors.EntryNotFoundError:
            raise ConfigError(
                f"{repo_id} has no config.json (not a transformers model?); pass a config.json path"
            ) from None
        except OSError as e:  # the network failed some other way
            raise ConfigError(
                f"{repo_id}: config.json is not in the local Hugging Face cache and fetching it "
                f"failed ({type(e).__name__}: {e}); {_how_to_pass(repo_id)}"
            ) from None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{repo_id}: cannot read its config.json ({path}): {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{repo_id}: its config.json ({path}) is not a JSON object")
    return data, path
