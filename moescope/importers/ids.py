"""Read expert ids recorded by any other tool: a long Parquet table or a ``.npy`` array.

What:

- Parquet with one row per (token, layer, slot): columns ``layer`` (decoder layer index as
  in the checkpoint, like ``expert_load.csv``), ``token`` (the token's index: global, or
  within its document), ``expert`` (logical expert id), and optionally ``weight`` (the
  gate weight applied), ``doc`` (document id, any type) and ``domain`` (a name; null: none).
  With ``doc``, tokens of one document with consecutive ``token`` values are neighbours
  (expert reuse is measured); without it, token order is unknown.
- ``.npy`` ``[tokens, layers, k]`` integer array (``np.load(allow_pickle=False)``), layers
  either every decoder layer or only the MoE ones, ``-1`` for empty slots; no documents,
  so token order is unknown.

How: the Parquet rows are sorted by (document, token, layer), keeping file order within a
(token, layer) for the slots, and scattered into ``[tokens, moe_layers, top_k]``; the file
kind is told by its magic bytes, not its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moescope.importers.common import ModelShape, Piece, RoutingImportError, normalise, to_moe_layers

REQUIRED = ("layer", "token", "expert")
OPTIONAL = ("weight", "doc", "domain")


def file_kind(path: Path) -> str:
    """``parquet`` or ``npy``, from the magic bytes.

    Raises:
        RoutingImportError: neither.
    """
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    raise RoutingImportError(
        f"{path}: neither a Parquet file nor a .npy array; the ids format takes Parquet (columns "
        "layer, token, expert [, weight, doc, domain]) or a .npy array [tokens, layers, k]."
    )


def read_npy(path: Path, shape: ModelShape) -> Piece:
    """A ``[tokens, layers, k]`` array as one piece without token order."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode=None)
    except ValueError as exc:
        text = " ".join(str(exc).split())
        if "allow_pickle" in text:
            raise RoutingImportError(
                f"{path}: not a plain numeric .npy array (it holds Python objects, which are never "
                "unpickled); save the ids with np.save as an integer array [tokens, layers, k]."
            ) from None
        raise RoutingImportError(f"{path}: unreadable .npy file ({text}); truncated?") from None
    except (OSError, EOFError) as exc:
        raise RoutingImportError(f"{path}: unreadable .npy file ({exc}); truncated?") from None
    where = str(path)
    if not np.issubdtype(arr.dtype, np.integer):
        raise RoutingImportError(f"{where}: the array holds {arr.dtype}, expected integer expert ids.")
    ids = normalise(to_moe_layers(arr, shape, where), shape, where)
    return Piece(ids=ids, segments=None)


def _column(table: Any, name: str, path: Path) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise RoutingImportError(
            f"{path}: column {name!r} has {col.null_count} null value(s); fill or drop them."
        )
    return col.to_numpy()


def _int_column(table: Any, name: str, path: Path) -> np.ndarray:
    arr = _column(table, name, path)
    if not np.issubdtype(arr.dtype, np.integer):
        raise RoutingImportError(f"{path}: column {name!r} holds {arr.dtype}, expected integers.")
    return arr.astype(np.int64)


def _weight_column(table: Any, path: Path) -> np.ndarray:
    """The ``weight`` column as float64: numbers, finite and not negative (gate weights)."""
    arr = _column(table, "weight", path)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise RoutingImportError(
            f"{path}: column 'weight' holds {arr.dtype}, expected gate weights (floats)."
        )
    w = arr.astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        raise RoutingImportError(
            f"{path}: column 'weight' has {int(bad.sum())} value(s) that are NaN, infinite or negative "
            f"(first: {w[bad][0]}); gate weights are finite and not negative, fix or drop the column."
        )
    return w


def read_parquet(path: Path, shape: ModelShape) -> tuple[Piece, set[str]]:
    """A long ``layer, token, expert`` table as one piece; also returns the columns present.

    Raises:
        RoutingImportError: missing columns, nulls, layers that are not MoE layers, more
            than ``top_k`` rows for one token and layer, ids outside the model.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        present = [c for c in (*REQUIRED, *OPTIONAL) if c in schema.names]
        table = pq.read_table(path, columns=present)
    except Exception as exc:  # pyarrow raises its own types for truncated or foreign files
        raise RoutingImportError(f"{path}: unreadable Parquet file ({type(exc).__name__}: {exc}).") from None
    missing = [c for c in REQUIRED if c not in present]
    if missing:
        raise RoutingImportError(
            f"{path}: no column {', '.join(repr(m) for m in missing)} (found {schema.names[:8]}); the ids "
            "format needs layer, token, expert, one row per token, layer and top-k slot."
        )
    if table.num_rows == 0:
        raise RoutingImportError(f"{path}: the table has no rows; pass a recording with routing in it.")
    layer = _int_column(table, "layer", path)
    token = _int_column(table, "token", path)
    expert = _int_column(table, "expert", path)
    has_doc = "doc" in present
    doc = pd.factorize(table.column("doc").to_pandas(), use_na_sentinel=False)[0] if has_doc else None
    doc_key = np.zeros(len(token), dtype=np.int64) if doc is None else doc.astype(np.int64)
    order = np.lexsort((layer, token, doc_key))
    layer, token, expert, doc_key = layer[order], token[order], expert[order], doc_key[order]
    lookup = {v: i for i, v in enumerate(shape.moe_layers)}
    unknown = sorted(set(np.unique(layer).tolist()) - set(lookup))
    if unknown:
        raise RoutingImportError(
            f"{path}: layer {unknown[0]} is not a MoE layer of {shape.ref} (MoE layers: "
            f"{_span(shape.moe_layers)}); 'layer' is the decoder layer index as in the checkpoint."
        )
    li = np.searchsorted(np.asarray(shape.moe_layers), layer)
    n = len(token)
    new_tok = np.ones(n, dtype=bool)
    new_tok[1:] = (token[1:] != token[:-1]) | (doc_key[1:] != doc_key[:-1])
    t = np.cumsum(new_tok) - 1
    new_group = new_tok.copy()
    new_group[1:] |= li[1:] != li[:-1]
    starts = np.flatnonzero(new_group)
    slot = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    if int(slot.max()) >= shape.top_k:
        i = int(np.argmax(slot >= shape.top_k))
        raise RoutingImportError(
            f"{path}: token {int(token[i])} has more than top_k={shape.top_k} rows at layer {int(layer[i])}; "
            f"pass the --model the routing was recorded on, one row per top-k slot."
        )
    n_tok = int(t[-1]) + 1
    ids = np.full((n_tok, len(shape.moe_layers), shape.top_k), -1, dtype=np.int64)
    ids[t, li, slot] = expert
    ids = normalise(ids, shape, str(path))
    weights = None
    if "weight" in present:
        w = _weight_column(table, path)[order]
        weights = np.zeros(ids.shape, dtype=np.float64)
        weights[t, li, slot] = w
    first = np.flatnonzero(new_tok)
    segments = None
    if has_doc:
        tok_first = token[first]
        doc_first = doc_key[first]
        brk = np.ones(n_tok, dtype=bool)
        brk[1:] = (doc_first[1:] != doc_first[:-1]) | (tok_first[1:] != tok_first[:-1] + 1)
        segments = np.cumsum(brk)
    codes, names = None, []
    if "domain" in present:
        dom = table.column("domain").to_pandas()[order].reset_index(drop=True)
        dcodes, uniq = pd.factorize(dom, sort=True)
        if (dcodes != dcodes[first[t]]).any():
            raise RoutingImportError(f"{path}: one token has rows of different domains; give each token one.")
        if (dcodes >= 0).any():
            codes, names = dcodes[first].astype(np.int64), [str(u) for u in uniq]
    piece = Piece(ids=ids, weights=weights, segments=segments, domain_codes=codes, domain_names=names)
    return piece, set(present)


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 3:
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))
