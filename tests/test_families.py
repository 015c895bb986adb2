"""The family registry: every record is complete, and every family works end to end.

For each MoE family of :mod:`moescope.families`, with its tiny config from ``tests/tiny.py``:

- fast: ``save_pretrained`` -> ``moescope params DIR --json`` equals the model built on the
  meta device: total = ``sum(p.numel())``; active = total - routed-expert parameters x
  (1 - k/E) per MoE layer, with the routed parameters counted from the meta model's
  ``experts`` modules (not from tensor names, as ``params`` does);
- slow: ``moescope trace`` counts equal the family's routing rule recomputed from
  ``output_router_logits`` (the rules of tests/test_routing.py); ``moescope prune`` writes a
  checkpoint that reloads and runs, and ``params`` on it equals its own meta-device count;
  a family ``prune`` does not support is refused with one ``Error:`` line.

Adding a family: one module in ``moescope/families/`` and one tiny config in ``tests/tiny.py``.
"""

from __future__ import annotations

import json
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from typer.testing import CliRunner

from moescope import families
from moescope.arch.closedform import has_closed_form
from moescope.arch.moe import moe_spec, routing_groups
from moescope.cli.app import app
from moescope.errors import NotMoEError
from moescope.execution.routing import find_moe_sites
from moescope.families import _base
from tests.test_routing import expected_routing, randomise_router_biases
from tests.tiny import ENCODER_DECODER, auto_class, char_tokenizer, meta_model, tiny_model
from tests.tiny import FAMILIES as TINY

runner = CliRunner()
FAMILIES = list(families.moe_family_names())
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the char tokenizer's
# deepseek_v3's tiny config has 4 experts in 2 groups: no count keeps 2 per group below 4
_E2E = {"deepseek_v3": dict(n_routed_experts=8)}
_SEQ, _WINDOWS = 16, 4


# ----------------------------------------------------------------------------- the records


@pytest.mark.parametrize("record", families.all_families(), ids=lambda r: r.name)
def test_record_is_complete(record: families.Family) -> None:
    assert record.summary and families.lookup(record.name) is record
    for alias in record.aliases:
        assert families.lookup(alias) is record and families.family_of({"model_type": alias}) == record.name
    f = record.fields
    assert f.experts and all(f.experts) and f.width
    # the experts-per-token count is always known: a field, or the k the routing rule fixes
    assert (f.top_k is None) != (f.fixed_top_k is None), "name top_k or fixed_top_k, not both"
    assert record.placement.rule in _base.PLACEMENTS
    assert len(record.placement.fields) == {"all": 0, "switch": 0, "nllb": 0}.get(record.placement.rule, 2)
    assert record.routing.rule in _base.RULES
    assert record.routing.groups in (None, "always", "topk_method")
    t = record.tensors
    assert t.blocks and t.routers and t.experts and t.stored in _base.STORED
    assert all(p.endswith(".") for p in (*t.experts, *t.shared))
    assert record.attention.kind in ("gqa", "mla", "hybrid")
    assert record.attention.sliding in (None, "all_layers", "layer_types", "max_window_layers")
    assert (record.closed_form is not None) == has_closed_form({"model_type": record.name})
    assert record.prune is None or record.prune.strip()
    if record.config_class is None:  # moescope's own spec format: nothing to build or run
        assert record.hooks is None and record.prune
        return
    assert hasattr(transformers, record.config_class)
    assert record.hooks is not None and record.hooks.adapter in _base.ADAPTERS
    assert record.hooks.experts_class and record.hooks.router
    assert record.name in TINY, "add a tiny config for the family to tests/tiny.py"


def test_registry_lookup_and_refusals() -> None:
    assert families.lookup("KIMI_K2") is families.lookup("deepseek_v3")
    assert families.lookup("llama") is None and families.lookup(None) is None
    with pytest.raises(NotMoEError, match="dense"):
        families.require({"model_type": "llama"}, "pruning")
    with pytest.raises(NotMoEError, match="not a MoE family moescope knows.*guess"):
        families.require({"model_type": "brand_new_moe"}, "pruning")
    assert {f.name for f in families.all_families()} >= set(FAMILIES) | {"moescope_spec"}


def test_every_record_field_is_documented() -> None:
    for cls in (_base.Family, _base.Fields, _base.Routing, _base.Tensors, _base.Hooks, _base.Attention):
        doc = cls.__doc__ or ""
        for field in dc_fields(cls):
            assert f"{field.name}:" in doc, f"{cls.__name__}.{field.name} is not documented"


def test_group_limited_predicate_is_one() -> None:
    v2 = {"model_type": "deepseek_v2", "n_group": 2, "topk_group": 1, "n_routed_experts": 8}
    assert routing_groups(v2) == (1, 1, False)  # topk_method defaults to greedy
    assert routing_groups({**v2, "topk_method": "group_limited_greedy"}) == (2, 1, False)
    v3 = {**v2, "model_type": "deepseek_v3"}
    assert routing_groups(v3) == (2, 1, True)
    spec = moe_spec({**v2, "num_hidden_layers": 2, "num_experts_per_tok": 2})
    assert (spec.n_group, spec.topk_group) == (1, 1)


# ----------------------------------------------------------------------------- helpers


def _true_top_k(cfg: Any, family: str) -> int:
    """Experts per token, from the transformers config object (not moescope's registry)."""
    if family == "switch_transformers":
        return 1
    if family == "nllb_moe":  # NllbMoeTop2Router: top-1 and top-2
        return 2
    if family == "phimoe":  # sparsemixer always picks two
        return 2
    if family == "dbrx":
        return int(cfg.ffn_config.moe_top_k)
    return int(cfg.num_experts_per_tok)


def _meta_counts(cfg: Any, family: str) -> tuple[int, int, list[int], int]:
    """(total, active, MoE layer indices, experts) of the model built on the meta device."""
    model = meta_model(cfg, family)
    total = sum(p.numel() for p in model.parameters())
    k = _true_top_k(cfg, family)
    inactive, layers, counts = 0, [], set()
    # encoder-decoders number the decoder's blocks after the encoder's
    enc = {"switch_transformers": "num_layers", "nllb_moe": "encoder_layers"}.get(family)
    n_enc = getattr(cfg, enc) if enc else 0
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        layer = families.layer_of(name)
        if experts is None or layer is None or not list(experts.parameters()):
            continue
        if isinstance(experts, torch.nn.ModuleDict):  # one module per expert (nllb's dropout aside)
            n = sum(1 for c in experts.values() if list(c.parameters()))
        else:
            n = int(experts.num_experts)
        routed = sum(p.numel() for p in experts.parameters())
        inactive += int(round(routed * (1 - k / n)))
        layers.append(layer + n_enc if name.startswith(("decoder.", "model.decoder.")) else layer)
        counts.add(n)
    assert len(counts) == 1
    return total, total - inactive, layers, counts.pop()


def _params(path: Path) -> dict[str, Any]:
    res = runner.invoke(app, ["params", str(path), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 1
    return dict(rows[0])


def _check_params(path: Path, family: str) -> dict[str, Any]:
    """``moescope params`` on a saved checkpoint against the meta-device count of its config."""
    row = _params(path)
    cfg = transformers.AutoConfig.from_pretrained(path)
    total, active, layers, num = _meta_counts(cfg, family)
    assert row["model_type"] == cfg.model_type and row["is_moe"]
    assert row["total_params"] == total
    assert row["active_params"] == active
    assert row["moe_layers"] == layers and row["num_experts"] == num
    assert row["top_k"] == _true_top_k(cfg, family)
    return row


def _save(family: str, root: Path, **overrides: Any) -> tuple[Any, Path]:
    torch.manual_seed(0)
    model = tiny_model(family, **_IDS, **overrides)
    record = families.lookup(family)
    assert record is not None and record.hooks is not None
    with torch.no_grad():  # router logits large enough to beat the random biases: varied routes
        for site in find_moe_sites(model):
            site.block.get_parameter(record.hooks.router).mul_(20.0)
    randomise_router_biases(model)
    path = root / family
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model, path


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family", FAMILIES)
def test_params_of_saved_checkpoint_equals_meta_count(family: str, tmp_path: Path) -> None:
    """save_pretrained's layout (granite: block_sparse_moe.input_linear) is accounted exactly."""
    _, path = _save(family, tmp_path)
    _check_params(path, family)


def _corpus(path: Path) -> Path:
    """One document of _WINDOWS * _SEQ - 1 characters: with EOS it fills the windows exactly."""
    text = ("the quick brown fox 0123456789 jumps over (lazy) dogs, again: x=y+1. " * 8)[
        : _WINDOWS * _SEQ - 1
    ]
    path.write_text(text)
    return path


def _recomputed_counts(path: Path, family: str, text: str) -> dict[tuple[int, int], int]:
    """Counts per (layer, expert) of the family's routing rule on the trace's windows."""
    tok = char_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = torch.tensor(ids).reshape(_WINDOWS, _SEQ)
    loaded = auto_class(family).from_pretrained(path, dtype=torch.float32).eval()
    if family == "nllb_moe":
        from moescope.execution import nllb

        nllb.install(loaded)  # as moescope runs it: the router's dispatch (tests/test_routing.py)
    sites = find_moe_sites(loaded)
    offset = {"": 0, "encoder": 0, "decoder": 0}
    with torch.no_grad():
        if family in ENCODER_DECODER:
            # the decoder teacher-forced on the same text, shifted right behind the start token
            start = getattr(loaded.config, "decoder_start_token_id", None)
            dec = torch.full_like(batch, int(start if start is not None else loaded.config.pad_token_id or 0))
            dec[:, 1:] = batch[:, :-1]
            # the router logits are transformers' own router's; the capacity rule is recomputed here
            out = loaded(input_ids=batch, decoder_input_ids=dec, output_router_logits=True)
            logits = [*out.encoder_router_logits, *out.decoder_router_logits]
            enc = "encoder_layers" if family == "nllb_moe" else "num_layers"
            offset["decoder"] = int(getattr(loaded.config, enc))  # decoder layers follow the encoder's
        else:
            logits = list(loaded(input_ids=batch, output_router_logits=True).router_logits)
    assert len(logits) == len(sites)
    counts: dict[tuple[int, int], int] = {}
    for site, lg in zip(sites, logits, strict=True):
        chosen, _ = expected_routing(family, loaded, site, lg)
        for e in chosen[chosen >= 0].tolist():
            key = (site.layer + offset[site.stack], e)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _trace(path: Path, family: str, corpus: Path, out: Path) -> None:
    record = families.lookup(family)
    assert record is not None
    if record.causal_lm:
        args = ["trace", str(path), str(corpus), "--out", str(out), "--seq-len", str(_SEQ)]
        res = runner.invoke(app, [*args, "--batch-size", str(_WINDOWS), "--no-plots", "-q"])
        assert res.exit_code == 0, res.stderr
        return
    from moescope.tracing import trace_model  # an encoder-decoder: the CLI loads causal LMs only

    class Doc:
        text, domain, doc_id = corpus.read_text(), None, None

    model = auto_class(family).from_pretrained(path, dtype=torch.float32).eval()
    trace_model(model, char_tokenizer(), [Doc()], out, seq_len=_SEQ, batch_size=_WINDOWS, plots=False)


def _keep(config: dict[str, Any], num: int, top_k: int) -> int:
    """A kept count the plan accepts: one fewer per routing group."""
    n_group, _, _ = routing_groups(config)
    return max(num - n_group, top_k)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family: str, tmp_path: Path) -> None:
    import pandas as pd

    _, path = _save(family, tmp_path, **_E2E.get(family, {}))
    row = _check_params(path, family)
    corpus = _corpus(tmp_path / "corpus.txt")
    _trace(path, family, corpus, tmp_path / "trace")
    load = pd.read_csv(tmp_path / "trace" / "expert_load.csv")
    got = {(int(r.layer), int(r.expert)): int(r.count) for r in load.itertuples() if r.count}
    assert got == _recomputed_counts(path, family, corpus.read_text())

    record = families.lookup(family)
    assert record is not None
    config = json.loads((path / "config.json").read_text())
    keep = _keep(config, row["num_experts"], row["top_k"])
    out = tmp_path / "pruned"
    args = ["prune", str(path), "--trace", str(tmp_path / "trace"), "--keep", str(keep), "--out", str(out)]
    res = runner.invoke(app, [*args, "--criterion", "frequency", "--json"])
    if record.prune is not None:
        assert res.exit_code == 1 and "cannot be pruned" in res.stderr and "Traceback" not in res.stderr
        assert len([x for x in res.stderr.splitlines() if x.startswith("Error:")]) == 1
        assert not out.exists()
        return
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["verified"] is True
    pruned = _check_params(out, family)
    assert pruned["num_experts"] == keep and pruned["total_params"] < row["total_params"]
    reloaded = auto_class(family).from_pretrained(out, dtype=torch.float32)
    assert sum(p.numel() for p in reloaded.parameters()) == pruned["total_params"]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        extra = {"decoder_input_ids": ids[:, :1]} if family in ENCODER_DECODER else {}
        logits = reloaded(input_ids=ids, **extra).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_nllb_moe_through_the_cli(tmp_path: Path) -> None:
    """nllb-moe by the CLI: trace (loaded as moescope loads it) = the capacity rule on the router
    logits; eval = the teacher-forced loss of the dispatching model; merge reloads; sweep and
    --stream are refused in one line."""
    import math

    import pandas as pd

    from moescope.execution import nllb

    family = "nllb_moe"
    _, path = _save(family, tmp_path)
    corpus = _corpus(tmp_path / "corpus.txt")
    args = ["trace", str(path), str(corpus), "--out", str(tmp_path / "trace"), "--seq-len", str(_SEQ)]
    res = runner.invoke(app, [*args, "--batch-size", str(_WINDOWS), "--no-plots", "-q"])
    assert res.exit_code == 0, res.stderr
    load = pd.read_csv(tmp_path / "trace" / "expert_load.csv")
    got = {(int(r.layer), int(r.expert)): int(r.count) for r in load.itertuples() if r.count}
    want = _recomputed_counts(path, family, corpus.read_text())
    assert got == want
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    layers = summary["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2, 3]  # encoder 0-1, decoder 2-3
    # the eval capacity (0.3 of the batch's tokens) drops assignments, counted as the router's
    dropped = {r["layer"]: r["router_dropped"] for r in layers}
    for layer, n in dropped.items():
        assert n > 0 and n == 2 * _WINDOWS * _SEQ - sum(c for (la, _), c in want.items() if la == layer)

    short = tmp_path / "short.txt"
    short.write_text("the quick")  # one window: 9 characters and EOS, 9 scored
    res = runner.invoke(app, ["eval", str(path), str(short), "--seq-len", str(_SEQ), "--json"])
    assert res.exit_code == 0, res.stderr
    ev = json.loads(res.stdout)
    ids = char_tokenizer()("the quick", add_special_tokens=False)["input_ids"] + [2]
    x = torch.tensor([ids])
    model = auto_class(family).from_pretrained(path, dtype=torch.float32).eval()
    nllb.install(model)
    dec = torch.full_like(x, int(model.config.decoder_start_token_id))
    dec[:, 1:] = x[:, :-1]
    with torch.no_grad():
        logits = model(input_ids=x, decoder_input_ids=dec).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[1:], x[0, 1:], reduction="sum")
    assert ev["tokens"] == len(ids) - 1
    assert ev["perplexity"] == pytest.approx(math.exp(float(nll) / (len(ids) - 1)), rel=1e-5)

    out = tmp_path / "merged"
    args = ["prune", str(path), "--trace", str(tmp_path / "trace"), "--drop", "1", "--out", str(out)]
    res = runner.invoke(app, [*args, "--method", "merge", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["verified"] is True
    merged = _check_params(out, family)
    assert merged["num_experts"] == 3

    for cmd, code in (
        (["sweep", str(path), str(short), "--top-k", "1", "--seq-len", str(_SEQ)], 2),
        (["trace", str(path), str(short), "--out", str(tmp_path / "s"), "--stream"], 1),
    ):
        res = runner.invoke(app, cmd)
        assert res.exit_code == code and "Traceback" not in res.stderr, res.stderr
        assert "nllb-moe" in res.stderr or "encoder-decoder" in res.stderr


@pytest.mark.parametrize("family", sorted(ENCODER_DECODER))
def test_similarity_of_an_encoder_decoder(family: str, tmp_path: Path) -> None:
    """Both stacks, numbered as trace numbers them (decoder after encoder); the outputs measure
    runs the decoder teacher-forced (it used to fail: the model was called without decoder
    inputs), and a trace of the same model is accepted for the coactivation measure."""
    _, path = _save(family, tmp_path)
    corpus = _corpus(tmp_path / "corpus.txt")
    args = ["trace", str(path), str(corpus), "--out", str(tmp_path / "trace"), "--seq-len", str(_SEQ)]
    assert runner.invoke(app, [*args, "--no-plots", "-q"]).exit_code == 0
    traced = [r["layer"] for r in json.loads((tmp_path / "trace" / "summary.json").read_text())["layers"]]
    sim = ["similarity", str(path), "--corpus", str(corpus), "--seq-len", str(_SEQ), "--no-plots", "--json"]
    res = runner.invoke(app, [*sim, "--trace", str(tmp_path / "trace"), "--out", str(tmp_path / "sim")])
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)  # one row per expert pair, one column per measure
    assert sorted({r["layer"] for r in rows}) == traced and len(traced) == 4
    for r in rows:  # outputs: each expert module run on the sampled block inputs of its stack
        assert r["outputs"] is not None and r["coactivation"] is not None, r
        assert -1.0 <= r["outputs"] <= 1.0
