"""Read routing recorded by SGLang: expert-distribution dumps and generate responses.

What:

- ``sglang-dump``: files ``torch.save``'d by SGLang's expert-distribution recorder
  (``--expert-distribution-recorder-mode``, dumped through ``/dump_expert_distribution_record``).
  ``per_token`` mode: ``{"records": [...], "last_physical_to_logical_map": [layers, P]}``,
  each record one forward pass with ``topk_ids_of_layer`` int32 ``[layers, tokens, K]``
  (physical ids, ``-1`` empty, ``K`` may exceed top-k), ``extend_seq_lens`` (the prefill
  segments, None in decode) and ``rank``. ``stat`` mode: ``{"rank", "logical_count":
  [steps, layers, E], ...}``, counts only. Files are loaded with
  ``torch.load(weights_only=True)``; a file that needs arbitrary Python objects is refused,
  never unpickled.
- ``sglang-response``: JSON lines of ``/generate`` responses launched with
  ``--enable-return-routed-experts`` and requested with ``"return_routed_experts": true``:
  ``meta_info.routed_experts`` is base64 of little-endian int32 ordered (token, layer,
  top-k slot) over every decoder layer, ``-1`` where no expert was routed. Each response
  is one document, its tokens in order. OpenAI-compatible responses (``/v1/completions``,
  ``/v1/chat/completions`` with ``"return_routed_experts": true`` in the body) carry the same
  encoding in each choice's ``sgl_ext.routed_experts``; each choice is one document.

How: :func:`read_dump` and :func:`read_responses` yield :class:`~moescope.importers.common.Piece`
objects (normalised, logical ids at the model's MoE layers) to a
:class:`~moescope.importers.common.RouteSink`; stat dumps return counts directly
(:func:`stat_counts`). Under tensor parallelism every rank records the same forward
pass: a record that another rank holds byte for byte (same forward pass id, tokens and
ids) is counted once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.importers.common import (
    ModelShape,
    Piece,
    RoutingImportError,
    normalise,
    physical_to_logical,
    to_moe_layers,
)

_FIX_DUMP = (
    "pass the .pt files SGLang's /dump_expert_distribution_record wrote "
    "(--expert-distribution-recorder-mode per_token or stat)"
)


def load_dump(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists and dicts only.

    Raises:
        RoutingImportError: the file needs arbitrary objects (refused, nothing executed), is
            not a ``torch.save`` file, or is not a dict.
    """
    import pickle

    import torch

    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # zip (torch.save) or legacy pickle
        raise RoutingImportError(f"{path}: not a torch.save file (it starts with {head!r}); {_FIX_DUMP}.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln]
        if not lines:
            raise RoutingImportError(
                f"{path}: not a readable torch.save file ({_gist(exc)}); {_FIX_DUMP}."
            ) from None
        raise RoutingImportError(
            f"{path}: refused to load: the file needs arbitrary Python objects ({lines[0]}), which could "
            "run code; moescope loads only tensors, numbers, strings, lists and dicts "
            f"(torch.load weights_only=True) — {_FIX_DUMP}."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as exc:
        raise RoutingImportError(
            f"{path}: not a readable torch.save file ({type(exc).__name__}: {_gist(exc)}); truncated? "
            f"{_FIX_DUMP}."
        ) from None
    if not isinstance(data, dict):
        raise RoutingImportError(f"{path}: holds a {type(data).__name__}, not a dict; {_FIX_DUMP}.")
    return data


def _gist(exc: BaseException) -> str:
    """The first line of an exception's text that says something, shortened."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith(("Weights only load failed", "Check the documentation")):
            return line[:160]
    return type(exc).__name__


def dump_mode(data: dict[str, Any], path: Path) -> str:
    """``per_token`` or ``stat``, from the keys of a loaded dump."""
    if "records" in data:
        return "per_token"
    if "logical_count" in data:
        return "stat"
    raise RoutingImportError(
        f"{path}: neither 'records' (per_token mode) nor 'logical_count' (stat mode) is in the dump "
        f"(keys: {sorted(map(str, data))[:6]}); {_FIX_DUMP}."
    )


def _array(value: Any, what: str, where: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except ValueError:
            pass
    raise RoutingImportError(f"{where}: {what} is a {type(value).__name__}, expected an integer tensor.")


def _segments(record: dict[str, Any], n: int) -> np.ndarray | None:
    """Prefill (extend) segments of a forward pass; None in decode (token order across passes unknown)."""
    lens = record.get("extend_seq_lens")
    if lens is None:
        return None
    try:
        arr = np.asarray(
            [int(v) for v in (lens.tolist() if hasattr(lens, "tolist") else lens)], dtype=np.int64
        )
    except (TypeError, ValueError):
        return None
    if arr.sum() != n or (arr < 0).any():
        return None
    return np.repeat(np.arange(len(arr)), arr)


@dataclass
class DumpStats:
    """What the per-token dump reader saw.

    Attributes:
        records: forward passes imported.
        duplicates: records skipped because another rank held the same forward pass.
        ordered_tokens: tokens whose neighbours are known (prefill segments).
        ranks: the ranks seen.
    """

    records: int = 0
    duplicates: int = 0
    ordered_tokens: int = 0
    ranks: set[int] = field(default_factory=set)


def read_dump(
    dumps: Iterable[tuple[Path, dict[str, Any]]], shape: ModelShape, stats: DumpStats
) -> Iterator[Piece]:
    """Yield one piece per forward pass of ``per_token`` dumps (several ranks combined).

    Raises:
        RoutingImportError: a malformed record, a map or ids that do not fit ``shape``.
    """
    seen: dict[tuple[Any, bytes], int] = {}
    for path, data in dumps:
        records = data.get("records")
        if not isinstance(records, list):
            raise RoutingImportError(f"{path}: 'records' is a {type(records).__name__}, expected a list.")
        phys = data.get("last_physical_to_logical_map")
        phys_map = None if phys is None else _array(phys, "last_physical_to_logical_map", str(path))
        for i, rec in enumerate(records):
            where = f"{path} record {i}"
            if isinstance(rec, dict) and "topk_ids_of_layer" not in rec and "global_physical_count" in rec:
                raise RoutingImportError(
                    f"{where}: a per_pass record (physical counts, no token ids); record with "
                    "--expert-distribution-recorder-mode per_token (or stat for counts)."
                )
            if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
                raise RoutingImportError(f"{where}: expected a dict with topk_ids_of_layer; {_FIX_DUMP}.")
            topk = _array(rec["topk_ids_of_layer"], "topk_ids_of_layer", where)
            if topk.ndim != 3:
                raise RoutingImportError(
                    f"{where}: topk_ids_of_layer is {list(topk.shape)}, expected [layers, tokens, K]."
                )
            if not np.issubdtype(topk.dtype, np.integer):
                raise RoutingImportError(f"{where}: topk_ids_of_layer holds {topk.dtype}, expected integers.")
            rank = rec.get("rank", data.get("rank", 0))
            key = (
                rec.get("forward_pass_id"),
                hashlib.sha256(topk.tobytes() + repr(topk.shape).encode()).digest(),
            )
            if key in seen and seen[key] != rank:
                stats.duplicates += 1  # the same forward pass recorded by another tensor-parallel rank
                continue
            seen[key] = rank
            stats.records += 1
            stats.ranks.add(int(rank) if isinstance(rank, int) else 0)
            ids = np.ascontiguousarray(topk.transpose(1, 0, 2)).astype(np.int64)  # [tokens, layers, K]
            if phys_map is not None:
                if phys_map.shape[0] != ids.shape[1]:
                    raise RoutingImportError(
                        f"{path}: last_physical_to_logical_map has {phys_map.shape[0]} layers but "
                        f"topk_ids_of_layer has {ids.shape[1]}; the dump is inconsistent."
                    )
                ids = physical_to_logical(ids, phys_map, where)
            ids = normalise(to_moe_layers(ids, shape, where), shape, where)
            segments = _segments(rec, len(ids))
            if segments is not None:
                stats.ordered_tokens += len(ids)
            yield Piece(ids=ids, segments=segments)


def stat_counts(
    dumps: Sequence[tuple[Path, dict[str, Any]]], shape: ModelShape
) -> tuple[np.ndarray, int, int]:
    """Sum ``stat`` dumps: ``(counts [L, E], tokens, steps)``.

    Tokens per step are the largest per-layer count sum divided by ``top_k`` (rounded up):
    every token routes ``top_k`` experts at every MoE layer.

    Raises:
        RoutingImportError: ``logical_count`` is not ``[steps, layers, E]`` for this model.
    """
    n_l, n_e, k = len(shape.moe_layers), shape.num_experts, shape.top_k
    counts = np.zeros((n_l, n_e), dtype=np.int64)
    tokens = steps = 0
    for path, data in dumps:
        where = f"{path} logical_count"
        lc = _array(data["logical_count"], "logical_count", str(path))
        if lc.ndim == 2:
            lc = lc[None]
        if lc.ndim != 3 or not np.issubdtype(lc.dtype, np.integer):
            raise RoutingImportError(
                f"{where}: {list(lc.shape)} {lc.dtype}, expected integer counts [steps, layers, experts]."
            )
        if lc.shape[2] != n_e:
            raise RoutingImportError(
                f"{where}: counts for {lc.shape[2]} experts, but {shape.ref} has {n_e}; pass the --model "
                "the routing was recorded on."
            )
        if (lc < 0).any():
            raise RoutingImportError(f"{where}: negative counts; the dump is corrupt.")
        per_step = to_moe_layers(lc, shape, where)  # [steps, MoE layers, E]
        counts += per_step.sum(axis=0).astype(np.int64)
        sums = per_step.sum(axis=2).max(axis=1) if per_step.size else np.zeros(0, dtype=np.int64)
        tokens += int((-(-sums // k)).sum())
        steps += int(lc.shape[0])
    return counts, tokens, steps


# --------------------------------------------------------------------------- generate responses


def _responses(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, response)`` for every response of a JSON-lines file (a line may hold a list)."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in _lines(fh, path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise RoutingImportError(f"{where}: malformed JSON ({why}); one response per line.") from None
            items = obj if isinstance(obj, list) else [obj]
            for j, item in enumerate(items):
                if not isinstance(item, dict):
                    raise RoutingImportError(f"{where}: expected a JSON object (a /generate response).")
                yield (f"{where}[{j}]" if isinstance(obj, list) else where), item


def _lines(fh: Any, path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file; bytes that are not UTF-8 name the file."""
    try:
        yield from enumerate(fh, 1)
    except UnicodeDecodeError:
        raise RoutingImportError(
            f"{path}: not UTF-8 text; pass the JSON lines of SGLang's /generate responses."
        ) from None


def decode_routed(text: Any, shape: ModelShape, where: str) -> np.ndarray:
    """``meta_info.routed_experts`` (base64 of int32 LE) → ``[tokens, num_layers, top_k]``.

    Raises:
        RoutingImportError: missing, not base64, or not a whole number of tokens.
    """
    if not isinstance(text, str):
        raise RoutingImportError(
            f"{where}: no meta_info.routed_experts string; launch SGLang with --enable-return-routed-experts "
            'and send "return_routed_experts": true with each request.'
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RoutingImportError(
            f"{where}: meta_info.routed_experts is not valid base64 ({exc}); truncated?"
        ) from None
    per_token = shape.num_layers * shape.top_k
    if len(raw) % (4 * per_token):
        raise RoutingImportError(
            f"{where}: meta_info.routed_experts holds {len(raw)} bytes, not a whole number of tokens of "
            f"{shape.num_layers} layers x top_k {shape.top_k} int32; truncated, or recorded on another "
            "model than --model."
        )
    return np.frombuffer(raw, dtype="<i4").reshape(-1, shape.num_layers, shape.top_k).astype(np.int64)


def read_responses(
    paths: Sequence[Path], shape: ModelShape, on_response: Callable[[], None] | None = None
) -> Iterator[Piece]:
    """Yield one piece (one document, tokens in order) per generate response.

    A response may carry a ``domain`` string (added by the user), recorded per token.
    """
    for path in paths:
        for where, resp in _responses(path):
            for at, routed in _routed_fields(resp, where):
                yield _response_piece(routed, resp.get("domain"), shape, at, on_response)


def _routed_fields(resp: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """``(where, routed_experts)`` of a response: ``/generate``'s ``meta_info``, or each choice's
    ``sgl_ext`` of an OpenAI-compatible (``/v1/completions``, ``/v1/chat/completions``) response."""
    meta = resp.get("meta_info")
    choices = resp.get("choices")
    if not isinstance(meta, dict) and isinstance(choices, list) and choices:
        return [
            (
                f"{where} choices[{i}]",
                (c.get("sgl_ext") or {}).get("routed_experts") if isinstance(c, dict) else None,
            )
            for i, c in enumerate(choices)
        ]
    return [(where, meta.get("routed_experts") if isinstance(meta, dict) else None)]


def _response_piece(
    routed: Any, domain: Any, shape: ModelShape, where: str, on_response: Callable[[], None] | None
) -> Piece:
    """One response's (or choice's) routing as one document."""
    ids = normalise(to_moe_layers(decode_routed(routed, shape, where), shape, where), shape, where)
    codes = np.zeros(len(ids), dtype=np.int64) if isinstance(domain, str) else None
    if on_response is not None:
        on_response()
    return Piece(
        ids=ids,
        segments=np.zeros(len(ids), dtype=np.int64),
        domain_codes=codes,
        domain_names=[domain] if isinstance(domain, str) else (),
    )
