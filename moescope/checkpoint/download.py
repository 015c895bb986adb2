"""``moescope download``: fetch what moescope's commands need into the standard HF cache.

Downloads safetensors weights, configs and tokenizer files (``--include`` adds patterns)
through ``huggingface_hub.snapshot_download``, so revisions, ``HF_TOKEN``, ``HF_HOME``,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` behave as in every HF tool, and a later
``moescope params/trace/prune org/name`` finds the files in the cache. Pickled files
(:data:`moescope.checkpoint.hub.PICKLE_PATTERNS`: ``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``, ``*.ckpt``)
are never fetched, whatever ``--include`` says: they go to ``ignore_patterns``, which wins
over ``allow_patterns``. An unreachable hub fails in seconds (one probe, no retries).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from moescope.checkpoint.hub import (
    PICKLE_PATTERNS,
    hub_env,
    hub_offline_reason,
    looks_like_hub_id,
    split_hub_ref,
)
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

#: pickle formats: unpickling runs arbitrary code, so they are never downloaded


def pickle_patterns(include: list[str] | None) -> list[str]:
    """The ``--include`` patterns that name pickled files (the CLI warns about them).

    A pattern names pickles when it matches a pickle file name but not a safetensors one:
    ``*.bin`` and ``pytorch_model-*.bin`` do, ``*`` and ``*.json`` do not.
    """
    named = []
    for pattern in include or []:
        base = pattern.rsplit("/", 1)[-1].lower()
        hits_pickle = any(
            base.endswith(p[1:]) or fnmatch.fnmatch("model" + p[1:], base) for p in PICKLE_PATTERNS
        )
        if hits_pickle and not fnmatch.fnmatch("model.safetensors", base):
            named.append(pattern)
    return named


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
        include: extra glob patterns to fetch as well (pickle formats are dropped).
        headers_only: fetch configs and tokenizer only, not the weights.
        max_workers: concurrent file downloads.

    Returns:
        The local snapshot folder.

    Raises:
        ModelNotFoundError: not a hub id, repo or revision missing, the hub unreachable, or
            offline without a cached copy.
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
    env = hub_env()
    hub_offline_reason(ref, revision, env, use_cache=False)  # fail fast when the hub is unreachable
    patterns = [p for p in DEFAULT_PATTERNS if not (headers_only and p.endswith(".safetensors"))]
    dropped = set(pickle_patterns(include))
    patterns += [p for p in include or [] if p not in dropped]
    kwargs = {"endpoint": env["endpoint"]} if env["endpoint"] else {}
    try:
        path = snapshot_download(
            repo,
            revision=rev,
            allow_patterns=patterns,
            ignore_patterns=list(PICKLE_PATTERNS),
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
        if env["offline"]:
            raise ModelNotFoundError(
                f"{repo} is not in the HF cache at {env['cache_dir']} and {env['offline_why']} forbids "
                "downloads; unset it, or run `moescope download` on a machine with network."
            ) from None
        raise ModelNotFoundError(
            f"{repo}: the hub could not be reached and the files are not in the HF cache at "
            f"{env['cache_dir']}; check the network and retry."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # disk full, permissions: the CLI's error table names the cause and the fix
        raise ModelNotFoundError(f"{repo}: download failed ({str(exc).splitlines()[0]}).") from None
    return Path(path)
