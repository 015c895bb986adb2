"""``moescope import vllm`` and SGLang's OpenAI-compatible responses: counts and routes equal the
trace they were made from; ``--save-routes`` makes an import usable by ``offload``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from moescope.importers import import_routes
from moescope.serving import load_routes, simulate_cache
from moescope.tracedir.files import read_trace_dir
from tests.safety import invoke
from tests.serving_fixtures import demo_trace  # noqa: F401  (fixture)


def _requests(trace: Path) -> list[np.ndarray]:
    """The trace's routing as vLLM returns it: one [tokens, layers, k] int array per document."""
    r = load_routes(trace)
    ids = r.experts.transpose(1, 0, 2).astype(np.int64)
    return [ids[r.doc == d] for d in np.unique(r.doc)]


def _same_as_trace(out: Path, trace: Path) -> None:
    got, want = read_trace_dir(out), read_trace_dir(trace)
    assert np.array_equal(got.state.counts, want.state.counts)
    a, b = load_routes(out), load_routes(trace)
    assert np.array_equal(a.experts, b.experts)
    assert np.array_equal(np.unique(a.doc, return_counts=True)[1], np.unique(b.doc, return_counts=True)[1])


@pytest.mark.parametrize("kind", ["npz", "jsonl-choices", "jsonl-output", "jsonl-base64"])
def test_vllm_import_equals_trace(demo_trace: Path, tmp_path: Path, kind: str) -> None:  # noqa: F811
    reqs = _requests(demo_trace)
    if kind == "npz":
        path = tmp_path / "requests.npz"
        np.savez(path, *reqs)
    else:
        path = tmp_path / "responses.jsonl"
        with open(path, "w") as fh:
            for x in reqs:
                if kind == "jsonl-choices":
                    obj = {
                        "id": "cmpl-1",
                        "choices": [{"index": 0, "text": "", "routed_experts": x.tolist()}],
                    }
                elif kind == "jsonl-output":
                    obj = {"routed_experts": x.tolist(), "domain": "code"}
                else:
                    obj = {
                        "choices": [{"routed_experts": base64.b64encode(x.astype("<i4").tobytes()).decode()}]
                    }
                fh.write(json.dumps(obj) + "\n")
    res = import_routes("vllm", path, model="demo", out=tmp_path / "t", save_routes=True, plots=False)
    assert res.documents == len(reqs) and res.tokens == sum(len(x) for x in reqs)
    _same_as_trace(tmp_path / "t", demo_trace)
    # the offload what-ifs run on the import as on the trace
    assert [c.hits for c in simulate_cache(load_routes(tmp_path / "t"), sizes=[2])] == [
        c.hits for c in simulate_cache(load_routes(demo_trace), sizes=[2])
    ]


def test_sglang_openai_responses(demo_trace: Path, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as fh:
        for x in _requests(demo_trace):
            enc = base64.b64encode(x.astype("<i4").tobytes()).decode()
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "sgl_ext": {"routed_experts": enc},
            }
            fh.write(json.dumps({"object": "chat.completion", "choices": [choice]}) + "\n")
    import_routes("sglang-response", path, model="demo", out=tmp_path / "t", save_routes=True, plots=False)
    _same_as_trace(tmp_path / "t", demo_trace)


def test_vllm_errors_and_cli(demo_trace: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"choices": [{"text": "no routing"}]}) + "\n")
    res = invoke(["import", "vllm", bad, "--model", "demo", "--out", tmp_path / "t"])
    assert (
        res.exit_code == 1
        and "--enable-return-routed-experts" in res.stderr
        and "Traceback" not in res.stderr
    )
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    res = invoke(["import", "vllm", tmp_path / "obj.npy", "--model", "demo", "--out", tmp_path / "t"])
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    one = tmp_path / "one.npy"
    np.save(one, _requests(demo_trace)[0])
    res = invoke(
        ["import", "vllm", one, "--model", "demo", "--out", tmp_path / "v", "--save-routes", "--json"]
    )
    assert res.exit_code == 0, res.stderr
    res = invoke(["offload", tmp_path / "v", "--cache", "2", "--json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)) == 16
