"""Read routing vLLM returns per request: ``routed_experts`` arrays ``[tokens, layers, k]``.

What: with ``enable_return_routed_experts=True`` (``--enable-return-routed-experts`` for the
server) vLLM attaches to each completion the experts every token was routed to, as an integer
array ``[tokens, layers, top_k]`` (``RequestOutput.outputs[i].routed_experts``, a numpy array
in the Python API; ``choices[i].routed_experts`` in the OpenAI-compatible server's responses).
Layers are every decoder layer (dense layers hold placeholders and are dropped) or only the
MoE layers. Accepted files, each request one document with its tokens in order:

- ``.npy``: one request's array (``np.save(f, out.outputs[0].routed_experts)``);
- ``.npz``: one request per array, in the file's order (``np.savez(f, *arrays)``);
- ``.json`` / ``.jsonl``: responses, one per line (a line may hold a list): an object with
  ``choices`` (each choice's ``routed_experts``), or with ``routed_experts`` itself (a saved
  ``CompletionOutput``); the array is a nested list, or a base64 string of little-endian
  int32 as SGLang encodes it. A ``domain`` string per response is kept.

How: :func:`read_vllm` yields one :class:`~moescope.importers.common.Piece` per request,
normalised to logical ids at the model's MoE layers (:func:`~moescope.importers.common.normalise`).
Arrays are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moescope.importers.common import ModelShape, Piece, RoutingImportError, normalise, to_moe_layers

__all__ = ["read_vllm"]

_FIX = (
    "pass vLLM's routed_experts as .npy/.npz arrays [tokens, layers, k] or JSON lines of responses "
    "(serve with --enable-return-routed-experts)"
)


def _array(value: Any, shape: ModelShape, where: str) -> np.ndarray:
    """A ``routed_experts`` value (nested list, base64 string or array) → int64 ``[N, L, K]``."""
    if isinstance(value, str):
        from moescope.importers.sglang import decode_routed

        return decode_routed(value, shape, where)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise RoutingImportError(f"{where}: routed_experts is not a rectangular array; {_FIX}.") from None
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise RoutingImportError(f"{where}: routed_experts holds {arr.dtype} values, not expert ids; {_FIX}.")
    return arr.astype(np.int64).reshape(arr.shape if arr.size else (0, 1, 1))


def _piece(value: Any, shape: ModelShape, where: str, domain: Any = None) -> Piece:
    ids = normalise(to_moe_layers(_array(value, shape, where), shape, where), shape, where)
    named = isinstance(domain, str)
    return Piece(
        ids=ids,
        segments=np.zeros(len(ids), dtype=np.int64),
        domain_codes=np.zeros(len(ids), dtype=np.int64) if named else None,
        domain_names=[domain] if named else (),
    )


def _json_items(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RoutingImportError(f"{path}: not UTF-8 text; {_FIX}.") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise RoutingImportError(f"{where}: malformed JSON; one response per line.") from None
        items = obj if isinstance(obj, list) else [obj]
        for j, item in enumerate(items):
            if not isinstance(item, dict):
                raise RoutingImportError(f"{where}: expected a JSON object (a response); {_FIX}.")
            yield (f"{where}[{j}]" if isinstance(obj, list) else where), item


def _from_json(path: Path, shape: ModelShape) -> Iterator[Piece]:
    for where, resp in _json_items(path):
        domain = resp.get("domain")
        if "routed_experts" in resp:
            yield _piece(resp["routed_experts"], shape, where, domain)
            continue
        choices = resp.get("choices")
        if not isinstance(choices, list) or not choices:
            raise RoutingImportError(f"{where}: no routed_experts and no choices; {_FIX}.")
        for i, choice in enumerate(choices):
            value = choice.get("routed_experts") if isinstance(choice, dict) else None
            if value is None:
                raise RoutingImportError(
                    f"{where}: choices[{i}] has no routed_experts; serve with --enable-return-routed-experts."
                )
            yield _piece(value, shape, f"{where} choices[{i}]", domain)


def read_vllm(paths: Sequence[Path], shape: ModelShape) -> Iterator[Piece]:
    """Yield one piece (one document, tokens in order) per vLLM request.

    Raises:
        RoutingImportError: an unreadable or pickled array, a response without routed
            experts, or routing that does not fit ``shape``.
    """
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            try:
                data = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise RoutingImportError(f"{path}: refused or unreadable array ({exc}); {_FIX}.") from None
            except OSError as exc:
                raise RoutingImportError(f"{path}: not a numpy file ({exc}); {_FIX}.") from None
            if suffix == ".npy":
                yield _piece(data, shape, str(path))
            else:
                with data:
                    for name in data.files:
                        yield _piece(data[name], shape, f"{path}:{name}")
        elif suffix in (".json", ".jsonl"):
            yield from _from_json(path, shape)
        else:
            raise RoutingImportError(f"{path}: expected .npy, .npz, .json or .jsonl; {_FIX}.")
