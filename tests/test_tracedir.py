"""The trace directory module: one loader, one strictness level, tables equal to the files, no cycles.

Directories are written from synthetic :class:`TraceState` sums with
:func:`moescope.tracing.write_trace_dir` (no model needed) and read back with
:func:`moescope.tracedir.files.read_trace_dir`.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moescope.errors import TraceError
from moescope.tracedir.files import (
    CAPACITY,
    COACTIVATION,
    DOMAIN_LOAD,
    EXPERT_LOAD,
    EXPERT_LOAD_COLUMNS,
    STATE,
    SUMMARY,
    load_trace,
    read_trace_dir,
)
from moescope.tracedir.state import STATE_ARRAYS, TraceState
from moescope.tracing import write_trace_dir

_E = 4


def _state(domains: bool = True) -> TraceState:
    rng = np.random.default_rng(0)
    s = TraceState(layers=[1, 3], num_experts=_E, top_k=2, meta={"model": "synthetic"})
    s.tokens = 500
    s.counts[:] = rng.integers(0, 300, size=s.counts.shape)
    s.set_floats("weight", s.counts * 0.4)
    s.set_floats("out_norm", s.counts * 1.5)
    s.set_floats("wout_norm", s.counts * 0.6)
    s.coact[0, 0, 1] = 40
    s.coact[1, 2, 3] = 7
    if domains:
        for name in ("prose", "code"):
            d = s.domain_index(name)
            s.dom_counts[d] = s.counts // 2
    return s


def _write(tmp_path: Path, state: TraceState | None = None) -> Path:
    out = tmp_path / "t"
    write_trace_dir(out, state or _state(), timings={"trace_seconds": 1.0}, plots=False)
    return out


def test_loader_tables_equal_the_files(tmp_path: Path) -> None:
    trace = read_trace_dir(_write(tmp_path))
    assert trace.layers == [1, 3] and trace.num_experts == _E and trace.top_k == 2
    assert trace.model == "synthetic" and trace.lacks == []
    assert trace.domain_load is not None
    for frame, name in (
        (trace.expert_load, EXPERT_LOAD),
        (trace.coactivation, COACTIVATION),
        (trace.domain_load, DOMAIN_LOAD),
        (trace.capacity, CAPACITY),
    ):
        pd.testing.assert_frame_equal(frame, pd.read_csv(trace.path / name), check_dtype=False)
    assert tuple(trace.expert_load.columns) == EXPERT_LOAD_COLUMNS
    state, summary = load_trace(trace.path)  # the compatibility form: same reader
    assert np.array_equal(state.counts, trace.state.counts) and summary == trace.summary


def test_no_domains_means_no_domain_table(tmp_path: Path) -> None:
    trace = read_trace_dir(_write(tmp_path, _state(domains=False)))
    assert trace.domain_load is None
    assert not (trace.path / DOMAIN_LOAD).exists()


def test_state_arrays_are_declared_once(tmp_path: Path) -> None:
    out = _write(tmp_path)
    with zipfile.ZipFile(out / STATE) as zf:
        stored = [n.removesuffix(".npy") for n in zf.namelist()]
    assert stored == ["header", *STATE_ARRAYS]
    assert list(TraceState(layers=[0], num_experts=2, top_k=1).shapes()) == list(STATE_ARRAYS)


def test_lacked_columns_are_nan(tmp_path: Path) -> None:
    state = _state()
    state.meta["lacks"] = ["out_norms"]
    trace = read_trace_dir(_write(tmp_path, state))
    assert trace.lacks == ["out_norms"]
    assert trace.expert_load["out_norm_sum"].isna().all()
    assert trace.expert_load["weighted_out_norm_sum"].isna().all()
    assert trace.expert_load["weight_sum"].notna().all()


def _edit_summary(folder: Path, **changes: object) -> None:
    summary = json.loads((folder / SUMMARY).read_text())
    summary.update(changes)
    (folder / SUMMARY).write_text(json.dumps(summary))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / STATE).unlink(), "no state.npz"),
        (lambda d: (d / STATE).write_bytes(b"not a zip"), "state.npz: unreadable"),
        (lambda d: (d / SUMMARY).unlink(), "no summary.json"),
        (lambda d: (d / SUMMARY).write_text("{"), "summary.json: malformed JSON"),
        (lambda d: (d / SUMMARY).write_text("[]"), "summary.json: expected a JSON object"),
        (lambda d: _edit_summary(d, complete=False), "not marked complete"),
        (lambda d: _edit_summary(d, kind="similarity"), "similarity output, not a trace"),
        (lambda d: _edit_summary(d, num_experts=8), "summary.json: num_experts is 8"),
        (lambda d: _edit_summary(d, moe_layers=[0, 1]), "do not belong together"),
    ],
)
def test_loader_is_strict_and_names_the_file(tmp_path: Path, damage: object, match: str) -> None:
    out = _write(tmp_path)
    damage(out)  # type: ignore[operator]
    with pytest.raises(TraceError, match=match):
        read_trace_dir(out)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace directory"):
        read_trace_dir(tmp_path / "nope")
