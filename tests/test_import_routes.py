"""`moescope import`: routing recorded elsewhere becomes a trace whose counts equal the input.

Each format is written by the test with exactly its documented structure (``torch.save`` of
plain dicts for SGLang dumps, JSON lines with base64 for SGLang responses, a long Parquet
table and a ``.npy`` array for ``ids``) from routing known in advance, and the imported
sums are checked against a brute-force recount of that routing. The acceptance round trip
traces the demo model with ``--save-routes``, writes the same routing in every format,
imports it and compares ``expert_load.csv`` (and co-activation, reuse, capacity where the
format carries what they need) with the trace's own files. Hostile inputs each end in one
``Error:`` line.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from moescope.importers import FORMATS, STAT_LACKS, import_routes, model_shape
from moescope.tracedir.files import read_trace_dir
from tests.safety import assert_clean_error, invoke, snapshot

ROOT = Path(__file__).resolve().parent.parent
#: DeepSeek-V2-Lite: 27 decoder layers, layer 0 dense, 64 routed experts, top-6
DSV2 = ROOT / "sample_configs" / "DeepSeek-V2-Lite.json"


# --------------------------------------------------------------------------- known routing


def _routing(
    rng: np.random.Generator, n: int, n_layers: int, n_e: int, k: int, drop: float = 0.05
) -> np.ndarray:
    """``[n, n_layers, k]`` distinct experts per token and layer, some slots ``-1``."""
    ids = np.argsort(rng.random((n, n_layers, n_e)), axis=-1)[..., :k].astype(np.int64)
    ids[rng.random(ids.shape) < drop] = -1
    return ids


def _counts(ids: np.ndarray, n_e: int) -> np.ndarray:
    """``[L, E]`` brute force: per layer, tokens that have the expert in a slot."""
    out = np.zeros((ids.shape[1], n_e), dtype=np.int64)
    for t, li, s in itertools.product(range(ids.shape[0]), range(ids.shape[1]), range(ids.shape[2])):
        if ids[t, li, s] >= 0:
            out[li, ids[t, li, s]] += 1
    return out


def _coact(ids: np.ndarray, n_e: int) -> np.ndarray:
    out = np.zeros((ids.shape[1], n_e, n_e), dtype=np.int64)
    for t, li in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        chosen = sorted({int(e) for e in ids[t, li] if e >= 0})
        for a, b in itertools.combinations(chosen, 2):
            out[li, a, b] += 1
    return out


def _reuse(ids: np.ndarray, adjacent: list[tuple[int, int]]) -> np.ndarray:
    """Per layer: experts shared by each adjacent pair ``(i, j)``."""
    out = np.zeros(ids.shape[1], dtype=np.int64)
    for i, j in adjacent:
        for li in range(ids.shape[1]):
            a = {int(e) for e in ids[i, li] if e >= 0}
            b = {int(e) for e in ids[j, li] if e >= 0}
            out[li] += len(a & b)
    return out


def _b64(ids: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(ids).astype("<i4").tobytes()).decode()


def _long_table(ids: np.ndarray, layers: list[int], **per_token: np.ndarray) -> pd.DataFrame:
    """One row per (token, layer, filled slot), as the ids format documents."""
    rows: dict[str, list[Any]] = {"layer": [], "token": [], "expert": [], **{c: [] for c in per_token}}
    for t, li, s in itertools.product(range(ids.shape[0]), range(ids.shape[1]), range(ids.shape[2])):
        if ids[t, li, s] < 0:
            continue
        rows["layer"].append(layers[li])
        rows["expert"].append(int(ids[t, li, s]))
        for col, values in per_token.items():
            v = values[t]
            rows[col].append(v[li, s] if col == "weight" else v)
        rows["token"].append(int(per_token["token_index"][t]) if "token_index" in per_token else t)
    frame = pd.DataFrame(rows)
    return frame.drop(columns=["token_index"], errors="ignore")


# --------------------------------------------------------------------------- the demo round trip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo traced on its corpus with routes saved, and that routing in every format."""
    from moescope.corpus.read import read_corpus
    from moescope.tracing import run_trace

    work = tmp_path_factory.mktemp("import_demo")
    trace = work / "trace"
    run_trace("demo", "demo", trace, max_tokens=3000, save_routes=True, plots=False)
    routes = pd.concat(pd.read_parquet(p) for p in sorted((trace / "routes").glob("*.parquet")))
    routes = routes.reset_index(drop=True)
    summary = json.loads((trace / "summary.json").read_text())
    layers, seq = summary["moe_layers"], summary["seq_len"]
    ids = np.stack([np.stack(routes[f"layer{li}_experts"].to_numpy()) for li in layers], axis=1).astype(
        np.int64
    )
    token = (routes["window"] * seq + routes["position"]).to_numpy()
    doc = routes["doc"].to_numpy()
    docs = list(read_corpus(["demo"], split=summary["split"]))
    domain = np.array([docs[d].domain for d in doc])
    files = {}
    np.save(work / "routes.npy", ids)
    files["npy"] = ("ids", work / "routes.npy")
    table = _long_table(ids, layers, token_index=token, doc=doc, domain=domain)
    table.to_parquet(work / "routes.parquet")
    files["parquet"] = ("ids", work / "routes.parquet")
    with open(work / "responses.jsonl", "w") as fh:  # one /generate response per document
        for d in np.unique(doc):
            rows = np.flatnonzero(doc == d)
            fh.write(
                json.dumps({"text": "...", "meta_info": {"id": str(d), "routed_experts": _b64(ids[rows])}})
            )
            fh.write("\n")
    files["response"] = ("sglang-response", work / "responses.jsonl")
    records = []  # one forward pass per traced window, its documents as prefill segments; K = 8 slots
    window = routes["window"].to_numpy()
    for w in np.unique(window):
        rows = np.flatnonzero(window == w)
        topk = np.full((len(layers), len(rows), 8), -1, dtype=np.int32)
        topk[:, :, :2] = ids[rows].transpose(1, 0, 2)
        _, seg_lens = np.unique(doc[rows], return_counts=True)
        records.append(
            {
                "forward_pass_id": int(w),
                "rank": 0,
                "input_ids": routes["token_id"].to_numpy()[rows].tolist(),
                "positions": routes["position"].to_numpy()[rows].tolist(),
                "extend_seq_lens": seg_lens.tolist(),
                "forward_mode": 1,
                "topk_ids_of_layer": torch.from_numpy(topk),
            }
        )
    phys = torch.arange(summary["num_experts"], dtype=torch.int64).repeat(len(layers), 1)
    torch.save({"records": records, "last_physical_to_logical_map": phys}, work / "dump_0.pt")
    files["dump"] = ("sglang-dump", work / "dump_0.pt")
    return {"work": work, "trace": trace, "files": files, "ids": ids, "doc": doc, "token": token}


@pytest.mark.parametrize("name", ["npy", "parquet", "response", "dump"])
def test_round_trip_demo(demo: dict[str, Any], name: str) -> None:
    """Imported counts equal the trace's expert_load.csv; co-activation too; the rest as carried."""
    fmt, path = demo["files"][name]
    out = demo["work"] / f"imported_{name}"
    res = invoke(["import", fmt, path, "--model", "demo", "--out", out, "--no-plots", "--json"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["source"] == fmt
    ref, got = read_trace_dir(demo["trace"]), read_trace_dir(out)
    want_load = pd.read_csv(demo["trace"] / "expert_load.csv")
    got_load = pd.read_csv(out / "expert_load.csv")
    pd.testing.assert_frame_equal(
        got_load[["layer", "expert", "count"]], want_load[["layer", "expert", "count"]]
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "coactivation.csv"), pd.read_csv(demo["trace"] / "coactivation.csv")
    )
    assert got.state.tokens == ref.state.tokens == len(demo["ids"])
    # the fingerprint is the one a real trace of this checkpoint records: prune accepts the import
    assert summary["fingerprint"] == ref.summary["fingerprint"] is not None
    lacks = set(summary["lacks"])
    assert {"gate_weights", "out_norms"} <= lacks or name == "parquet"
    if name == "npy":  # no documents: no adjacency is invented
        assert "token_order" in lacks and got.state.reuse_pairs.sum() == 0
    else:
        assert "token_order" not in lacks
        np.testing.assert_array_equal(got.state.reuse, ref.state.reuse)
        np.testing.assert_array_equal(got.state.reuse_pairs, ref.state.reuse_pairs)
    if name in ("npy", "parquet", "response"):  # packed like the trace: same what-if batches
        np.testing.assert_array_equal(got.state.cap_dropped, ref.state.cap_dropped)
        np.testing.assert_array_equal(got.state.ep_batch_max, ref.state.ep_batch_max)
    if name == "parquet":  # domains came with the table
        assert "domains" not in lacks
        pd.testing.assert_frame_equal(
            got.domain_load[["domain", "layer", "expert", "count"]],
            ref.domain_load[["domain", "layer", "expert", "count"]],
        )
    else:
        assert "domains" in lacks


def test_prune_on_imported_demo(demo: dict[str, Any]) -> None:
    """prune --criterion frequency plans from an import as from the trace; reap names what is missing."""
    out = demo["work"] / "imported_prune"
    import_routes("sglang-response", [demo["files"]["response"][1]], model="demo", out=out, plots=False)
    plans = []
    for trace in (demo["trace"], out):
        res = invoke(
            [
                "prune",
                "demo",
                "--trace",
                trace,
                "--drop",
                "2",
                "--criterion",
                "frequency",
                "--dry-run",
                "--json",
            ]
        )
        assert res.exit_code == 0, res.stderr
        plans.append(json.loads(res.stdout))
    assert plans[0] == plans[1]
    res = invoke(["prune", "demo", "--trace", out, "--drop", "2", "--criterion", "reap", "--dry-run"])
    line = assert_clean_error(res, contains="gate_weights")
    assert "out_norms" in line
    assert invoke(["report", out]).exit_code == 0


# --------------------------------------------------------------------------- known routing, per format


@pytest.fixture(scope="module")
def dsv2() -> Any:
    return model_shape(str(DSV2))


def test_model_shape_from_config(dsv2: Any) -> None:
    cfg = json.loads(DSV2.read_text())
    assert dsv2.num_layers == cfg["num_hidden_layers"] == 27
    assert dsv2.moe_layers == list(range(cfg["first_k_dense_replace"], 27))
    assert (dsv2.num_experts, dsv2.top_k) == (cfg["n_routed_experts"], cfg["num_experts_per_tok"])


def _dump_record(fpid: int, rank: int, logical: np.ndarray, l2p: dict[int, list[int]], rng: Any, k_slots: int,
                 segments: list[int] | None) -> dict[str, Any]:  # fmt: skip
    """A per_token record over every decoder layer: physical ids (a random replica), K slots."""
    n, n_moe, k = logical.shape
    topk = np.full((27, n, k_slots), -1, dtype=np.int32)  # dense layer 0 stays -1
    for t, li, s in itertools.product(range(n), range(n_moe), range(k)):
        e = logical[t, li, s]
        if e >= 0:
            topk[li + 1, t, s] = rng.choice(l2p[int(e)])
    return {
        "forward_pass_id": fpid,
        "rank": rank,
        "input_ids": list(range(n)),
        "positions": list(range(n)),
        "extend_seq_lens": segments,
        "forward_mode": 1 if segments else 2,
        "topk_ids_of_layer": torch.from_numpy(topk),
    }


def test_sglang_dump_per_token(tmp_path: Path, dsv2: Any) -> None:
    """Ranks combine, a tensor-parallel copy counts once, replicas map to their logical expert."""
    rng = np.random.default_rng(1)
    n_e, k = dsv2.num_experts, dsv2.top_k
    # 66 physical experts: logical 0 and 5 replicated (EPLB), in a shuffled placement
    phys_to_log = np.concatenate([np.arange(n_e), [0, 5]])
    rng.shuffle(phys_to_log)
    l2p = {e: np.flatnonzero(phys_to_log == e).tolist() for e in range(n_e)}
    pmap = torch.from_numpy(np.tile(phys_to_log, (27, 1)))
    a = _routing(rng, 12, 26, n_e, k)
    b = _routing(rng, 9, 26, n_e, k)
    c = _routing(rng, 5, 26, n_e, k)
    rank0 = [_dump_record(0, 0, a, l2p, rng, 8, [7, 5]), _dump_record(1, 0, c, l2p, rng, 8, None)]
    torch.save({"records": rank0, "last_physical_to_logical_map": pmap}, tmp_path / "r0.pt")
    tp_copy = [dict(r, rank=1) for r in rank0]  # tensor parallelism: rank 1 recorded the same passes
    torch.save({"records": tp_copy, "last_physical_to_logical_map": pmap}, tmp_path / "r1.pt")
    dp = [_dump_record(0, 2, b, l2p, rng, 8, [9])]  # data-parallel attention: other tokens, same pass id
    torch.save({"records": dp, "last_physical_to_logical_map": pmap}, tmp_path / "r2.pt")
    res = import_routes(
        "sglang-dump",
        [tmp_path / f"r{i}.pt" for i in range(3)],
        model=str(DSV2),
        out=tmp_path / "t",
        plots=False,
    )
    assert res.records == 3 and res.duplicates == 2
    allids = np.concatenate([a, c, b])
    got = read_trace_dir(tmp_path / "t")
    np.testing.assert_array_equal(got.state.counts, _counts(allids, n_e))
    np.testing.assert_array_equal(got.state.coact, _coact(allids, n_e))
    assert got.state.tokens == 26 and got.layers == list(range(1, 27))
    adjacent = [(i, i + 1) for i in range(6)] + [(i, i + 1) for i in range(7, 11)]  # prefill segments 7 + 5
    adjacent += [(12 + 5 + i, 12 + 5 + i + 1) for i in range(8)]  # rank 2's segment of 9; decode: none
    np.testing.assert_array_equal(got.state.reuse, _reuse(allids, adjacent))
    assert int(got.state.reuse_pairs[0]) == len(adjacent)
    assert int(got.state.router_dropped.sum()) == int((allids < 0).sum())
    assert got.summary["lacks"] == ["domains", "gate_weights", "out_norms"]
    assert got.summary["source"] == "sglang-dump"
    json.dumps(res.to_dict())  # the API result is JSON-ready


def test_sglang_dump_stat(tmp_path: Path, dsv2: Any) -> None:
    """Counts only: load equals the logical counts at the MoE layers; the rest is declared lacking."""
    rng = np.random.default_rng(2)
    steps = [rng.integers(0, 40, (3, 27, dsv2.num_experts)), rng.integers(0, 40, (2, 27, dsv2.num_experts))]
    for i, lc in enumerate(steps):
        torch.save({"rank": 0, "logical_count": torch.from_numpy(lc.astype(np.int32)),
                    "average_utilization_rate_over_window": None}, tmp_path / f"s{i}.pt")  # fmt: skip
    res = invoke(["import", "sglang-dump", tmp_path / "s0.pt", tmp_path / "s1.pt", "--model", DSV2,
                  "--out", tmp_path / "t", "--no-plots", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    want = sum(lc.sum(axis=0) for lc in steps)[1:]
    load = pd.read_csv(tmp_path / "t" / "expert_load.csv")
    np.testing.assert_array_equal(load["count"].to_numpy().reshape(26, -1), want)
    assert set(summary["lacks"]) == set(STAT_LACKS)
    assert summary["tokens"] == sum(int(np.ceil(lc[:, 1:].sum(axis=2).max(axis=1) / 6).sum()) for lc in steps)
    assert pd.read_csv(tmp_path / "t" / "coactivation.csv").empty
    assert invoke(["report", tmp_path / "t"]).exit_code == 0


def test_sglang_response(tmp_path: Path, dsv2: Any) -> None:
    """Every decoder layer in the payload (dense ones -1), one document per response, domains if given."""
    rng = np.random.default_rng(3)
    n_e, k = dsv2.num_experts, dsv2.top_k
    docs = [_routing(rng, n, 26, n_e, k) for n in (6, 1, 11)]
    doms = ["code", None, "prose"]
    lines = []
    for ids, dom in zip(docs, doms, strict=True):
        full = np.full((len(ids), 27, k), -1, dtype=np.int64)
        full[:, 1:] = ids
        resp: dict[str, Any] = {"text": "x", "meta_info": {"routed_experts": _b64(full)}}
        if dom:
            resp["domain"] = dom
        lines.append(json.dumps(resp))
    (tmp_path / "a.jsonl").write_text(lines[0] + "\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps([json.loads(line) for line in lines[1:]]) + "\n")  # a batch
    import_routes("sglang-response", [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], model=str(DSV2),
                  out=tmp_path / "t", plots=False)  # fmt: skip
    got = read_trace_dir(tmp_path / "t")
    allids = np.concatenate(docs)
    np.testing.assert_array_equal(got.state.counts, _counts(allids, n_e))
    adjacent = [(i, i + 1) for i in range(5)] + [(7 + i, 8 + i) for i in range(10)]
    np.testing.assert_array_equal(got.state.reuse, _reuse(allids, adjacent))
    assert got.state.domains == ["code", "prose"] and "domains" not in got.lacks
    np.testing.assert_array_equal(got.state.dom_counts[0], _counts(docs[0], n_e))
    np.testing.assert_array_equal(got.state.dom_counts[1], _counts(docs[2], n_e))


def test_ids_parquet_weights_domains_gaps(tmp_path: Path) -> None:
    """Weights are summed, domains kept, and only consecutive tokens of one document are neighbours."""
    shape = model_shape("demo")
    rng = np.random.default_rng(4)
    ids = _routing(rng, 20, 4, shape.num_experts, shape.top_k)
    weights = rng.random(ids.shape)
    doc = np.array(["b"] * 8 + ["a"] * 12)
    token = np.array(list(range(8)) + list(range(5)) + list(range(7, 14)))  # doc a: a gap after token 4
    domain = np.array(["x"] * 8 + ["y"] * 12)
    table = _long_table(ids, shape.moe_layers, token_index=token, doc=doc, domain=domain, weight=weights)
    table.sample(frac=1.0, random_state=0).to_parquet(tmp_path / "r.parquet")  # rows in any order
    res = import_routes("ids", [tmp_path / "r.parquet"], model="demo", out=tmp_path / "t", plots=False,
                        seq_len=64)  # fmt: skip
    got = read_trace_dir(tmp_path / "t")
    assert res.lacks == ["out_norms"]
    np.testing.assert_array_equal(got.state.counts, _counts(ids, shape.num_experts))
    wsum = np.zeros((4, shape.num_experts))
    for t, li, s in itertools.product(range(20), range(4), range(2)):
        if ids[t, li, s] >= 0:
            wsum[li, ids[t, li, s]] += weights[t, li, s]
    np.testing.assert_allclose(got.expert_load["weight_sum"].to_numpy().reshape(4, -1), wsum, atol=1e-5)
    adjacent = (
        [(i, i + 1) for i in range(7)]
        + [(8 + i, 9 + i) for i in range(4)]
        + [(13 + i, 14 + i) for i in range(6)]
    )
    np.testing.assert_array_equal(got.state.reuse, _reuse(ids, adjacent))
    assert int(got.state.reuse_pairs[0]) == len(adjacent)
    np.testing.assert_array_equal(got.state.dom_counts[got.state.domains.index("y")], _counts(ids[8:], 8))


def test_npy_every_decoder_layer_and_wide_k(tmp_path: Path, dsv2: Any) -> None:
    """``[tokens, all layers, K > k]`` with -1 padding: compacted to the MoE layers' top-k."""
    rng = np.random.default_rng(5)
    ids = _routing(rng, 15, 26, dsv2.num_experts, dsv2.top_k)
    wide = np.full((15, 27, 9), -1, dtype=np.int32)
    for t, li in itertools.product(range(15), range(26)):
        slots = rng.permutation(9)[: dsv2.top_k]  # the ids sit in any of the 9 slots
        wide[t, li + 1, np.sort(slots)] = ids[t, li]
    np.save(tmp_path / "r.npy", wide)
    import_routes("ids", [tmp_path / "r.npy"], model=str(DSV2), out=tmp_path / "t", plots=False)
    got = read_trace_dir(tmp_path / "t")
    np.testing.assert_array_equal(got.state.counts, _counts(ids, dsv2.num_experts))
    np.testing.assert_array_equal(got.state.coact, _coact(ids, dsv2.num_experts))
    assert "token_order" in got.lacks and int(got.state.reuse_pairs.sum()) == 0


# --------------------------------------------------------------------------- hostile inputs


class _Evil:
    """Unpickling this would create a directory (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.marker),))


def test_pickle_with_objects_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"records": [_Evil(marker)]}, tmp_path / "evil.pt")
    res = invoke(["import", "sglang-dump", tmp_path / "evil.pt", "--model", "demo", "--out", tmp_path / "t"])
    assert_clean_error(res, contains="refused")
    assert not marker.exists() and not (tmp_path / "t").exists()


def _bad_inputs(tmp: Path) -> list[tuple[str, list[Any], str]]:
    """(case, argv, expected text in the error line)."""
    rng = np.random.default_rng(6)
    good = _routing(rng, 4, 4, 8, 2, drop=0.0)
    np.save(tmp / "three_layers.npy", good[:, :3])
    big = good.copy()
    big[0, 0, 0] = 8
    np.save(tmp / "expert8.npy", big)
    three = np.concatenate([good, np.full((4, 4, 1), -1)], axis=-1)
    three[0, 1] = [1, 2, 3]
    np.save(tmp / "three_experts.npy", three)
    np.save(tmp / "floats.npy", good.astype(np.float32))
    np.save(tmp / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    text = _b64(good)
    (tmp / "trunc.jsonl").write_text(json.dumps({"meta_info": {"routed_experts": text[:-3]}}) + "\n")
    (tmp / "short.jsonl").write_text(
        json.dumps({"meta_info": {"routed_experts": _b64(good.reshape(-1)[:-2])}}) + "\n"
    )
    (tmp / "nometa.jsonl").write_text(json.dumps({"text": "hi", "meta_info": {}}) + "\n")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "garbage.pt").write_bytes(b"not a torch file at all")
    torch.save(
        {"records": [{"topk_ids_of_layer": torch.zeros(5, 3, 2, dtype=torch.int32)}]}, tmp / "layers5.pt"
    )
    torch.save({"rank": 0, "logical_count": torch.zeros(1, 4, 6, dtype=torch.int32)}, tmp / "stat_e6.pt")
    _long_table(good, [0, 1, 2, 7]).to_parquet(tmp / "layer7.parquet")
    _long_table(good, [0, 1, 2, 3]).drop(columns=["token"]).to_parquet(tmp / "notoken.parquet")
    np.save(tmp / "ok.npy", _routing(rng, 3, 4, 8, 2))
    foreign = tmp / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    demo = ["--model", "demo", "--out", tmp / "t"]
    return [
        ("wrong layer count", ["ids", tmp / "three_layers.npy", *demo], "3 layers"),
        ("expert id >= E", ["ids", tmp / "expert8.npy", *demo], "outside 0..7"),
        ("more than top_k", ["ids", tmp / "three_experts.npy", *demo], "top_k=2"),
        ("float ids", ["ids", tmp / "floats.npy", *demo], "integer"),
        ("object npy", ["ids", tmp / "objects.npy", *demo], "not a plain numeric"),
        ("truncated base64", ["sglang-response", tmp / "trunc.jsonl", *demo], "base64"),
        ("partial token", ["sglang-response", tmp / "short.jsonl", *demo], "whole number of tokens"),
        (
            "no routed_experts",
            ["sglang-response", tmp / "nometa.jsonl", *demo],
            "--enable-return-routed-experts",
        ),
        ("empty file", ["sglang-dump", tmp / "empty.pt", *demo], "empty"),
        ("not torch", ["sglang-dump", tmp / "garbage.pt", *demo], "torch.save"),
        ("dump layers", ["sglang-dump", tmp / "layers5.pt", *demo], "5 layers"),
        ("stat experts", ["sglang-dump", tmp / "stat_e6.pt", *demo], "6 experts"),
        ("dense layer in table", ["ids", tmp / "layer7.parquet", *demo], "layer 7 is not a MoE layer"),
        ("missing column", ["ids", tmp / "notoken.parquet", *demo], "'token'"),
        ("nonexistent", ["ids", tmp / "nope.npy", *demo], "no such file"),
        ("same file twice", ["ids", tmp / "expert8.npy", tmp / "expert8.npy", *demo], "twice"),
        (
            "dense model",
            ["ids", tmp / "expert8.npy", "--model", "demo-dense", "--out", tmp / "t"],
            "no routed experts",
        ),
        ("foreign --out", ["ids", tmp / "ok.npy", "--model", "demo", "--out", foreign], "mine"),
    ]


def test_hostile_inputs_one_error_line(tmp_path: Path) -> None:
    cases = _bad_inputs(tmp_path)
    before = snapshot(tmp_path)
    for case, argv, text in cases:
        res = invoke(["import", *argv])
        line = assert_clean_error(res)
        assert text.lower() in line.lower(), (case, line)
    assert snapshot(tmp_path) == before  # inputs and the foreign directory untouched, nothing written
    assert not (tmp_path / "t").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    np.save(tmp_path / "r.npy", np.zeros((2, 4, 2), dtype=np.int64))
    assert_clean_error(
        invoke(["import", "tensorrt-llm", tmp_path / "r.npy", "--model", "demo", "--out", tmp_path / "t"]), 2
    )
    res = invoke(
        ["import", "ids", tmp_path / "r.npy", "--model", "demo", "--out", tmp_path / "t", "--seq-len", "0"]
    )
    assert_clean_error(res, 2)


# --------------------------------------------------------------------------- CLI contract


def test_formats_match_cli() -> None:
    from moescope.cli import import_

    assert import_.FORMATS == FORMATS


@pytest.mark.slow
def test_help_examples_run(tmp_path: Path, demo: dict[str, Any]) -> None:
    """Every example line of ``moescope import --help`` runs on the demo (files it names provided)."""
    from moescope.cli import import_

    shutil.copy(demo["files"]["dump"][1], tmp_path / "expert_distribution_recorder_1.0_0.pt")
    shutil.copy(demo["files"]["response"][1], tmp_path / "responses.jsonl")
    shutil.copy(demo["files"]["parquet"][1], tmp_path / "routes.parquet")
    shutil.copy(demo["files"]["npy"][1], tmp_path / "routes.npy")
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "moescope").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m moescope "$@"\n')
    (bin_dir / "moescope").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    lines = [re.split(r"\s{2,}(?:#|\()", ln.strip())[0] for ln in import_.EXAMPLES.splitlines()
             if ln.strip().startswith("moescope ")]  # fmt: skip
    assert len(lines) >= 3
    for line in lines:
        res = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, (line, res.stderr[-2000:])
        assert "Traceback" not in res.stderr
