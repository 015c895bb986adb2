"""``moescope download``: fetch what moescope's commands need into the standard HF cache.

Downloads safetensors weights, configs and tokenizer files (``--include`` adds patterns)
through ``huggingface_hub.snapshot_download``, so revisions, ``HF_TOKEN``, ``HF_HOME``,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` behave as in every HF tool, and a later
``moescope params/trace/prune org/name`` finds the files in the cache. Pickled weights
(``*.bin``, ``*.pt``) are never fetched.
"""

from __future__ import annotations

from pathlib import Path

from moescope.checkpoint import _hub_env, looks_like_hub_id, split_hub_ref
from moescope.errors import ModelNotFoundError

DEFAULT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
]


def download(
    ref: str,
    *,
    revision: str | None = None,
    include: list[str] | None = None,
    headers_only: bool = False,
    max_workers: int = 8,
) -> Path:
    """Download a hub model's config, tokenizer and safetensors into the HF cache.

    Args:
        ref: ``org/name`` or ``org/name@revision``.
        revision: branch, tag or commit (overrides ``@rev``).
        include: extra glob patterns to fetch as well.
        headers_only: fetch configs and tokenizer only, not the weights.
        max_workers: concurrent file downloads.

    Returns:
        The local snapshot folder.

    Raises:
        ModelNotFoundError: not a hub id, repo or revision missing, or offline without a cached copy.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not looks_like_hub_id(ref):
        raise ModelNotFoundError(f"{ref!r} is not a hub id; pass org/name or org/name@revision.")
    repo, rev = split_hub_ref(ref, revision)
    env = _hub_env()
    patterns = [p for p in DEFAULT_PATTERNS if not (headers_only and p.endswith(".safetensors"))]
    patterns += include or []
    kwargs = {"endpoint": env["endpoint"]} if env["endpoint"] else {}
    try:
        path = snapshot_download(
            repo,
            revision=rev,
            allow_patterns=patterns,
            cache_dir=env["cache_dir"],
            token=env["token"],
            local_files_only=env["offline"],
            max_workers=max_workers,
            **kwargs,
        )
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is gated; accept its licence on the hub and set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo}: no such model on the hub (or it is private: set HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"{repo}: revision {rev!r} not found; check the branch, tag or commit."
        ) from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{repo} is not in the HF cache and HF_HUB_OFFLINE=1; unset it (or run on a connected machine)."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(f"{repo}: download failed ({str(exc).splitlines()[0]}).") from None
    return Path(path)
