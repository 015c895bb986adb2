"""`prune --method merge` and neuron alignment (moescope.redundancy.align, moescope.pruning.merge).

The planted duplicate: expert 1 of every MoE layer is replaced by a copy of expert 0 with its
hidden neurons permuted. transformers' own experts forward proves the copy computes the same
function; merging it into expert 0 must then give expert 0 back (alignment recovers the
permutation), while averaging without alignment must not. Families: mixtral and qwen3_moe
(per-expert gate/up/down), gpt_oss (fused, transposed, gate/up interleaved, with biases) and
dbrx (packed ``[E*I, H]`` rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moescope import pruning as P
from moescope.errors import PruneError
from moescope.redundancy import align as A
from moescope.redundancy.files import write_report
from moescope.redundancy.outputs import expert_outputs
from moescope.redundancy.report import LayerSimilarity, SimilarityReport
from tests.safety import assert_clean_error, invoke
from tests.test_prune import write_trace
from tests.tiny import tiny_model

_E = 4
FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss", "dbrx"]
#: routing counts per expert (layers 0 and 1): expert 1 is the least used, so keep=3 drops it
_LOADS = {0: [40, 10, 30, 20], 1: [40, 10, 30, 20]}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _experts_modules(model: Any) -> list[Any]:
    return [m for n, m in model.named_modules() if n.endswith(".experts")]


def _set_expert(experts: Any, j: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one expert's tensors into an experts module (fused [E, ...] or packed [E*I, ...])."""
    with torch.no_grad():
        for name, t in tensors.items():
            p = experts.get_parameter(name)
            view = p.data if p.shape[0] == _E else p.data.view(_E, -1, *p.shape[1:])
            view[j].copy_(t.reshape(view[j].shape))


def _width(tensors: dict[str, torch.Tensor], axes: dict[str, Any]) -> int:
    name, ax = next((n, a) for n, a in axes.items() if a is not None)
    return int(tensors[name].shape[ax.axis] // ax.groups)


def _router(model: Any, layer: int) -> torch.Tensor:
    """The router weight of MoE layer ``layer`` ([experts, hidden])."""
    ends = (".gate.weight", ".router.weight", ".router.layer.weight")
    name = next(n for n, _ in model.named_parameters() if f"s.{layer}." in n and n.endswith(ends))
    return model.get_parameter(name).detach().clone()


def _planted(family: str, path: Path, seed: int = 0) -> Any:
    """A tiny model whose expert 1 is expert 0 with permuted neurons, saved to ``path``."""
    torch.manual_seed(seed)
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(seed + 1)
    for experts in _experts_modules(model):
        exps = A.module_experts(experts, _E, family)
        axes = A.expert_axes(exps[0], family)
        perm = torch.randperm(_width(exps[0], axes), generator=gen).numpy()
        _set_expert(experts, 1, A.permute_expert(exps[0], axes, perm))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", [*FAMILIES, "llama4", "granitemoe", "switch_transformers"])
def test_alignment_recovers_a_permutation(family: str) -> None:
    """Aligned cosine 1 and the exact tensors back for a permuted copy; the raw cosine is low."""
    torch.manual_seed(0)
    experts = _experts_modules(tiny_model(family))[0]
    exps = A.module_experts(experts, _E, family)
    axes = A.expert_axes(exps[0], family)
    perm = torch.randperm(_width(exps[0], axes), generator=torch.Generator().manual_seed(3)).numpy()
    copy = A.permute_expert(exps[0], axes, perm)
    al = A.align(exps[0], copy, axes)
    assert al.cosine == pytest.approx(1.0, abs=1e-9) and al.raw_cosine < 0.5
    back = A.permute_expert(copy, axes, al.perm)
    assert all(torch.equal(back[n], exps[0][n]) for n in exps[0])
    # brute force on the flattened tensors: the aligned cosine is the cosine after the permutation
    other = A.align(exps[0], exps[1], axes)
    flat = [torch.cat([t.double().reshape(-1) for _, t in sorted(e.items())]) for e in (exps[0], exps[1])]
    moved = torch.cat(
        [t.double().reshape(-1) for _, t in sorted(A.permute_expert(exps[1], axes, other.perm).items())]
    )
    cos = torch.nn.functional.cosine_similarity
    assert other.raw_cosine == pytest.approx(float(cos(flat[0], flat[1], dim=0)), abs=1e-9)
    assert other.cosine == pytest.approx(float(cos(flat[0], moved, dim=0)), abs=1e-9)
    assert other.cosine >= other.raw_cosine


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_duplicate_computes_the_same_function(family: str, tmp_path: Path) -> None:
    """The permutation moescope.redundancy.align applies is function-preserving (transformers' own forward)."""
    model = _planted(family, tmp_path / "src")
    x = torch.randn(5, model.config.get_text_config().hidden_size)
    for experts in _experts_modules(model):
        outs = expert_outputs(experts, x, _E)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(outs[2], outs[0], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_of_a_planted_duplicate_gives_the_original(family: str, tmp_path: Path) -> None:
    import transformers

    src = tmp_path / "src"
    source = _planted(family, src)
    trace = write_trace(tmp_path / "trace", model=str(src), loads=_LOADS)
    plan, result = P.prune(
        str(src), trace, tmp_path / "merged", keep=3, criterion="frequency", method="merge"
    )
    assert result is not None and result.verified and plan.kept == {0: [0, 2, 3], 1: [0, 2, 3]}
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    _, unaligned = P.prune(
        str(src), trace, tmp_path / "plain", keep=3, criterion="frequency", method="merge", merge_align=False
    )
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    for layer, (before, after, naive) in enumerate(
        zip(*(_experts_modules(m) for m in (source, merged, plain)), strict=True)
    ):
        old = A.module_experts(before, _E, family)
        new = A.module_experts(after, 3, family)
        group = plan.merge.groups[layer][0]
        assert [m.expert for m in group.members] == [0, 1]
        assert [m.weight for m in group.members] == pytest.approx([0.8, 0.2])
        assert group.members[1].alignment == pytest.approx(1.0, abs=1e-6)
        for name in old[0]:
            torch.testing.assert_close(new[0][name], old[0][name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new[1][name], old[2][name], rtol=0, atol=0)  # untouched
        unmerged = A.module_experts(naive, 3, family)[0]
        assert max(float((unmerged[n] - old[0][n]).abs().max()) for n in old[0]) > 1e-3
        # router rule "mean": the merged expert's row is the same weighted mean of the members' rows
        rows = _router(source, layer)
        torch.testing.assert_close(_router(merged, layer)[0], 0.8 * rows[0] + 0.2 * rows[1])
        torch.testing.assert_close(_router(merged, layer)[1:], rows[2:])
    logits = merged(input_ids=torch.arange(8)[None] % 50).logits
    assert torch.isfinite(logits).all()
    manifest = json.loads((tmp_path / "merged" / "prune_manifest.json").read_text())
    assert manifest["method"] == "merge" and manifest["merge"]["by"] == "weight"
    assert manifest["merge"]["layers"]["0"][0]["members"][1]["expert"] == 1
    assert "method: `merge`" in (tmp_path / "merged" / "README.md").read_text()


def test_kept_router_rule_routes_like_drop(tmp_path: Path) -> None:
    """--merge-router kept: the router tensors are exactly --method drop's."""
    from safetensors.torch import load_file

    src = tmp_path / "src"
    _planted("qwen3_moe", src)
    trace = write_trace(tmp_path / "trace", model=str(src), loads=_LOADS)
    common = dict(keep=3, criterion="frequency", verify=False)
    P.prune(str(src), trace, tmp_path / "drop", **common)  # type: ignore[arg-type]
    P.prune(str(src), trace, tmp_path / "kept", **common, method="merge", merge_router="kept")  # type: ignore[arg-type]
    drop = load_file(tmp_path / "drop" / "model.safetensors")
    kept = load_file(tmp_path / "kept" / "model.safetensors")
    assert set(drop) == set(kept)
    for name in drop:
        same = torch.equal(drop[name], kept[name])
        assert same == (".experts.0." not in name), name  # only the merged expert 0 differs


def test_merge_by_output_uses_the_similarity_report(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _planted("mixtral", src)
    trace = write_trace(tmp_path / "trace", model=str(src), loads=_LOADS)
    outputs = np.eye(_E)
    outputs[1, 3] = outputs[3, 1] = 0.9  # by outputs, dropped expert 1 is most like 3 (by weights: 0)
    layers = [LayerSimilarity(layer, _E, {"outputs": outputs}) for layer in (0, 1)]
    write_report(SimilarityReport(str(src), layers), tmp_path / "sim", plots=False)
    plan, _ = P.prune(str(src), trace, "", keep=3, criterion="frequency", method="merge",
                      similarity=tmp_path / "sim", dry_run=True)  # fmt: skip
    group = next(g for g in plan.merge.groups[0] if g.kept == 3)
    assert [m.expert for m in group.members] == [3, 1] and group.members[1].similarity == pytest.approx(0.9)
    assert plan.merge.by == "output"
    by_weight, _ = P.prune(str(src), trace, "", keep=3, criterion="frequency", method="merge", dry_run=True)
    assert [m.expert for m in by_weight.merge.groups[0][0].members] == [0, 1]


def test_cli_merge_json_csv_and_table(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _planted("qwen3_moe", src)
    trace = write_trace(tmp_path / "trace", model=str(src), loads=_LOADS)
    args = ["prune", src, "--trace", trace, "--keep", "3", "--criterion", "frequency", "--method", "merge"]
    res = invoke([*args, "--out", tmp_path / "o", "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["method"] == "merge" and data["verified"] is True
    assert data["merge"]["layers"]["1"][0]["members"][1]["expert"] == 1
    into = {(r["layer"], r["expert"]): r["merged_into"] for r in data["plan"]}
    assert into[(0, 1)] == 0 and into[(0, 2)] == 2
    csv = invoke([*args, "--dry-run", "--csv"])
    assert csv.exit_code == 0 and csv.stdout.splitlines()[0].endswith(",merged_into")
    table = invoke([*args, "--dry-run"])
    assert table.exit_code == 0 and "1->0 (1.00)" in table.stdout


def _quantised_copy(src: Path, dest: Path) -> None:
    """``src`` with one expert tensor stored as U8 (what MXFP4/int8 storage looks like)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    name = next(n for n in tensors if ".experts.0." in n)
    tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.uint8)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})


def test_merge_refuses_cleanly(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _planted("mixtral", src)
    trace = write_trace(tmp_path / "trace", model=str(src), loads=_LOADS)
    base = ["prune", src, "--trace", trace, "--keep", "3", "--criterion", "frequency"]
    line = assert_clean_error(
        invoke([*base, "--method", "merge", "--merge-by", "output", "--dry-run"]), code=2
    )
    assert "--similarity DIR" in line
    line = assert_clean_error(invoke([*base, "--similarity", tmp_path, "--dry-run"]), code=2)
    assert "--method merge" in line
    line = assert_clean_error(invoke([*base, "--method", "merge", "--similarity", tmp_path, "--dry-run"]))
    assert "similarity.json" in line
    assert_clean_error(invoke([*base, "--method", "average", "--dry-run"]), code=2)
    _quantised_copy(src, tmp_path / "q")
    qtrace = write_trace(tmp_path / "qtrace", model=str(tmp_path / "q"), loads=_LOADS)
    out = tmp_path / "qo"
    args = ["prune", tmp_path / "q", "--trace", qtrace, *base[4:], "--method", "merge", "--out", out]
    line = assert_clean_error(invoke(args))
    assert "quantised" in line and "--method drop" in line and not out.exists()
    with pytest.raises(PruneError, match="unknown --merge-router"):
        P.prune(str(src), trace, "", keep=3, method="merge", merge_router="max", dry_run=True)


def test_merge_prunes_switch_transformers(tmp_path: Path) -> None:
    """The encoder-decoder switch_transformers merges too (its decoder is traced now)."""
    import json

    src = tmp_path / "src"
    tiny_model("switch_transformers").save_pretrained(src)
    p = json.loads(invoke(["params", src, "--json"]).stdout)[0]
    trace = write_trace(
        tmp_path / "trace",
        model=str(src),
        num_experts=p["num_experts"],
        layers=tuple(p["moe_layers"]),
        top_k=1,
    )
    out = tmp_path / "o"
    res = invoke(["prune", src, "--trace", trace, "--drop", "1", "--method", "merge", "--out", out, "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["verified"] is True
    assert json.loads(invoke(["params", out, "--json"]).stdout)[0]["num_experts"] == p["num_experts"] - 1


def test_merge_refuses_a_family_without_a_record(tmp_path: Path) -> None:
    """A layout read from transformers' modules can be dropped from, not merged: one Error line."""
    import torch

    from moescope import families
    from tests import census

    assert families.lookup("minimax_m2") is None
    torch.manual_seed(0)
    src = tmp_path / "src"
    census.build("minimax_m2").save_pretrained(src)
    trace = write_trace(tmp_path / "trace", model=str(src), num_experts=census.EXPERTS, layers=(0, 1))
    out = tmp_path / "o"
    args = ["prune", src, "--trace", trace, "--drop", "1", "--method", "merge", "--out", out]
    assert "use --method drop" in assert_clean_error(invoke(args)) and not out.exists()
