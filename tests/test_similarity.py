"""Tests for moescope.redundancy.run and `moescope similarity`: planted redundancy, measures, CLI."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moescope.cli.app import app
from moescope.pruning import read_trace
from moescope.redundancy import outputs as SO
from moescope.redundancy import run as S
from moescope.tracedir.files import read_trace_dir
from moescope.tracedir.state import TraceState
from moescope.tracing.write import write_trace_dir

_VOCAB = 99
_EXPERTS = 4


def _tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate([*specials, *(string.ascii_lowercase + string.digits + " .,:()=\n")])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _mixtral(seed: int = 0) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_local_experts=_EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.set_experts_implementation("eager")
    return model.eval()


def _plant(model: Any, layer: int, src: int, dst: int) -> None:
    """Copy expert ``src`` (weights and router row) into slot ``dst`` of ``layer``."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        for p in mlp.experts.parameters():
            p[dst] = p[src]
        mlp.gate.weight[dst] = mlp.gate.weight[src]


def _batches(n: int = 4, seq: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, _VOCAB, (2, seq), generator=gen) for _ in range(n)]


def test_planted_duplicate_ranks_first() -> None:
    model = _mixtral()
    _plant(model, layer=0, src=1, dst=3)
    report = S.similarity_report(model, model_ref="tiny", batches=_batches(), samples=100)
    assert report.measures == ["weights", "weight_raw", "router", "outputs"]
    assert report.samples == 100
    pairs = report.pairs()
    top0 = pairs[(pairs.layer == 0) & (pairs["rank"] == 1)].iloc[0]
    assert (top0.expert_a, top0.expert_b) == (1, 3)
    for m in ("weights", "weight_raw", "router", "outputs", "redundancy"):
        assert top0[m] == pytest.approx(1.0, abs=1e-6)
    # The untouched layer has no such pair: random experts are far from identical.
    top1 = pairs[(pairs.layer == 1) & (pairs["rank"] == 1)].iloc[0]
    assert top1.redundancy < 0.5
    scores = report.layer_scores().set_index("layer")
    assert scores.loc[0, "top_pair"] == "1-3"
    assert scores.loc[0, "redundancy"] > scores.loc[1, "redundancy"]
    # Sorted most redundant first within each layer.
    for _, group in pairs.groupby("layer"):
        assert list(group["redundancy"]) == sorted(group["redundancy"], reverse=True)


def test_expert_outputs_match_swiglu_by_hand() -> None:
    model = _mixtral(1)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(7, 32)
    got = SO.expert_outputs(experts, x, _EXPERTS, chunk=3)
    for j in range(_EXPERTS):
        gate, up = (x @ experts.gate_up_proj[j].T).chunk(2, dim=-1)
        want = (torch.nn.functional.silu(gate) * up) @ experts.down_proj[j].T
        torch.testing.assert_close(got[j], want.detach(), rtol=1e-5, atol=1e-6)


def test_output_similarity_is_mean_token_cosine() -> None:
    outs = torch.randn(3, 5, 4)
    mat = SO.output_similarity(outs)
    want = torch.nn.functional.cosine_similarity(outs[0], outs[2], dim=-1).mean()
    assert mat[0, 2] == pytest.approx(float(want), abs=1e-6)
    assert mat[2, 0] == mat[0, 2] and mat[1, 1] == 1.0


def write_trace(
    path: Path, model: str, counts: list[list[int]], coact: dict[tuple[int, int, int], int]
) -> Path:
    """A real trace dir of ``model``: ``counts[layer][expert]``, ``coact[(layer, a, b)]`` (a < b)."""
    state = TraceState(list(range(len(counts))), len(counts[0]), 2, meta={"model": model})
    state.tokens = 100
    state.counts[:] = counts
    for (layer, a, b), n in coact.items():
        state.coact[layer, a, b] = n
    write_trace_dir(path, state, timings={}, plots=False)
    return path


def test_coactivation_jaccard(tmp_path: Path) -> None:
    write_trace(tmp_path, "m", [[10, 6, 4]], {(0, 0, 1): 4})
    mat = S.coactivation_similarity(read_trace(tmp_path), 0, 3)
    assert mat[0, 1] == pytest.approx(4 / (10 + 6 - 4))
    assert mat[1, 0] == mat[0, 1] and mat[1, 2] == 0.0 and mat[0, 2] == 0.0
    # prune's name for the loader is the one loader
    assert read_trace is read_trace_dir


def test_write_report(tmp_path: Path) -> None:
    model = _mixtral()
    report = S.similarity_report(model, model_ref="tiny", batches=None)
    assert report.measures == ["weights", "weight_raw", "router"]
    files = S.write_report(report, tmp_path / "sim")
    names = {f.name for f in files}
    assert {"pairs.csv", "layers.csv", "similarity.json", "similarity_layer000.png"} <= names
    data = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    assert len(data["matrices"]["1"]["weights"]) == _EXPERTS
    assert data["measures"] == ["weights", "weight_raw", "router"]
    assert "weight_raw" in (tmp_path / "sim" / "pairs.csv").read_text().splitlines()[0].split(",")


def test_permuted_copy_scores_one_on_aligned_weights() -> None:
    """An expert with its hidden neurons permuted computes the same function: weights ~1, weight_raw low."""
    model = _mixtral(2)
    experts = model.model.layers[0].mlp.experts
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # by hand: gate rows, up rows and down columns move together
        gate, up = experts.gate_up_proj[1].chunk(2, dim=0)
        experts.gate_up_proj[3] = torch.cat([gate[perm], up[perm]])
        experts.down_proj[3] = experts.down_proj[1][:, perm]
    x = torch.randn(6, 32)
    outs = SO.expert_outputs(experts, x, _EXPERTS)
    torch.testing.assert_close(outs[3], outs[1], rtol=1e-5, atol=1e-6)  # the same function
    report = S.similarity_report(model, model_ref="tiny", batches=None)
    pairs = report.pairs().set_index(["layer", "expert_a", "expert_b"])
    assert pairs.loc[(0, 1, 3), "weights"] >= 0.99
    assert pairs.loc[(0, 1, 3), "weight_raw"] < 0.3
    assert pairs.loc[(0, 1, 3), "rank"] == 1  # the aligned measure finds it
    assert (pairs["weights"] >= pairs["weight_raw"] - 1e-9).all()  # identity is one permutation
    raw_only = S.similarity_report(model, model_ref="tiny", batches=None, align_weights=False)
    assert raw_only.measures == ["weight_raw", "router"]
    np.testing.assert_allclose(
        raw_only.layers[0].matrices["weight_raw"], report.layers[0].matrices["weight_raw"]
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = _mixtral()
    _plant(model, layer=1, src=0, dst=2)
    path = tmp_path_factory.mktemp("sim") / "mixtral"
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _trace(path: Path, model: str, num_experts: int = _EXPERTS) -> Path:
    counts = [[10 + e for e in range(num_experts)] for _ in (0, 1)]
    return write_trace(path, model, counts, {(0, 0, 1): 5, (1, 0, 2): 7})


runner = CliRunner()


@pytest.mark.slow
def test_cli_json_with_trace(saved: Path, tmp_path: Path) -> None:
    trace = _trace(tmp_path / "trace", str(saved))
    res = runner.invoke(
        app,
        [
            "similarity",
            str(saved),
            "--trace",
            str(trace),
            "--no-outputs",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 2 * 6
    first = next(r for r in rows if r["layer"] == 1)
    assert (first["expert_a"], first["expert_b"], first["rank"]) == (0, 2, 1)
    assert first["coactivation"] == pytest.approx(7 / (10 + 12 - 7))
    assert {"weights", "router", "redundancy"} <= set(first)
    assert (tmp_path / "o" / "plots" / "similarity_layer001.png").exists()


def test_cli_outputs_with_corpus(saved: Path, tmp_path: Path) -> None:
    pytest.importorskip("moescope.corpus.read")
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x): return x + 1\n" * 20)
    res = runner.invoke(
        app,
        ["similarity", str(saved), "--corpus", str(corpus), "--samples", "64", "--json"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)
    top = next(r for r in rows if r["layer"] == 1)
    assert (top["expert_a"], top["expert_b"]) == (0, 2) and top["outputs"] == pytest.approx(1.0)


def test_cli_rejects_other_model_trace(saved: Path, tmp_path: Path) -> None:
    trace = _trace(tmp_path / "trace", "org/other")
    res = runner.invoke(app, ["similarity", str(saved), "--trace", str(trace), "--no-outputs", "--json"])
    assert res.exit_code == 1
    assert [line for line in res.stderr.splitlines() if line.startswith("Error:")] == [
        res.stderr.strip().splitlines()[-1]
    ]
    assert "org/other" in res.stderr and "Traceback" not in res.stderr


def test_cosine_matrix_handles_zero_rows() -> None:
    m = S.cosine_matrix(np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]))
    assert m[0, 2] == pytest.approx(1.0) and m[0, 1] == 0.0 and m[1, 1] == 1.0


def test_cli_refuses_incomplete_trace(saved: Path, tmp_path: Path) -> None:
    """One loader for every command: a directory without state.npz is not a trace."""
    trace = _trace(tmp_path / "trace", str(saved))
    (trace / "state.npz").unlink()
    res = runner.invoke(app, ["similarity", str(saved), "--trace", str(trace), "--no-outputs", "--json"])
    assert res.exit_code == 1 and "state.npz" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""
