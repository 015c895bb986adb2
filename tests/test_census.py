"""Census: every MoE family of the *installed* transformers, sized by ``params`` and traced by ``trace``.

The families are enumerated at test time (:func:`tests.census.moe_families`), never from a
fixed list, so a transformers release that adds a family makes this test fail until the
family is covered or listed in :data:`PARAMS_GAPS` with the reason. Each family's tiny model
is built from its config class's shrunk defaults, saved with ``save_pretrained``, and
``moescope params`` on the directory is checked against an independent count on the model
itself: total = ``sum(p.numel())`` of the built model; active = total minus vision/audio towers
minus, per experts module, its parameters × (1 − k/E), with k the router module's ``top_k``
(else the config's ``num_experts_per_tok``) and E its first dimension.

``trace`` (the CLI, on the saved model with a character tokenizer) is checked against the
experts modules' own ``top_k_index``: a forward pre-hook on every experts module of the
model loaded by transformers, on the same token windows, counts what the experts really
received. Families that cannot be traced exactly are in :data:`TRACE_GAPS` with the reason.

``python -m tests.test_census`` prints the README coverage table from the same checks.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests import census

#: families whose params figure is not exact yet, with what a user sees and why (README table)
PARAMS_GAPS: dict[str, str] = {
    "ergo": "refused in one line: its config's MoE layers do not match the experts transformers builds",
    "step3p7": "refused in one line: its config's MoE layers do not match the experts transformers builds",
    "granitemoehybrid": "refused in one line: read by the granitemoe record, whose layer placement does not fit its hybrid layers",
    "ernie4_5_vl_moe": "refused in one line: text and vision experts (two expert counts) in one layer",
    "nllb-moe": "exact by its record (tests/test_families.py); this independent count knows no per-expert ModuleDict",
    "switch_transformers": "exact by its record (tests/test_families.py); this independent count knows no per-expert ModuleDict",
}

#: families whose trace is not exact yet, with what a user sees and why (README table)
TRACE_GAPS: dict[str, str] = {
    "switch_transformers": "traced by its record (encoder and decoder, checked in tests/test_families.py); its experts take no ids, so not checked here",
    "nllb-moe": "traced by its record (encoder and decoder, top-2 after capacity drops, checked in tests/test_families.py); its experts take no ids, so not checked here",
    "diffusion_gemma": "refused in one line: encoder and decoder MoE blocks share layer indices",
    "ernie4_5_vl_moe": "refused in one line: text and vision experts share a layer",
    "qwen3_omni_moe_thinker": "fails inside transformers on text-only input (vision_start_token_id missing)",
}

_SEQ, _WINDOWS = 16, 4
_TEXT = ("the quick brown fox 0123456789 jumps over (lazy) dogs, again: x=y+1. " * 8)[: _WINDOWS * _SEQ - 1]

_TOWER = re.compile(r"(vision|visual|multi_modal_projector|image|audio|patch_embed|mm_projector)")


def independent_count(model: Any) -> tuple[int, int | None]:
    """(total, active) from the built model's own modules, not from moescope's classifier."""
    total = sum(p.numel() for p in model.parameters())
    experts = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if hasattr(module, "_is_expert_parallel") and not any(name.startswith(n + ".") for n, _ in experts):
            # an experts module whose tensors are tied to one already counted (diffusion_gemma's
            # encoder and decoder layers share every weight) is the same experts, once in the
            # total: subtracting its inactive share again would count the tied weights twice
            ids = {id(p) for p in module.parameters()}
            if ids and ids <= seen:
                continue
            seen |= ids
            experts.append((name, module))
    text = getattr(model.config, "text_config", None) or model.config
    k = None
    for name, _ in experts:
        block = model.get_submodule(name.rpartition(".")[0])
        for attr in ("gate", "router"):
            top_k = getattr(getattr(block, attr, None), "top_k", None)
            if isinstance(top_k, int):
                k = top_k
    k = k or getattr(text, "num_experts_per_tok", None) or getattr(text, "top_k_experts", None)
    if not experts or not k:
        return total, None
    tower = sum(p.numel() for n, p in model.named_parameters() if _TOWER.search(n))
    inactive = 0
    for _, module in experts:
        e = getattr(module, "num_experts", None)
        if not isinstance(e, int):
            e = max(p.shape[0] for p in module.parameters() if p.dim() == 3)
        inactive += round(sum(p.numel() for p in module.parameters()) * (1 - k / e))
    return total, total - inactive - tower


def check_params(model_type: str) -> tuple[bool, str]:
    """(exact, what was seen) for one family: moescope params on the saved tiny model vs the model."""
    from moescope.accounting.params import count_params

    model = census.build(model_type)
    total, active = independent_count(model)
    with tempfile.TemporaryDirectory(prefix=f"census-{model_type}-") as d:
        model.save_pretrained(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                rep = count_params(d)
            except Exception as exc:  # a refusal: one line
                return False, f"refused: {str(exc).splitlines()[0][:160]}"
    got = (rep.total_params, rep.active_params)
    return got == (total, active), f"total {got[0]} vs {total}, active {got[1]} vs {active}"


def check_trace(model_type: str, root: Path) -> tuple[bool, str]:
    """(exact, what was seen): ``moescope trace`` counts vs the experts modules' ``top_k_index``."""
    import pandas as pd
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from moescope.execution.load import auto_class
    from moescope.families import layer_of
    from tests.safety import invoke
    from tests.tiny import char_tokenizer

    torch.manual_seed(0)
    model = census.build(model_type)
    for c in (model.config, getattr(model.config, "text_config", None)):
        if c is not None:
            c.pad_token_id, c.bos_token_id, c.eos_token_id = 0, 1, 2
    path = root / model_type
    model.save_pretrained(path)
    tok = char_tokenizer()
    tok.save_pretrained(path)
    (root / "corpus.txt").write_text(_TEXT)
    args = ["trace", path, root / "corpus.txt", "--out", root / "trace", "--seq-len", _SEQ]
    res = invoke([*args, "--batch-size", _WINDOWS, "--no-plots", "-q"])
    if res.exit_code != 0:
        return False, (res.stderr or res.output).strip().splitlines()[-1][:200]
    load = pd.read_csv(root / "trace" / "expert_load.csv")
    got = {(int(r.layer), int(r.expert)): int(r.count) for r in load.itertuples() if r.count}
    # the tokenizer the trace loads: transformers may map the model type to its own class, which
    # re-tokenizes the character vocabulary (qwen3_5_moe); windows are packed as trace packs one
    # document (its tokens, then EOS; the last window padded and masked)
    used = AutoTokenizer.from_pretrained(path)
    ids = used(_TEXT, add_special_tokens=False)["input_ids"] + [used.eos_token_id]
    rows = -(-len(ids) // _SEQ)
    batch = torch.zeros(rows, _SEQ, dtype=torch.long)
    batch.view(-1)[: len(ids)] = torch.tensor(ids)
    mask = torch.zeros(rows * _SEQ, dtype=torch.bool)
    mask[: len(ids)] = True
    head, kind = auto_class(AutoConfig.from_pretrained(path))
    loaded = head.from_pretrained(path, dtype=torch.float32).eval()
    want: dict[tuple[int, int], int] = {}

    def hook(name: str) -> Any:
        def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            if weights is not None and weights.shape == index.shape:
                # a weight-0 slot contributes nothing (longcat_flash's zero experts, zaya's skip
                # class arrive as a real id with weight 0): not a route
                index = index.masked_fill(weights == 0, -1)
            if index.shape[0] == mask.numel():  # one row per token: padding is not counted
                index = index[mask]
            for e in index.reshape(-1).tolist():
                if e >= 0:
                    key = (int(layer_of(name) or 0), int(e))
                    want[key] = want.get(key, 0) + 1

        return pre

    for name, module in loaded.named_modules():
        if hasattr(module, "_is_expert_parallel"):
            module.register_forward_pre_hook(hook(name), with_kwargs=True)
    with torch.no_grad():
        attention = mask.view(rows, _SEQ).long()
        if kind == "seq2seq":
            loaded(input_ids=batch, attention_mask=attention, decoder_input_ids=batch[:, :1])
        else:
            loaded(input_ids=batch, attention_mask=attention)
    return got == want, f"{sum(got.values())} assignments traced, {sum(want.values())} seen by the experts"


def check_prune(model_type: str, root: Path) -> tuple[bool, str]:
    """(ok, what was seen): prune 2 experts per layer by the trace; the output reloads with the right count.

    The right count is the parameter count of the model transformers builds from the pruned
    config (a wrong slice would not load: missing or mismatched keys), and it must be smaller
    than the original by at least the routed experts' share.
    """
    import json

    import torch
    from transformers import AutoConfig

    from moescope.accounting.params import count_params
    from moescope.execution.load import auto_class
    from tests.safety import invoke

    traced, seen = check_trace(model_type, root)
    if not (root / "trace" / "summary.json").exists():
        return False, f"no trace: {seen}"
    path, out = root / model_type, root / "pruned"
    try:
        before = count_params(str(path))
    except Exception as exc:  # a refusal: one line
        return False, f"refused: {str(exc).splitlines()[0][:160]}"
    res = invoke(["prune", path, "--trace", root / "trace", "--drop", 2, "--out", out, "--json"])
    if res.exit_code != 0:
        return False, (res.stderr or res.output).strip().splitlines()[-1][:200]
    if not json.loads(res.stdout).get("verified"):
        return False, "not verified"
    after = count_params(str(out))
    head, _ = auto_class(AutoConfig.from_pretrained(out))
    with torch.device("meta"):
        built = head.from_config(AutoConfig.from_pretrained(out))
    expected = sum(p.numel() for p in built.parameters())
    reloaded = head.from_pretrained(out, dtype=torch.float32)
    got = sum(p.numel() for p in reloaded.parameters())
    ok = (
        got == expected
        and after.num_experts == before.num_experts - 2
        and before.total_params - after.total_params
        >= before.components["routed_experts"] * 2 // before.num_experts
    )
    return ok, f"reloaded {got} vs built {expected}; experts {before.num_experts} -> {after.num_experts}"


def check_stream(model_type: str, root: Path) -> tuple[bool, str]:
    """(same, what was seen): the trace streamed layer by layer (float32) equals the in-memory one.

    Runs after :func:`check_trace` in the same ``root`` (the saved model and corpus are there).
    """
    import pandas as pd

    from tests.safety import invoke

    counts = []
    for mode in ("--no-stream", "--stream"):
        args = [
            "trace",
            root / model_type,
            root / "corpus.txt",
            "--out",
            root / f"t{mode}",
            "--seq-len",
            _SEQ,
        ]
        res = invoke([*args, "--batch-size", _WINDOWS, "--no-plots", "-q", "--dtype", "float32", mode])
        if res.exit_code != 0:
            return False, f"{mode}: " + (res.stderr or res.output).strip().splitlines()[-1][:200]
        load = pd.read_csv(root / f"t{mode}" / "expert_load.csv")
        counts.append({(int(r.layer), int(r.expert)): int(r.count) for r in load.itertuples()})
    return counts[0] == counts[
        1
    ], f"{sum(counts[1].values())} streamed vs {sum(counts[0].values())} in memory"


FAMILIES = census.moe_families()


def _verdict(model_type: str, ok: bool, seen: str, name: str, now: str) -> None:
    """Pass an exact family, skip one listed in the gaps dict ``name``, fail otherwise; a gap that
    closed must leave its list (the README table would be wrong): ``now`` says what it does then."""
    gaps: dict[str, str] = globals()[name]
    if model_type in gaps:
        assert not ok, f"{model_type} {now} now: remove it from {name} ({seen})"
        pytest.skip(gaps[model_type])
    assert ok, f"{model_type}: {seen}"


def test_census_finds_the_families() -> None:
    """The enumeration reads the installed transformers (it would be empty if the scan broke)."""
    assert len(FAMILIES) >= 60
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "switch_transformers"} <= set(FAMILIES)


def test_every_gap_is_a_family() -> None:
    assert set(PARAMS_GAPS) <= set(FAMILIES), sorted(set(PARAMS_GAPS) - set(FAMILIES))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_params_equals_the_model(model_type: str) -> None:
    if model_type in census.SKIP:
        pytest.skip(census.SKIP[model_type])
    exact, seen = check_params(model_type)
    _verdict(model_type, exact, seen, "PARAMS_GAPS", "is exact")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_trace_equals_the_experts_inputs(model_type: str, tmp_path: Path) -> None:
    if model_type in census.SKIP:
        pytest.skip(census.SKIP[model_type])
    exact, seen = check_trace(model_type, tmp_path)
    _verdict(model_type, exact, seen, "TRACE_GAPS", "traces exactly")


#: families whose streamed trace is not the in-memory one, with what a user sees and why
STREAM_GAPS: dict[str, str] = {
    "switch_transformers": "refused in one line: encoder-decoder models are not streamed",
    "nllb-moe": "refused in one line: encoder-decoder models are not streamed",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_stream_equals_in_memory(model_type: str, tmp_path: Path) -> None:
    if model_type in census.SKIP:
        pytest.skip(census.SKIP[model_type])
    traced, seen = check_trace(model_type, tmp_path)
    if not (tmp_path / "trace" / "summary.json").exists():
        pytest.skip(f"not traced: {seen}")
    same, seen = check_stream(model_type, tmp_path)
    _verdict(model_type, same, seen, "STREAM_GAPS", "streams")


@pytest.mark.slow
def test_sweep_of_a_family_without_a_record(tmp_path: Path) -> None:
    """top-k goes through the router's own top_k: native = eval, k=1 takes one expert; top-p refused."""
    import json

    from moescope import families
    from tests.safety import invoke

    mt = "minimax_m2"
    assert families.lookup(mt) is None  # the generic adapter's, not a record's
    check_trace(mt, tmp_path)  # saves the model and corpus
    args = [tmp_path / mt, tmp_path / "corpus.txt", "--seq-len", _SEQ, "--json"]
    res = invoke(["sweep", *args[:2], "--top-k", "1,4", *args[2:]])
    assert res.exit_code == 0, res.stderr
    rows = {r["setting"]: r for r in json.loads(res.stdout)}
    ev = json.loads(invoke(["eval", *args]).stdout)
    assert rows["native"]["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-9)
    assert rows["k=1"]["experts_per_token"] == 1 and rows["k=4"]["experts_per_token"] == 4
    assert rows["k=1"]["perplexity"] != rows["native"]["perplexity"]
    res = invoke(["sweep", *args[:2], "--top-p", "0.5", *args[2:]])
    assert res.exit_code == 2 and "top-p" in res.stderr and "Traceback" not in res.stderr


def check_sweep(model_type: str, root: Path) -> tuple[bool, str]:
    """(works, what was seen): ``sweep --top-k 1`` through the router's own rule.

    Runs after :func:`check_trace` in the same ``root``. Works when the native setting's
    perplexity is ``eval``'s and k=1 routes one expert per token (perplexity changed when the
    native k is larger).
    """
    import json

    from tests.safety import invoke

    args = [root / model_type, root / "corpus.txt", "--seq-len", _SEQ, "--json"]
    res = invoke(["sweep", *args[:2], "--top-k", "1", *args[2:]])
    if res.exit_code != 0:
        return False, (res.stderr or res.output).strip().splitlines()[-1][:200]
    rows = {r["setting"]: r for r in json.loads(res.stdout)}
    ev = invoke(["eval", *args])
    if ev.exit_code != 0:
        return False, "eval: " + (ev.stderr or ev.output).strip().splitlines()[-1][:200]
    native, one, want = rows["native"], rows.get("k=1", rows["native"]), json.loads(ev.stdout)["perplexity"]
    same = math.isclose(native["perplexity"], want, rel_tol=1e-6)
    moved = native["experts_per_token"] == 1 or one["perplexity"] != native["perplexity"]
    ok = same and one["experts_per_token"] == 1 and moved
    return (
        ok,
        f"native {native['perplexity']:.4g} vs eval {want:.4g}; k=1: {one['experts_per_token']} experts/token",
    )


#: families whose top-k sweep does not work, with what a user sees and why (README table)
SWEEP_GAPS: dict[str, str] = {
    "deepseek_v4": "runs, but its hash-routed layers (token-id lookup table) keep their k: k=1 gives 1.33 experts/token on the census model, shown per layer",
    "ergo": "refused: see params",
    "glm4v_moe_text": "refused in one line: a text sub-model has no language-model head, so no perplexity (sweep the full model)",
    "glm5_next_text": "refused in one line: a text sub-model has no language-model head, so no perplexity (sweep the full model)",
    "granitemoehybrid": "refused: see params",
    "hy_v4_vl_text": "refused in one line: a text sub-model has no language-model head, so no perplexity (sweep the full model)",
    "mistral_large4_text": "refused in one line: a text sub-model has no language-model head, so no perplexity (sweep the full model)",
    "muse_spark_text": "refused in one line: a text sub-model has no language-model head, so no perplexity (sweep the full model)",
    "nllb-moe": "refused in one line: capacity-limited top-2 routing of an encoder-decoder",
    "openai_privacy_filter": "refused in one line: a text sub-model has no language-model head, so no perplexity (sweep the full model)",
    "phimoe": "refused in one line: sparsemixer routing always takes 2 experts",
    "qwen3_vl_moe_text": "refused in one line: a text sub-model has no language-model head, so no perplexity (sweep the full model)",
    "step3p7": "refused: see params",
    "switch_transformers": "refused in one line: capacity-limited top-1 routing of an encoder-decoder",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_sweep_top_k(model_type: str, tmp_path: Path) -> None:
    if model_type in census.SKIP:
        pytest.skip(census.SKIP[model_type])
    check_trace(model_type, tmp_path)
    if not (tmp_path / "trace" / "summary.json").exists():
        pytest.skip("not traced")
    ok, seen = check_sweep(model_type, tmp_path)
    _verdict(model_type, ok, seen, "SWEEP_GAPS", "sweeps")


#: families pruning does not handle yet, with what a user sees and why (README table)
PRUNE_GAPS: dict[str, str] = {
    "diffusion_gemma": "not traced (see trace)",
    "ernie4_5_vl_moe": "not traced (see trace)",
    "qwen3_omni_moe_thinker": "not traced (see trace)",
    "ergo": "refused: see params",
    "step3p7": "refused: see params",
    "granitemoehybrid": "refused: see params",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_prune_reloads_with_the_right_count(model_type: str, tmp_path: Path) -> None:
    if model_type in census.SKIP:
        pytest.skip(census.SKIP[model_type])
    ok, seen = check_prune(model_type, tmp_path)
    _verdict(model_type, ok, seen, "PRUNE_GAPS", "prunes")


def _safely(check: Any, *args: Any) -> bool:
    """A check's verdict; anything it raises is a "no" (the table lists every family)."""
    try:
        return bool(check(*args)[0])
    except Exception:
        return False


def coverage_table() -> str:
    """The README coverage table (markdown), from the checks above (``python -m tests.test_census``)."""
    rows = ["| family | params | trace | prune | sweep | stream | note |", "|---|---|---|---|---|---|---|"]
    totals = [0, 0, 0, 0, 0]
    for mt in FAMILIES:
        if mt in census.SKIP:
            rows.append(f"| {mt} | - | - | - | - | - | not built: {census.SKIP[mt]} |")
            continue
        p_ok = _safely(check_params, mt)
        with tempfile.TemporaryDirectory() as d:
            t_ok = _safely(check_trace, mt, Path(d))
            traced = (Path(d) / "trace" / "summary.json").exists()
            w_ok = traced and _safely(check_sweep, mt, Path(d))
            s_ok = traced and _safely(check_stream, mt, Path(d))
        with tempfile.TemporaryDirectory() as d:
            r_ok = _safely(check_prune, mt, Path(d))
        gaps = (
            (p_ok, PARAMS_GAPS, "params"),
            (t_ok, TRACE_GAPS, "trace"),
            (r_ok, PRUNE_GAPS, "prune"),
            (w_ok, SWEEP_GAPS, "sweep"),
            (s_ok, STREAM_GAPS, "stream"),
        )
        notes = [f"{what}: {g[mt]}" for ok, g, what in gaps if not ok and mt in g]
        for i, ok in enumerate((p_ok, t_ok, r_ok, w_ok, s_ok)):
            totals[i] += ok
        cells = ["exact" if p_ok else "no", "exact" if t_ok else "no", "reloads" if r_ok else "no"]
        cells += ["top-k" if w_ok else "no", "same" if s_ok else "no"]
        rows.append(f"| {mt} | {' | '.join(cells)} | {'; '.join(notes)} |")
    n = len(FAMILIES)
    rows.append(f"| **{n} families** | " + " | ".join(f"**{t}**" for t in totals) + " | |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(coverage_table())
