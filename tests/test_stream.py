"""Layer-streamed execution equals the in-memory model: logits and every routing decision.

Each family's tiny random model is saved with ``save_pretrained`` (the on-disk layout, which
differs from the module layout for most families) and run twice on the same padded
batches: loaded whole by transformers, and streamed one decoder layer at a time by
:class:`moescope.execution.stream.StreamedModel`. In float32 on CPU both run the same ops on the same
inputs, so the results must be identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moescope.execution.plan import parse_size
from moescope.execution.routing import RoutingRecorder, find_moe_sites
from moescope.execution.stream import StreamedModel
from tests.tiny import ENCODER_DECODER, FAMILIES, tiny_model

MOE_FAMILIES = [f for f in FAMILIES if f != "llama" and f not in ENCODER_DECODER]
# MLA with fewer key/value heads than query heads crashes transformers' own masked forward
_OVERRIDES: dict[str, dict[str, Any]] = {"deepseek_v2": {"num_key_value_heads": 4}}


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for rows, width in ((2, 12), (3, 9)):
        ids = torch.randint(3, 99, (rows, width), generator=g)
        mask = torch.ones(rows, width, dtype=torch.long)
        mask[-1, width - 4 :] = 0  # a padded row: the mask path is exercised too
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _in_memory(path: Path, batches: list[dict[str, torch.Tensor]]) -> tuple[list[Any], list[list[Any]]]:
    import transformers

    from moescope.execution.load import auto_class

    head, _ = auto_class(transformers.AutoConfig.from_pretrained(str(path)))  # muse_spark: image-text
    model = head.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    try:
        model.set_experts_implementation("eager")
    except Exception:
        pass
    logits, records = [], []
    sites = find_moe_sites(model)
    with torch.inference_mode(), RoutingRecorder(sites) as rec:
        for batch in batches:
            rec.clear()
            logits.append(model(**batch, use_cache=False).logits)
            records.append(rec.records)
    return logits, records


@pytest.mark.parametrize("family", [*MOE_FAMILIES, "llama"])
def test_streamed_equals_in_memory(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_model(family, **_OVERRIDES.get(family, {})).save_pretrained(tmp_path)
    _check_streamed(family, tmp_path)


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "zaya", "longcat_flash", "muse_spark"])
def test_layers_returning_state_and_block_counts_stream(model_type: str, tmp_path: Path) -> None:
    """Layers returning ``(hidden, state for the next layer)`` (glm_moe_dsa's top-k indices,
    zaya's router states, passed positionally) and longcat_flash, whose ``num_hidden_layers``
    counts two attention sublayers per block, stream and equal the in-memory model; so does
    muse_spark, whose vision and audio towers have ``layers`` lists of the same length."""
    from tests import census

    torch.manual_seed(0)
    census.build(model_type).save_pretrained(tmp_path)
    sm = StreamedModel(tmp_path, dtype="float32")
    assert sm.layer_outputs == (2 if model_type in ("glm_moe_dsa", "zaya") else 1)
    assert sm.num_layers == len(sm.layers) > 1
    # decoder layer tensors are streamed, not loaded once with the globals; a tower's are globals
    assert not [k for k in sm.shards.globals_ if "layers." in k and "tower" not in k]
    assert not [k for keys in sm.shards.by_layer.values() for k in keys if "tower" in k]
    sm.close()
    # zaya's padded row differs in the last bits (3e-8) after its convolution; routing is identical
    _check_streamed(model_type, tmp_path, atol=1e-6 if model_type == "zaya" else 0.0)


def test_computing_between_layers_is_refused(tmp_path: Path) -> None:
    """A model whose loop changes the hidden states between layers cannot be replayed layer-major."""
    from moescope.errors import MoescopeError

    torch.manual_seed(0)
    tiny_model("mixtral").save_pretrained(tmp_path)
    sm = StreamedModel(tmp_path, dtype="float32")
    # the pre-hook runs in the layer's __call__ before the (stubbed) forward, as loop code would
    sm.layers[1].register_forward_pre_hook(lambda _m, args: (args[0] * 2, *args[1:]))
    with pytest.raises(MoescopeError, match="between layers"):
        sm.run(_batches())
    sm.close()


def _same(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return torch.equal(a, b) if not atol else torch.allclose(a, b, rtol=0, atol=atol)


def _check_streamed(family: str, tmp_path: Path, atol: float = 0.0) -> None:
    batches = _batches()
    ref_logits, ref_records = _in_memory(tmp_path, batches)

    sm = StreamedModel(tmp_path, dtype="float32")
    sites = find_moe_sites(sm.model)
    layer_sites = {s.layer: i for i, s in enumerate(sites)}
    got: dict[tuple[int, int], Any] = {}
    logits: dict[int, Any] = {}
    with RoutingRecorder(sites) as rec:

        def after(layer: int, b: int) -> None:
            if layer in layer_sites:
                got[(layer, b)] = rec.records[layer_sites[layer]]
                rec.clear()

        sm.run(batches, after_layer=after, logits=lambda b, t: logits.__setitem__(b, t.clone()))
    sm.close()
    for b, ref in enumerate(ref_logits):
        assert _same(logits[b], ref, atol), (family, b, (logits[b] - ref).abs().max())
    for b, recs in enumerate(ref_records):
        for i, site in enumerate(sites):
            r, s = recs[i], got[(site.layer, b)]
            assert torch.equal(r.ids, s.ids), (family, b, site.layer)
            assert _same(r.weights, s.weights, atol), (family, b, site.layer)
            if r.norms is not None:
                assert _same(r.norms, s.norms, atol), (family, b, site.layer)
    # every layer's weights were read exactly once, plus the globals once
    assert sm.bytes_read == sum(sm.shards.nbytes.values())


def test_chunks_read_weights_once_per_chunk(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_model("mixtral").save_pretrained(tmp_path)
    batches = _batches()
    ref_logits, _ = _in_memory(tmp_path, batches)
    sm = StreamedModel(tmp_path, dtype="float32")
    globals_bytes = sm.bytes_read
    logits: dict[int, Any] = {}
    sm.run(batches, logits=lambda b, t: logits.__setitem__(b, t.clone()), max_hidden_bytes=1)
    layer_bytes = sum(sm.shards.nbytes.values()) - globals_bytes
    assert sm.bytes_read == globals_bytes + 2 * layer_bytes  # two chunks, one pass each
    for b, ref in enumerate(ref_logits):
        assert torch.equal(logits[b], ref)
    # after a pass, no decoder layer holds real weights
    assert all(p.device.type == "meta" for p in sm.layers.parameters())


@pytest.mark.parametrize(
    ("text", "value"),
    [("20GiB", 20 * 2**30), ("512MB", 512 * 10**6), ("1.5g", int(1.5 * 2**30)), ("4096", 4096)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "0", "12 parsecs", "1e3GiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("family", sorted(ENCODER_DECODER))
def test_encoder_decoder_is_refused(family: str, tmp_path: Path) -> None:
    from moescope.errors import MoescopeError

    torch.manual_seed(0)
    tiny_model(family).save_pretrained(tmp_path)
    with pytest.raises(MoescopeError, match="not streamed"):
        StreamedModel(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_streamed_trace_and_eval_equal_in_memory(family: str, tmp_path: Path) -> None:
    """The commands' own paths: `trace` and `eval` with --stream against --no-stream."""
    import pandas as pd

    from moescope.evaluation.perplexity import evaluate
    from moescope.tracing import run_trace
    from tests.tiny import char_tokenizer

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    tiny_model(family, vocab_size=128, **_OVERRIDES.get(family, {})).save_pretrained(ckpt)
    char_tokenizer().save_pretrained(ckpt)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "\n".join(
            f'{{"text": "{t}", "domain": "{d}"}}'
            for t, d in [("def f(x): return x + 1 " * 9, "code"), ("the quick brown fox " * 11, "prose")] * 3
        )
    )
    kw: dict[str, Any] = dict(dtype="float32", seq_len=32, batch_size=3, plots=False)
    run_trace(str(ckpt), str(corpus), tmp_path / "mem", stream=False, **kw)
    run_trace(str(ckpt), str(corpus), tmp_path / "str", stream=True, **kw)
    a = pd.read_csv(tmp_path / "mem" / "expert_load.csv")
    b = pd.read_csv(tmp_path / "str" / "expert_load.csv")
    assert a["count"].tolist() == b["count"].tolist() and a["count"].sum() > 0
    for col in ("weight_sum", "out_norm_sum", "weighted_out_norm_sum"):
        pd.testing.assert_series_equal(a[col], b[col], rtol=1e-5)
    coact_a = (tmp_path / "mem" / "coactivation.csv").read_text()
    assert coact_a == (tmp_path / "str" / "coactivation.csv").read_text()
    ev: dict[str, Any] = dict(dtype="float32", seq_len=24, stride=12, max_tokens=None)
    pm = evaluate(str(ckpt), [str(corpus)], stream=False, **ev)
    ps = evaluate(str(ckpt), [str(corpus)], stream=True, **ev)
    assert ps.perplexity == pytest.approx(pm.perplexity, rel=1e-4)
    for d, r in pm.domains.items():
        assert ps.domains[d].perplexity == pytest.approx(r.perplexity, rel=1e-4)


@pytest.mark.slow
def test_device_map_auto_with_disk_offload_equals_whole(tmp_path: Path) -> None:
    """accelerate's placement (layers offloaded to disk) records the same routing and norms.

    The norm-recording experts forward must run *inside* accelerate's hook, which loads the
    offloaded weights first; replacing the hooked forward bypassed it (norms of 1e13).
    """
    import json

    from moescope.tracing import run_trace

    kw: dict[str, Any] = dict(max_tokens=2000, plots=False)
    run_trace("demo", "demo", tmp_path / "whole", stream=False, **kw)
    run_trace("demo", "demo", tmp_path / "mapped", device_map="auto", max_memory="cpu=3MiB", **kw)
    for name in ("expert_load.csv", "coactivation.csv"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "mapped" / name).read_text(), name
    summary = json.loads((tmp_path / "mapped" / "summary.json").read_text())
    assert summary["execution"]["mode"] == "device_map"


def test_streamed_similarity_equals_in_memory() -> None:
    """Each MoE layer is measured while it is the one resident layer: same matrices."""
    import numpy as np

    from moescope.redundancy.run import similarity

    whole = similarity("demo", None, samples=48, seq_len=32, stream=False)
    streamed = similarity("demo", None, samples=48, seq_len=32, stream=True)
    assert streamed.samples == whole.samples == 48
    for a, b in zip(whole.layers, streamed.layers, strict=True):
        assert a.layer == b.layer and sorted(a.matrices) == sorted(b.matrices) == [
            "outputs",
            "router",
            "weight_raw",
            "weights",
        ]
        for name in a.matrices:
            assert np.array_equal(a.matrices[name], b.matrices[name]), (a.layer, name)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_background_reader_gives_the_same_results(prefetch: int, tmp_path: Path) -> None:
    """Reading layer l+1 in a thread while layer l computes changes nothing but the timing."""
    torch.manual_seed(0)
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    batches = _batches()
    ref_logits, _ = _in_memory(tmp_path, batches)
    sm = StreamedModel(tmp_path, dtype="float32")
    sm.prefetch = prefetch
    logits: dict[int, Any] = {}
    sm.run(batches, logits=lambda b, t: logits.__setitem__(b, t.clone()))
    assert sm.bytes_read == sum(sm.shards.nbytes.values())
    for b, ref in enumerate(ref_logits):
        assert torch.equal(logits[b], ref)
    assert sm.read_s > 0 and sm.read_wait_s >= 0


def test_background_reader_error_reaches_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moescope.errors import CheckpointError

    torch.manual_seed(0)
    tiny_model("mixtral").save_pretrained(tmp_path)
    sm = StreamedModel(tmp_path, dtype="float32")
    real = sm._load_layer
    layer1 = set(sm.shards.by_layer[1])

    def failing(keys: Any) -> Any:
        if set(keys) == layer1:
            raise CheckpointError("disk went away")
        return real(keys)

    monkeypatch.setattr(sm, "_load_layer", failing)
    with pytest.raises(CheckpointError, match="disk went away"):
        sm.run(_batches())
    # nothing stays resident, and the reader thread is gone
    import threading

    assert not any(t.name == "moescope-layer-reader" for t in threading.enumerate())


def _stream_logits(sm: StreamedModel, batches: list[dict[str, torch.Tensor]], **kw: Any) -> dict[int, Any]:
    logits: dict[int, Any] = {}
    sm.run(batches, logits=lambda b, t: logits.__setitem__(b, t.clone()), **kw)
    return logits


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("mixtral", {}),  # per-expert w1/w3 stacked and concatenated into gate_up_proj
        ("qwen3_moe", {}),
        ("deepseek_v3", {"first_k_dense_replace": 1}),  # a dense layer kind, a buffer (correction bias)
    ],
)
def test_layers_are_placed_directly_and_equal_transformers_loading(
    family: str, overrides: dict[str, Any], tmp_path: Path
) -> None:
    """After one verified layer of each kind, layers are read straight into their fused
    parameters, into memory recycled from released layers; the logits stay the in-memory ones."""
    torch.manual_seed(0)
    tiny_model(family, num_hidden_layers=5, **overrides).save_pretrained(tmp_path)
    batches = _batches()
    ref_logits, _ = _in_memory(tmp_path, batches)
    sm = StreamedModel(tmp_path, dtype="float32")
    sm.prefetch = 0  # each layer loads after the one before is released: the pool is used at once
    assert sm.placer is not None
    logits = _stream_logits(sm, batches)
    kinds = 2 if family == "deepseek_v3" else 1
    assert len(sm.placer.verified) == kinds and not sm.placer.rejected
    assert sm.placer.placed == 5 - kinds  # the first layer of each kind went through transformers
    assert sm.placer.recycled > 0
    assert sm.bytes_read == sum(sm.shards.nbytes.values())
    for b, ref in enumerate(ref_logits):
        assert torch.equal(logits[b], ref)


def test_a_wrong_plan_is_caught_and_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan that puts two experts' tensors in each other's place fails the verification on the
    first layer; that layer kind then stays on transformers' conversion, with the right results."""
    import dataclasses

    from moescope.execution.placement import Placer

    torch.manual_seed(0)
    tiny_model("mixtral", num_hidden_layers=3).save_pretrained(tmp_path)
    batches = _batches()
    ref_logits, _ = _in_memory(tmp_path, batches)
    real = Placer.plan

    def swapped(self: Placer, keys: Any) -> Any:
        plan = real(self, keys)
        stacked = [i for i, c in enumerate(plan.copies) if c.index is not None]
        a, b = stacked[0], next(i for i in stacked if plan.copies[i].index != plan.copies[stacked[0]].index)
        ca, cb = plan.copies[a], plan.copies[b]
        plan.copies[a] = dataclasses.replace(ca, index=cb.index)
        plan.copies[b] = dataclasses.replace(cb, index=ca.index)
        return plan

    monkeypatch.setattr(Placer, "plan", swapped)
    sm = StreamedModel(tmp_path, dtype="float32")
    logits = _stream_logits(sm, batches)
    assert sm.placer is not None and sm.placer.rejected and not sm.placer.verified
    assert sm.placer.placed == 0
    for b, ref in enumerate(ref_logits):
        assert torch.equal(logits[b], ref)


def test_a_weight_a_caller_keeps_is_not_recycled(tmp_path: Path) -> None:
    """A view of a released layer's weight that a caller still holds keeps its values: the
    placer only recycles tensors whose storage nothing else holds."""
    torch.manual_seed(0)
    tiny_model("mixtral", num_hidden_layers=4).save_pretrained(tmp_path)
    sm = StreamedModel(tmp_path, dtype="float32")
    sm.prefetch = 0
    kept: dict[int, tuple[Any, Any]] = {}

    def keep(layer: int) -> None:
        w = sm.layers[layer].mlp.experts.gate_up_proj.detach()
        kept[layer] = (w, w.clone())

    _stream_logits(sm, _batches(), on_layer_done=keep)
    assert sm.placer is not None and sm.placer.placed == 3
    for layer, (view, copy) in kept.items():
        assert torch.equal(view, copy), layer
    # nothing was recycled that a view held: every layer's gate_up is distinct memory
    assert len({v.data_ptr() for v, _ in kept.values()}) == 4


def test_placing_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    tiny_model("mixtral", num_hidden_layers=2).save_pretrained(tmp_path)
    monkeypatch.setenv("MOESCOPE_STREAM_PLACE", "0")
    assert StreamedModel(tmp_path, dtype="float32").placer is None
