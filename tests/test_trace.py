"""Trace directories: invariants, independent recomputation, exact shard merge, CLI errors.

A tiny random Qwen3-MoE (hidden 32, 2 layers, 4 experts, top-2, vocab 99) with a
character-level tokenizer is saved once per session; traces run over a small generated
corpus in two domains. Numbers in the trace are checked against the per-token routes
(``--save-routes``) and against expert outputs recomputed from the raw weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from moescope.cli.app import app
from moescope.errors import CorpusError, TraceError
from moescope.tracing import CAPACITY_FACTORS, EP_DEGREES, TraceState, load_trace, merge_traces, trace_model

_H, _E, _K, _VOCAB = 32, 4, 2, 99
_SEQ, _BATCH = 16, 3
#: tokens per capacity group in these tests: groups straddle batches (3 x 16 tokens)
_GROUP = 40


def _tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)]
    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]"
    )


def _model() -> Any:
    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim goes through **kwargs
        vocab_size=_VOCAB, hidden_size=_H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, moe_intermediate_size=16, num_experts=_E, num_experts_per_tok=_K, head_dim=8,
        norm_topk_prob=True, eos_token_id=1, pad_token_id=2, max_position_embeddings=64,
    )  # fmt: skip
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    model.set_experts_implementation("eager")
    return model


@dataclass
class Doc:
    text: str
    domain: str | None
    doc_id: str = ""


def _docs(n: int = 30) -> list[Doc]:
    out = []
    for i in range(n):
        if i % 2:
            out.append(Doc(f"def f{i}(x):\n    return x * {i} + {i % 7}\n", "code"))
        else:
            out.append(Doc(f"The {i}th note says hello to the world {'again ' * (i % 5)}.", "prose"))
    return out


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return _model(), _tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    _model().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def full_trace(tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = tiny
    out = tmp_path_factory.mktemp("traces") / "full"
    trace_model(
        model, tok, _docs(), out, seq_len=_SEQ, batch_size=_BATCH, save_routes=True, plots=False,
        capacity_group=_GROUP,
    )  # fmt: skip
    return out


def _stream_len(tok: Any, docs: list[Doc]) -> int:
    return sum(len(tok(d.text, add_special_tokens=False)["input_ids"]) + 1 for d in docs)


def _routes(trace: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((trace / "routes").glob("*.parquet"))])


# ----------------------------------------------------------------------------- invariants


def test_counts_sum_to_tokens_times_top_k(full_trace: Path, tiny: tuple[Any, Any]) -> None:
    summary = json.loads((full_trace / "summary.json").read_text())
    expected_tokens = _stream_len(tiny[1], _docs())
    assert summary["complete"] is True
    assert summary["tokens"] == expected_tokens  # padding of the last window is masked out
    assert expected_tokens % _SEQ != 0, "the corpus should end in a padded window"
    load = pd.read_csv(full_trace / "expert_load.csv")
    assert sorted(load["layer"].unique()) == summary["moe_layers"] == [0, 1]
    for _, group in load.groupby("layer"):
        assert int(group["count"].sum()) == expected_tokens * _K
    assert "EOS appended" in summary["packing"]
    assert summary["domains"] == ["code", "prose"]


def test_aggregates_equal_recomputation_from_routes(full_trace: Path) -> None:
    routes = _routes(full_trace)
    state, summary = load_trace(full_trace)
    load = pd.read_csv(full_trace / "expert_load.csv")
    coact = pd.read_csv(full_trace / "coactivation.csv")
    domains = pd.read_csv(full_trace / "domain_load.csv")
    doc_domain = {i: d.domain for i, d in enumerate(_docs())}
    routes = routes.sort_values(["window", "position"]).reset_index(drop=True)
    for li, layer in enumerate(summary["moe_layers"]):
        ids = np.stack(routes[f"layer{layer}_experts"].to_numpy()).astype(int)
        w = np.stack(routes[f"layer{layer}_weights"].to_numpy()).astype(float)
        rows = load[load.layer == layer].set_index("expert")
        for e in range(_E):
            assert rows.loc[e, "count"] == int((ids == e).sum())
            assert math.isclose(
                rows.loc[e, "weight_sum"], float(w[ids == e].sum()), rel_tol=1e-5, abs_tol=1e-4
            )
        # co-activation: every pair in a token's top-k
        for a in range(_E):
            for b in range(a + 1, _E):
                n = int((((ids == a).any(1)) & ((ids == b).any(1))).sum())
                got = coact[(coact.layer == layer) & (coact.expert_a == a) & (coact.expert_b == b)]["count"]
                assert (int(got.iloc[0]) if len(got) else 0) == n
        # consecutive reuse within a window and a document
        same_win = routes["window"].to_numpy()[1:] == routes["window"].to_numpy()[:-1]
        same_doc = routes["doc"].to_numpy()[1:] == routes["doc"].to_numpy()[:-1]
        adj = same_win & same_doc
        overlap = sum(len(set(ids[t + 1]) & set(ids[t])) for t in np.nonzero(adj)[0])
        assert int(state.reuse[li]) == overlap
        assert int(state.reuse_pairs[li]) == int(adj.sum())
        # capacity drops, group by group (_GROUP consecutive tokens of the stream; the last is short)
        group = np.arange(len(ids)) // _GROUP
        assert group.max() >= 3 and len(ids) % _GROUP, "several groups, the last one short"
        for j, cf in enumerate(CAPACITY_FACTORS):
            dropped = 0
            for g in np.unique(group):
                sel = ids[group == g]
                cap = math.ceil(cf * len(sel) * _K / _E)
                dropped += sum(max(0, int((sel == e).sum()) - cap) for e in range(_E))
            assert int(state.cap_dropped[li, j]) == dropped
        assert not state.cap_open and summary["capacity_group"] == _GROUP
        # counts per corpus half (document parity)
        parity = routes["doc"].to_numpy() % 2
        for h in (0, 1):
            assert state.half_counts[h, li].tolist() == [
                int((ids[parity == h] == e).sum()) for e in range(_E)
            ]
        # distinct devices per token under contiguous placement
        for j, deg in enumerate(EP_DEGREES):
            if _E % deg == 0:
                distinct = sum(len(set(row // (_E // deg))) for row in ids)
                assert int(state.ep_distinct[li, j]) == distinct
        # per-domain counts
        dom = routes["doc"].map(doc_domain).to_numpy()
        for name in ("code", "prose"):
            got = domains[(domains.domain == name) & (domains.layer == layer)].set_index("expert")["count"]
            for e in range(_E):
                assert int(got.loc[e]) == int((ids[dom == name] == e).sum())


def test_norms_equal_independent_expert_outputs(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """Recompute each routed expert's output from the raw weights on the block's input."""
    model, tok = tiny
    docs = _docs(4)
    out = tmp_path / "t"
    trace_model(model, tok, docs, out, seq_len=64, max_tokens=64, save_routes=True, plots=False)
    # the same single batch, run again with plain pre-hooks capturing each MoE block's input
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().reshape(-1, _H))
        )
        for i in range(2)
    ]
    ids_stream: list[int] = []
    for d in docs:
        ids_stream += tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids_stream = ids_stream[:64]  # --max-tokens 64: exactly one window
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids_stream]), use_cache=False)
    for h in handles:
        h.remove()
    routes = _routes(out).sort_values("position")
    assert len(routes) == len(ids_stream)
    load = pd.read_csv(out / "expert_load.csv")
    for layer in (0, 1):
        ex = model.model.layers[layer].mlp.experts
        ids = np.stack(routes[f"layer{layer}_experts"].to_numpy()).astype(int)
        w = np.stack(routes[f"layer{layer}_weights"].to_numpy()).astype(float)
        norm_sum = np.zeros(_E)
        wnorm_sum = np.zeros(_E)
        for t in range(len(ids_stream)):
            x = inputs[layer][t]
            for j in range(_K):
                e = ids[t, j]
                with torch.no_grad():
                    gate, up = (ex.gate_up_proj[e] @ x).chunk(2)
                    y = ex.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                norm_sum[e] += float(y.norm())
                wnorm_sum[e] += float(y.norm()) * abs(w[t, j])
        got = load[load.layer == layer].sort_values("expert")
        np.testing.assert_allclose(got["out_norm_sum"], norm_sum, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["weighted_out_norm_sum"], wnorm_sum, rtol=1e-4, atol=1e-4)
        assert (norm_sum > 0).any()


# ----------------------------------------------------------------------------- shards


def test_merge_of_shards_equals_unsharded_run(
    full_trace: Path, tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = tiny
    shards = []
    for i in range(2):
        d = tmp_path / f"s{i}"
        trace_model(model, tok, _docs(), d, seq_len=_SEQ, batch_size=_BATCH, shard=(i, 2), save_routes=True,
                    plots=False, capacity_group=_GROUP)  # fmt: skip
        shards.append(d)
    s0, _ = load_trace(shards[0])
    s1, _ = load_trace(shards[1])
    assert 0 < s0.tokens and 0 < s1.tokens  # both shards did work
    assert s0.cap_open and s1.cap_open  # groups straddle the shards' batches: each saw parts
    merged = tmp_path / "merged"
    merge_traces(shards, merged, plots=False)
    for name in ("expert_load.csv", "coactivation.csv", "domain_load.csv", "capacity.csv"):
        assert (merged / name).read_bytes() == (full_trace / name).read_bytes(), name
    a, sa = load_trace(merged)
    b, sb = load_trace(full_trace)
    for field in ("counts", "weight_fx", "out_norm_fx", "wout_norm_fx", "coact", "top1_hist", "cap_dropped",
                  "ep_distinct", "ep_batch_max", "reuse", "dom_counts", "half_counts"):  # fmt: skip
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    skip = {"timings", "shard", "files", "owned_files", "run_id", "merged_run_ids"}
    assert {k: v for k, v in sa.items() if k not in skip} == {k: v for k, v in sb.items() if k not in skip}
    pd.testing.assert_frame_equal(
        _routes(merged).sort_values(["window", "position"]).reset_index(drop=True),
        _routes(full_trace).sort_values(["window", "position"]).reset_index(drop=True),
    )
    with pytest.raises(TraceError, match="missing"):
        merge_traces(shards[:1], tmp_path / "bad", plots=False)


# ----------------------------------------------------------------------------- robustness


def test_interrupted_trace_leaves_nothing(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny

    def boom(done: int, total: int | None) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trace_model(model, tok, _docs(), tmp_path / "t", seq_len=_SEQ, progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_and_missing_traces_are_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace directory"):
        load_trace(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(TraceError, match="incomplete"):
        load_trace(tmp_path / "half")
    (tmp_path / "half" / "summary.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(TraceError, match="not marked complete"):
        load_trace(tmp_path / "half")


def test_empty_corpus_is_an_error(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no tokens"):
        trace_model(*tiny, [Doc("", None)], tmp_path / "t")


_MEMORY_CHILD = r"""
import resource, sys, torch
from moescope.tracing import trace_model
from tests.tiny import char_tokenizer, tiny_model

class Doc:
    def __init__(self, text, domain):
        self.text, self.domain = text, domain

torch.manual_seed(0)
model, tok = tiny_model("mixtral", vocab_size=128), char_tokenizer()
tokens = int(sys.argv[2])
docs = (Doc("def f(x): return x + 1\n" * 40, ("code", "prose")[i % 2]) for i in range(tokens // 900 + 1))
trace_model(model, tok, docs, sys.argv[1], seq_len=64, batch_size=8, max_tokens=tokens, plots=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    """Peak RSS of a fresh process tracing 4k tokens vs 40x more: the aggregation is online."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    peaks = []
    for tokens in (4_000, 160_000):
        res = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / f"t{tokens}"), str(tokens)],
            cwd=root, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        peaks.append(int(res.stdout.split()[-1]))
    small, large = peaks
    assert json.loads((tmp_path / "t160000" / "summary.json").read_text())["tokens"] == 160_000
    assert large <= small * 1.10, f"peak RSS grew from {small} KiB to {large} KiB"


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_trace_report_merge(tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("moescope.corpus.read")
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d.text, "domain": d.domain}) for d in _docs(12)]
    corpus.write_text("\n".join([*lines, json.dumps({"text": "", "domain": "code"})]) + "\n")
    runner = CliRunner()
    outs = []
    for spec in ("0/2", "1/2"):
        out = tmp_path / f"s{spec[0]}"
        res = runner.invoke(
            app,
            ["trace", str(tiny_dir), str(corpus), "--out", str(out), "--seq-len", "16", "--batch-size", "2",
             "--shard", spec, "--json", "--no-plots"],
            catch_exceptions=False,
        )  # fmt: skip
        assert res.exit_code == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["shard"] == {"index": int(spec[0]), "count": 2}
        assert summary["corpus_stats"]["empty_documents"] == 1
        outs.append(out)
    res = runner.invoke(app, ["merge", *map(str, outs), "--out", str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.stderr
    merged = json.loads(res.stdout)
    assert merged["tokens"] == _stream_len(_tokenizer(), _docs(12))
    res = runner.invoke(app, ["report", str(tmp_path / "m"), "--json"], catch_exceptions=False)
    assert res.exit_code == 0
    rep = json.loads(res.stdout)
    assert [r["layer"] for r in rep["layers"]] == [0, 1]
    res = runner.invoke(app, ["report", str(tmp_path / "m")], catch_exceptions=False)
    assert res.exit_code == 0 and "max/mean" in res.stdout


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_cli_dense_model_is_one_error_line(tmp_path: Path) -> None:
    pytest.importorskip("moescope.corpus.read")
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    cfg = tf.LlamaConfig(vocab_size=_VOCAB, hidden_size=_H, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37)  # fmt: skip
    tf.LlamaForCausalLM(cfg).save_pretrained(dense)
    _tokenizer().save_pretrained(dense)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world")
    res = CliRunner().invoke(app, ["trace", str(dense), str(corpus), "--out", str(tmp_path / "t")])
    assert res.exit_code == 1
    line = _one_error_line(res.stderr)
    assert "no routed experts" in line and "demo" in line
    assert not (tmp_path / "t").exists()


def test_cli_missing_and_incomplete_trace(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 1
    assert "no such trace directory" in _one_error_line(res.stderr)
    half = tmp_path / "half"
    half.mkdir()
    (half / "summary.json").write_text(json.dumps({"complete": False}))
    for args in (["report", str(half)], ["merge", str(half), str(half), "--out", str(tmp_path / "m")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1
        assert "complete" in _one_error_line(res.stderr)


def test_cli_bad_shard_is_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["trace", "demo", "demo", "--out", str(tmp_path / "t"), "--shard", "2/2"])
    assert res.exit_code == 2


def test_state_roundtrip_and_add(tmp_path: Path) -> None:
    s = TraceState(layers=[1, 3], num_experts=4, top_k=2, meta={"model": "x"})
    s.counts[:] = [[1, 2, 3, 4], [4, 3, 2, 1]]
    s.domain_index("b")
    s.domain_index("a")
    s.dom_counts[0, 0, 0] = 7
    s.save(tmp_path / "state.npz")
    t = TraceState.load(tmp_path / "state.npz")
    assert t.layers == [1, 3] and t.domains == ["b", "a"] and int(t.dom_counts[0, 0, 0]) == 7
    t.add(s)
    assert t.counts.tolist() == [[2, 4, 6, 8], [8, 6, 4, 2]]
    t.canonical()
    assert t.domains == ["a", "b"] and int(t.dom_counts[1, 0, 0]) == 14
    with pytest.raises(TraceError, match="different models"):
        t.add(TraceState(layers=[0], num_experts=4, top_k=2))


# ----------------------------------------------------------------------------- baselines


def test_capacity_does_not_depend_on_batch_size(tmp_path: Path) -> None:
    """The demo at two batch sizes: identical capacity.csv (per-batch drops differed)."""
    from moescope.tracing import run_trace

    outs = []
    for bs in (2, 5):
        out = tmp_path / f"b{bs}"
        run_trace("demo", "demo", out, seq_len=64, batch_size=bs, max_tokens=3000, capacity_group=512,
                  plots=False, save_routes=True)  # fmt: skip
        outs.append(out)
    assert (outs[0] / "capacity.csv").read_bytes() == (outs[1] / "capacity.csv").read_bytes()
    cap = pd.read_csv(outs[0] / "capacity.csv")
    assert cap[cap.capacity_factor == 1.0].dropped.gt(0).all()
    # what per-batch groups would have given: it moves with the batch size
    per_batch = []
    for out, bs in zip(outs, (2, 5), strict=True):
        routes = _routes(out).sort_values(["window", "position"])
        ids = np.stack(routes["layer1_experts"].to_numpy()).astype(int)
        batch = routes["window"].to_numpy() // bs
        per_batch.append(sum(
            max(0, int((ids[batch == b] == e).sum()) - math.ceil(len(ids[batch == b]) * 2 / 8))
            for b in np.unique(batch) for e in range(8)
        ))  # fmt: skip
    assert per_batch[0] != per_batch[1]
    assert json.loads((outs[0] / "summary.json").read_text())["capacity_group"] == 512


def test_checkpoint_dtype_is_recorded(tmp_path: Path) -> None:
    """A bf16 checkpoint traced in float32: the all-to-all estimate uses 2 bytes, not 4."""
    from moescope.stats.report import build_report
    from moescope.tracing import run_trace

    ckpt = tmp_path / "bf16"
    _model().to(torch.bfloat16).save_pretrained(ckpt)
    _tokenizer().save_pretrained(ckpt)
    out = tmp_path / "t"
    run_trace(str(ckpt), "demo", out, dtype="float32", seq_len=_SEQ, max_tokens=200, plots=False)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dtype"], summary["checkpoint_dtype"]) == ("float32", "bfloat16")
    rep = build_report(out)
    assert rep.a2a == {"dtype": "bfloat16", "bytes": 2, "source": "checkpoint"}
    row = rep.expert_parallel.iloc[0]
    assert row.bytes_per_token == pytest.approx(_K * (row.degree - 1) / row.degree * _H * 2 * 2)


def test_reducer_counts_devices_with_unrouted_slots() -> None:
    """Distinct devices per token (contiguous placement) and co-activation when some slots are
    unrouted (-1: a switch drop, an imported dump's padding), against a brute-force count."""
    from moescope.execution.routing import LayerRecord
    from moescope.tracing.reduce import Reducer

    gen = torch.Generator().manual_seed(3)
    n_e, k, bsz, seq = 16, 4, 3, 40
    records, all_ids = [], []
    for _ in range(2):  # two layers
        ids = torch.stack([torch.randperm(n_e, generator=gen)[:k] for _ in range(bsz * seq)])
        ids[torch.rand(ids.shape, generator=gen) < 0.3] = -1
        all_ids.append(ids)
        records.append(LayerRecord(ids, torch.where(ids >= 0, 0.25, 0.0)))
    state = TraceState(layers=[0, 1], num_experts=n_e, top_k=k)
    red = Reducer(state)
    mask = torch.ones(bsz, seq, dtype=torch.bool)
    red.update(records, mask, torch.zeros(bsz, seq, dtype=torch.long), torch.full((bsz, seq), -1))
    red.flush()
    for li, ids in enumerate(all_ids):
        rows = [[e for e in row.tolist() if e >= 0] for row in ids]
        for j, deg in enumerate(EP_DEGREES):
            want = sum(len({e // (n_e // deg) for e in row}) for row in rows)
            assert int(state.ep_distinct[li, j]) == want, (li, deg)
        pairs = sum(len(row) * (len(row) - 1) // 2 for row in rows)
        assert int(state.coact[li].sum()) == pairs
        assert int(state.router_dropped[li]) == int((ids < 0).sum())


def test_llama4_contributions_are_the_expert_outputs(tmp_path: Path) -> None:
    """llama4 applies the gate weight before the expert, so the weighted output norm sums are
    the output norm sums; for a family that weights after the expert they are not."""
    from tests.tiny import char_tokenizer, tiny_model

    for family, same in (("llama4", True), ("mixtral", False)):
        torch.manual_seed(0)
        model = tiny_model(family)
        out = tmp_path / family
        trace_model(model, char_tokenizer(), _docs(6), out, seq_len=32, batch_size=2, plots=False)
        load = pd.read_csv(out / "expert_load.csv")
        assert (load["out_norm_sum"] > 0).any()
        assert np.allclose(load["weighted_out_norm_sum"], load["out_norm_sum"]) == same, family
