"""Hub plumbing for model references: settings, reachability, and headers by HTTP range reads.

Everything goes through ``huggingface_hub`` (imported inside the functions, so the CLI starts
fast), so ``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``
behave as in every HF tool:

- :func:`hub_env` reads those settings at call time;
- :func:`hub_offline_reason` decides, before any request, whether a hub id is read online or
  from the HF cache only (one quick probe, so an unreachable hub fails in seconds);
- :func:`remote_header` fetches one shard's safetensors header with range requests (most
  headers fit the first :data:`FIRST_READ` bytes: one round trip per shard) and validates it
  with :func:`moescope.checkpoint.header.parse_header`.

Which references are hub ids is decided by :func:`moescope.checkpoint.ref.resolve_ref`.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from moescope.arch.inventory import Inventory
from moescope.checkpoint.header import MAX_HEADER_BYTES, parse_header
from moescope.errors import CheckpointError, ModelNotFoundError

__all__ = [
    "FIRST_READ",
    "PROBE_TIMEOUT",
    "hub_env",
    "hub_offline_reason",
    "looks_like_hub_id",
    "remote_header",
    "split_hub_ref",
]

#: pickled weight files, never downloaded nor read (safetensors only)
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]

_TRUE = ("1", "true", "yes", "on")


def hub_env() -> dict[str, Any]:
    """Hub settings read at call time (tests and users may set them after import).

    ``offline`` is true when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) says so now,
    or when huggingface_hub read it so at import (then it refuses every request anyway);
    ``offline_why`` names the variable, for messages.
    """
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    why = next((f"{v}=1" for v in flags if os.environ.get(v, "").lower() in _TRUE), None)
    if why is None:
        try:
            from huggingface_hub import constants

            why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            pass
    endpoint = os.environ.get("HF_ENDPOINT") or None
    return {
        "endpoint": endpoint.rstrip("/") if endpoint else None,
        "cache_dir": os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"),
        "token": os.environ.get("HF_TOKEN") or None,
        "offline": why is not None,
        "offline_why": why,
    }


def split_hub_ref(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); an explicit ``revision`` wins."""
    repo, _, rev = ref.partition("@")
    return repo, revision or rev or None


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` or ``org/name@rev`` that is not a local path."""
    repo = ref.partition("@")[0]
    parts = repo.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


#: seconds the reachability probe waits for the hub; huggingface_hub itself would retry a
#: refused connection with backoff for about 25 s per file before giving up
PROBE_TIMEOUT = 5.0


def _probe_hub(endpoint: str) -> str | None:
    """None when ``endpoint`` answers HTTP at all (any status), else why not, in a few words.

    One HEAD request without retries: connection refused, DNS failure, proxy or TLS errors
    and timeouts all mean unreachable.
    """
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT, follow_redirects=False)
    except Exception as exc:  # any transport failure (httpx, requests, proxies): unreachable
        text = " ".join(str(exc).split()) or type(exc).__name__
        return text if len(text) <= 120 else text[:117] + "..."
    return None


def _cached_config(repo: str, revision: str | None, cache_dir: str) -> str | None:
    """Path of the repo's ``config.json`` in the HF cache at that revision, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir, revision=revision)
    return found if isinstance(found, str) else None


def hub_offline_reason(
    ref: str, revision: str | None, env: dict[str, Any], *, use_cache: bool = True
) -> str | None:
    """Decide, before any hub request, whether a hub id is read online or from the cache only.

    Offline mode is honoured; otherwise one quick probe checks that the endpoint answers,
    so an unreachable hub fails in seconds instead of after huggingface_hub's retries.

    Args:
        ref: ``org/name`` or ``org/name@revision``.
        revision: explicit revision (wins over ``@rev``).
        env: :func:`hub_env`.
        use_cache: whether a cached copy may stand in when the hub is unreachable
            (``moescope download`` passes False: it needs the hub).

    Returns:
        None to go online; else why the caller must pass ``local_files_only=True``
        (``HF_HUB_OFFLINE=1`` or ``the hub at URL is unreachable (...)``).

    Raises:
        ModelNotFoundError: offline or unreachable, and the repo is not in the HF cache
            (or ``use_cache`` is False and the hub is unreachable).
    """
    from huggingface_hub import constants

    repo, rev = split_hub_ref(ref, revision)
    where = f"{repo}@{rev}" if rev else repo
    cache = env["cache_dir"]
    if env["offline"]:
        if use_cache and _cached_config(repo, rev, cache) is None:
            raise ModelNotFoundError(
                f"{where} is not in the HF cache at {cache} and {env['offline_why']} forbids downloads; run "
                f"`moescope download {ref}` on a machine with network (same HF_HUB_CACHE), or unset "
                f"{str(env['offline_why']).split('=')[0]}."
            )
        return str(env["offline_why"])
    endpoint = env["endpoint"] or constants.ENDPOINT
    why = _probe_hub(endpoint)
    if why is None:
        return None
    reason = f"the hub at {endpoint} is unreachable ({why})"
    if not use_cache:
        raise ModelNotFoundError(
            f"{where}: {reason}; check the network, or run `moescope download` on a machine with network. "
            f"What is already in the HF cache ({cache}) can be used with HF_HUB_OFFLINE=1."
        )
    if _cached_config(repo, rev, cache) is None:
        raise ModelNotFoundError(
            f"{where}: {reason} and the model is not in the HF cache at {cache}; check the network, or run "
            f"`moescope download {ref}` on a machine with network and use that cache here with HF_HUB_OFFLINE=1."
        )
    return reason


#: first range read per shard: most headers fit, so one round trip per shard (a Kimi-K2
#: shard's header is ~300 KB); 512 KB x 62 shards is 0.003% of a 1 TB checkpoint.
FIRST_READ = 512 * 1024


def remote_header(
    repo: str, filename: str, revision: str | None, env: dict[str, Any]
) -> tuple[Inventory, int]:
    """Fetch one shard's header with HTTP range reads through huggingface_hub's session.

    Returns (tensors, bytes transferred). A header larger than :data:`FIRST_READ` costs a
    second range request for the rest.
    """
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo, filename, revision=revision, endpoint=env["endpoint"] or constants.ENDPOINT)
    headers = build_hf_headers(token=env["token"])
    session = get_session()
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT

    def get(byte_range: str) -> Any:
        try:
            resp = session.get(url, headers={**headers, "range": byte_range}, timeout=timeout)
        except Exception as exc:  # transport errors (refused, reset, timeout) of any HTTP client
            raise ModelNotFoundError(
                f"{repo}/{filename}: the hub stopped answering while reading the header "
                f"({' '.join(str(exc).split()) or type(exc).__name__}); check the network and retry."
            ) from None
        hf_raise_for_status(resp)
        return resp

    resp = get(f"bytes=0-{FIRST_READ - 1}")
    first = resp.content
    transferred = len(first)
    if len(first) < 8:
        raise CheckpointError(f"{repo}/{filename}: too short for a safetensors file; the upload is broken.")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{repo}/{filename}: header length {n} is implausible; not a safetensors file.")
    raw = first[8 : 8 + n]
    if len(raw) < n:
        resp = get(f"bytes={len(first)}-{n + 7}")
        raw += resp.content
        transferred += len(resp.content)
    if len(raw) < n:
        raise CheckpointError(f"{repo}/{filename}: the header is cut short; the upload is broken.")
    size = None
    cr = resp.headers.get("content-range", "")
    if "/" in cr and cr.rsplit("/", 1)[1].isdigit():
        size = int(cr.rsplit("/", 1)[1])
    return parse_header(raw, filename, size), transferred
