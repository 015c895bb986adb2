"""Every bad input gets one clean error (issue 8): a case table run through the real CLI.

Each case checks the exit code (2 for bad usage, before any model is loaded; 1 for bad data
or failed work; 130 for Ctrl-C), exactly one ``Error:`` line for exit 1, no traceback, and
that every input is byte-identical afterwards. Failures that are hard to provoke for real
(disk full, an unexpected exception type, torch without CUDA at run time) are raised by a
patched library function, at the boundary between the CLI and the library.

Also here: no pickle is ever loaded or downloaded, an unreachable hub fails in seconds
(loopback endpoints only), and ``eval`` warns when ``--seq-len`` exceeds the model's context.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.safety import assert_clean_error, invoke, snapshot

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()

_CORPUS_TEXT = "the quick brown fox jumps over the lazy dog.\n" * 4


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bin_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory with config.json and only pickled weights (pytorch_model.bin)."""
    from tests.tiny import tiny_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("binonly")
    model = tiny_model("mixtral")
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A corpus file and an earlier output with a file in it, to check nothing changes."""
    (tmp_path / "corpus.txt").write_text(_CORPUS_TEXT)
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "keep.txt").write_text("precious")
    return tmp_path


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything calls torch.load or pickle.load(s)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pickle was loaded")  # pragma: no cover - the failure being tested for

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def _closed_port() -> int:
    """A loopback port nobody listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Online mode with HF_ENDPOINT on a refused loopback port; yields the endpoint."""
    import huggingface_hub.constants as c

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    yield endpoint


# ----------------------------------------------------------------------------- the case table


def _raise(exc: BaseException) -> Callable[..., Any]:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return boom


def _with_outcome(exc: BaseException, outcome: str) -> BaseException:
    exc.moescope_outcome = outcome  # type: ignore[attr-defined]
    return exc


def _hf_error(name: str, message: str) -> BaseException:
    """A huggingface_hub error; the HTTP ones need a (loopback) response object."""
    from huggingface_hub import errors

    cls = getattr(errors, name)
    try:
        return cls(message)  # type: ignore[no-any-return]
    except TypeError:
        httpx2 = pytest.importorskip("httpx2")
        request = httpx2.Request("GET", "http://127.0.0.1/org/name")
        return cls(message, response=httpx2.Response(403, request=request))  # type: ignore[no-any-return]


@dataclass
class Case:
    """One bad input: CLI args (``{w}`` is the work dir, ``{bin}`` the pickle-only checkpoint)."""

    args: list[str]
    code: int
    contains: str
    patch: tuple[str, Callable[[], BaseException]] | None = None


def _zero_division() -> BaseException:
    return ZeroDivisionError("division by zero")


def _enospc() -> BaseException:
    exc = OSError(errno.ENOSPC, "No space left on device", "shard.safetensors")
    return _with_outcome(exc, "nothing was written to t")


def _no_cuda() -> BaseException:
    return AssertionError("Torch not compiled with CUDA enabled")


def _json_error() -> BaseException:
    return json.JSONDecodeError("Expecting value", "{", 1)


def _safetensors_error() -> BaseException:
    from safetensors import SafetensorError

    return SafetensorError("bad header")


def _hf(name: str) -> Callable[[], BaseException]:
    return lambda: _hf_error(name, "from the hub")


def _eacces() -> BaseException:
    return PermissionError(errno.EACCES, "Permission denied", "x")


def _interrupt_with_outcome() -> BaseException:
    return _with_outcome(KeyboardInterrupt(), "the previous trace is unchanged")


_NO_CUDA = pytest.mark.skipif(HAS_CUDA, reason="this torch has CUDA")
_PARAMS = ["params", "demo"]
_COUNT = "moescope.accounting.params.count_params"
_RUN_TRACE = "moescope.tracing.run_trace"
_EVALUATE = "moescope.evaluation.perplexity.evaluate"
_TRACE = ["trace", "demo", "{w}/corpus.txt", "--out", "{w}/t"]
_SIM = ["similarity", "demo", "--out", "{w}/s"]
_EVAL = ["eval", "demo", "{w}/corpus.txt"]
_PRUNE = ["prune", "demo", "--trace", "{w}/earlier", "--ratio", "0.25", "--dry-run"]

CASES: list[Any] = [
    # --device: unknown, or one this torch/machine lacks (usage error, exit 2, nothing loaded)
    pytest.param(Case([*_EVAL, "--device", "cuda"], 2, "no CUDA"), marks=_NO_CUDA, id="eval-device-cuda"),
    pytest.param(Case([*_TRACE, "--device", "cuda"], 2, "no CUDA"), marks=_NO_CUDA, id="trace-device-cuda"),
    pytest.param(Case([*_SIM, "--device", "cuda:0"], 2, "no CUDA"), marks=_NO_CUDA, id="sim-device-cuda0"),
    pytest.param(Case([*_EVAL, "--device", "bogus"], 2, "unknown device"), id="eval-device-bogus"),
    pytest.param(Case([*_TRACE, "--device", "gpu"], 2, "unknown device"), id="trace-device-gpu"),
    pytest.param(Case([*_SIM, "--device", "cuda:x"], 2, "unknown device"), id="sim-device-cuda-x"),
    # --dtype
    pytest.param(Case([*_EVAL, "--dtype", "int8"], 2, "unknown dtype"), id="eval-dtype"),
    pytest.param(Case([*_TRACE, "--dtype", "fp8"], 2, "unknown dtype"), id="trace-dtype"),
    pytest.param(Case([*_SIM, "--dtype", "double"], 2, "unknown dtype"), id="sim-dtype"),
    # --split
    pytest.param(Case([*_EVAL, "--split", "test"], 2, "unknown split"), id="eval-split"),
    pytest.param(Case([*_TRACE, "--split", "validation"], 2, "unknown split"), id="trace-split"),
    pytest.param(Case([*_SIM, "--split", "dev"], 2, "unknown split"), id="sim-split"),
    # --criterion
    pytest.param(Case([*_PRUNE, "--criterion", "magnitude"], 2, "unknown criterion"), id="prune-criterion"),
    # other usage errors, checked before any work
    pytest.param(Case(["params", "demo", "--context", "0"], 2, "--context"), id="params-context-0"),
    pytest.param(Case([*_EVAL, "--json", "--csv"], 2, "--json and --csv"), id="eval-json-csv"),
    pytest.param(Case([*_EVAL, "--seq-len", "8", "--stride", "9"], 2, "--stride"), id="eval-stride"),
    pytest.param(Case([*_TRACE, "--seq-len", "0"], 2, "--seq-len"), id="trace-seq-len-0"),
    pytest.param(Case(["prune", "demo", "--trace", "{w}/earlier"], 2, "exactly one"), id="prune-no-amount"),
    # pickled weights are refused, never unpickled
    pytest.param(Case(["eval", "{bin}", "{w}/corpus.txt"], 1, "pickled weights"), id="eval-bin-only"),
    pytest.param(
        Case(["trace", "{bin}", "{w}/corpus.txt", "--out", "{w}/t"], 1, "safe_serialization"), id="trace-bin-only"
    ),
    pytest.param(Case(["download", "./not-a-hub-id"], 1, "not a hub id"), id="download-not-hub-id"),
    # offline and not cached: says so, with the cache path
    pytest.param(
        Case(["eval", "org/not-cached", "{w}/corpus.txt"], 1, "not in the HF cache at"), id="eval-offline"
    ),
    pytest.param(Case(["params", "org/not-cached"], 1, "HF_HUB_OFFLINE=1"), id="params-offline"),
    # failures from inside the library, mapped by the one table
    *[
        pytest.param(Case(args, code, contains, (target, make)), id=name)
        for name, args, target, make, code, contains in [
            ("unexpected-type", _PARAMS, _COUNT, _zero_division, 1,
             "ZeroDivisionError: division by zero (set MOESCOPE_DEBUG=1 for the traceback)"),
            ("enospc-with-outcome", _TRACE, _RUN_TRACE, _enospc, 1,
             "shard.safetensors: no space left on device; free some space or write elsewhere "
             "(--out; HF_HUB_CACHE for downloads); nothing was written to t."),
            ("cuda-at-run-time", _EVAL, _EVALUATE, _no_cuda, 1, "this torch has no CUDA; pass --device cpu"),
            ("json-decode", _PARAMS, _COUNT, _json_error, 1, "malformed JSON"),
            ("safetensors-error", _PARAMS, _COUNT, _safetensors_error, 1, "unreadable safetensors"),
            ("hf-local-entry", _PARAMS, _COUNT, _hf("LocalEntryNotFoundError"), 1, "not in the HF cache"),
            ("hf-gated", _PARAMS, _COUNT, _hf("GatedRepoError"), 1, "gated"),
            ("hf-repo-not-found", _PARAMS, _COUNT, _hf("RepositoryNotFoundError"), 1, "no such model"),
            ("eacces", _PARAMS, _COUNT, _eacces, 1, "x: permission denied"),
            ("memory-error", _PARAMS, _COUNT, MemoryError, 1, "out of memory"),
            ("ctrl-c", _PARAMS, _COUNT, KeyboardInterrupt, 130, "interrupted."),
            ("ctrl-c-with-outcome", _TRACE, _RUN_TRACE, _interrupt_with_outcome, 130,
             "interrupted; the previous trace is unchanged."),
        ]
    ],
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clean_error(
    case: Case,
    workdir: Path,
    bin_only: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_unpickling: None,
) -> None:
    args = [a.replace("{w}", str(workdir)).replace("{bin}", str(bin_only)) for a in case.args]
    if case.patch is not None:
        target, make = case.patch
        module, _, name = target.rpartition(".")
        monkeypatch.setattr(__import__(module, fromlist=[name]), name, _raise(make()))
    before = snapshot(workdir, bin_only)
    result = invoke(args)
    if case.code == 130:  # Ctrl-C: one Error line too, with its own exit code
        assert result.exit_code == 130, (result.stdout, result.stderr)
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
        assert len(errors) == 1 and case.contains in errors[0], result.stderr
        assert "Traceback" not in result.stderr
    else:
        line = assert_clean_error(result, case.code, case.contains)
        if case.code == 1:
            assert line.startswith("Error: ") and "\n" not in line
    assert snapshot(workdir, bin_only) == before
    assert not (workdir / "t").exists() and not (workdir / "s").exists()


def test_error_table_appends_the_outcome_and_keeps_one_line() -> None:
    from moescope.cli._errors import format_error

    exc = _with_outcome(
        OSError(errno.ENOSPC, "No space left", "/x/out/a.csv"), "/x/out still holds the previous trace."
    )
    text = format_error(exc)
    assert text == (
        "/x/out/a.csv: no space left on device; free some space or write elsewhere "
        "(--out; HF_HUB_CACHE for downloads); "
        "/x/out still holds the previous trace."
    )
    assert format_error(KeyboardInterrupt()) == "interrupted."
    assert "\n" not in format_error(RuntimeError("line one\nline two"))
    assert format_error(RuntimeError("")) == "RuntimeError (set MOESCOPE_DEBUG=1 for the traceback)"


def test_value_error_from_moescope_is_the_message_and_from_elsewhere_is_generic() -> None:
    from moescope.cli._errors import format_error
    from moescope.evaluation.perplexity import perplexity

    with pytest.raises(ValueError) as ours:
        perplexity(None, None, [], seq_len=1)
    assert format_error(ours.value) == "--seq-len 1 is too short; use at least 2."
    with pytest.raises(ValueError) as theirs:
        int("x")
    assert format_error(theirs.value).startswith("ValueError: invalid literal")
    assert format_error(theirs.value).endswith("(set MOESCOPE_DEBUG=1 for the traceback)")


def test_moescope_debug_reraises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "moescope.accounting.params.count_params", _raise(ZeroDivisionError("division by zero"))
    )
    monkeypatch.setenv("MOESCOPE_DEBUG", "1")
    result = invoke(["params", "demo"])
    assert isinstance(result.exception, ZeroDivisionError)
    assert "Error:" not in result.stderr


# ----------------------------------------------------------------------------- shared options


def test_options_normalise_and_keep_defaults(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    """Aliases arrive canonical; each command's default is unchanged."""
    import inspect

    from moescope.cli import eval as eval_cli
    from moescope.cli import prune as prune_cli
    from moescope.cli import similarity as sim_cli
    from moescope.cli import trace as trace_cli
    from moescope.cli._options import CRITERIA, check_device, check_dtype, check_split

    assert (
        check_dtype("BF16") == "bfloat16"
        and check_dtype("fp32") == "float32"
        and check_dtype("auto") == "auto"
    )
    assert check_device("CPU") == "cpu" and check_split("HeldOut") == "heldout" and check_split(None) is None
    from moescope.pruning import CRITERIA as LIBRARY_CRITERIA

    assert CRITERIA == LIBRARY_CRITERIA
    defaults = {
        "eval": inspect.signature(eval_cli.eval_cmd).parameters,
        "trace": inspect.signature(trace_cli.trace_cmd).parameters,
        "similarity": inspect.signature(sim_cli.similarity_cmd).parameters,
    }
    assert {
        k: (p["dtype"].default, p["device"].default, p["split"].default) for k, p in defaults.items()
    } == {
        "eval": ("auto", "cpu", None),
        "trace": ("auto", "cpu", None),
        "similarity": ("auto", "cpu", None),
    }
    assert inspect.signature(prune_cli.prune_cmd).parameters["criterion"].default == "reap"

    seen: dict[str, Any] = {}

    def fake_evaluate(model: str, corpus: list[str], **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise ZeroDivisionError("stop here")

    monkeypatch.setattr("moescope.evaluation.perplexity.evaluate", fake_evaluate)
    invoke(["eval", "demo", str(workdir / "corpus.txt"), "--dtype", "BF16", "--split", "Train"])
    assert seen["dtype"] == "bfloat16" and seen["split"] == "train" and seen["device"] == "cpu"


# ----------------------------------------------------------------------------- no pickles


def test_tokenizer_and_model_load_without_unpickling(no_unpickling: None) -> None:
    from moescope.execution.load import load_model

    model, tok = load_model("demo")
    assert tok("ab")["input_ids"] and sum(p.numel() for p in model.parameters()) > 0


def test_hub_model_is_loaded_with_use_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached hub id goes to from_pretrained with use_safetensors=True; a bin-only repo gets the fix."""
    import transformers

    from moescope.checkpoint.hub import hub_env
    from moescope.errors import CheckpointError
    from moescope.execution.load import load_model

    cache = Path(hub_env()["cache_dir"]) / "models--org--binhub"
    commit = "0" * 40
    (cache / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (cache / "snapshots" / commit / "config.json").write_text('{"model_type": "mixtral"}')
    (cache / "refs").mkdir(exist_ok=True)
    (cache / "refs" / "main").write_text(commit)
    calls: list[dict[str, Any]] = []

    def fake_from_pretrained(path: str, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise OSError(f"{path} does not appear to have a file named model.safetensors.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model("org/binhub")
    assert calls and all(c["use_safetensors"] is True and c["local_files_only"] is True for c in calls)


def test_download_never_fetches_pickles_whatever_include_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub

    from moescope.checkpoint.download import PICKLE_PATTERNS

    seen: dict[str, Any] = {}

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = invoke(
        [
            "download",
            "org/name",
            "--include",
            "*.bin",
            "--include",
            "pytorch_model-*.pt",
            "--include",
            "*.py",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path)
    assert set(PICKLE_PATTERNS) == {"*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"}
    assert set(seen["ignore_patterns"]) >= set(PICKLE_PATTERNS)
    assert "*.bin" not in seen["allow_patterns"] and "*.py" in seen["allow_patterns"]
    assert "Warning:" in result.stderr and "*.bin" in result.stderr and "pytorch_model-*.pt" in result.stderr
    assert "never downloaded" in result.stderr
    # no warning when nothing pickled was asked for
    quiet = invoke(["download", "org/name", "--include", "*.py"], catch_exceptions=False)
    assert quiet.exit_code == 0 and "Warning" not in quiet.stderr


def test_download_against_a_hub_stub_skips_pickles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as c

    from tests.hubstub import HubStub

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text('{"model_type": "mixtral"}')
    (repo / "pytorch_model.bin").write_bytes(b"never fetched")
    (repo / "model.pt").write_bytes(b"never fetched")
    (repo / "notes.txt").write_text("fetched")
    with HubStub({"org/pk": repo}) as hub:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        result = invoke(
            ["download", "org/pk", "--include", "*.bin", "--include", "*.pt", "--include", "*.txt"]
        )
        assert result.exit_code == 0, result.stderr
        assert not any(p.endswith((".bin", ".pt")) for _, p, _ in hub.log)
    snap = Path(result.stdout.strip())
    assert (snap / "notes.txt").exists() and not list(snap.glob("*.bin")) and not list(snap.glob("*.pt"))


# ----------------------------------------------------------------------------- hub reachability


@pytest.mark.parametrize(
    "args",
    [
        ["params", "org/name"],
        ["eval", "org/name", "demo"],
        ["trace", "org/name", "demo", "--out", "{w}/t"],
        ["download", "org/name"],
    ],
    ids=["params", "eval", "trace", "download"],
)
def test_unreachable_hub_fails_fast(args: list[str], unreachable_hub: str, workdir: Path) -> None:
    start = time.perf_counter()
    result = invoke([a.replace("{w}", str(workdir)) for a in args])
    elapsed = time.perf_counter() - start
    line = assert_clean_error(result, 1, "unreachable")
    assert unreachable_hub in line and "HF_HUB_OFFLINE=1" in line and "moescope download" in line
    assert "Retry" not in result.stderr
    assert elapsed < 10, elapsed
    assert not (workdir / "t").exists()


def test_unreachable_hub_fails_fast_in_a_subprocess(tmp_path: Path) -> None:
    """The console path, with huggingface_hub's constants read from this environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    env["HF_HOME"] = str(tmp_path / "hf")
    env.pop("HF_HUB_CACHE", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "moescope", "params", "org/name"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "unreachable" in lines[0], proc.stderr
    assert elapsed < 10, elapsed


def test_unreachable_hub_with_a_cached_model_reads_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as c

    from moescope.accounting.params import count_params
    from tests.hubstub import HubStub
    from tests.tiny import tiny_model

    repo = tmp_path / "repo"
    tiny_model("mixtral").save_pretrained(repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    with HubStub({"org/cached": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        assert invoke(["download", "org/cached"]).exit_code == 0
    # now the hub is gone (a fresh refused port: a closed stub may linger on kept-alive connections)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    report = count_params("org/cached")
    assert time.perf_counter() - start < 10
    assert report.source == "safetensors" and report.total_params == local_total(repo)
    assert any("unreachable" in n for n in report.notes), report.notes


def local_total(path: Path) -> int:
    from moescope.accounting.params import count_params

    return count_params(str(path)).total_params


# ----------------------------------------------------------------------------- eval context


def test_context_warnings() -> None:
    from transformers import GptOssConfig, MistralConfig, Qwen2Config

    from moescope.evaluation.perplexity import context_warnings

    mistral = MistralConfig(max_position_embeddings=32768, sliding_window=4096)
    assert context_warnings(mistral, 4096) == []
    [line] = context_warnings(mistral, 8192, "m")
    assert "sliding window (4096)" in line
    [line] = context_warnings(mistral, 40000, "m")
    assert "max_position_embeddings = 32768" in line and "--seq-len 32768 or less" in line
    # qwen2 stores a window it does not use; gpt-oss mixes sliding and full layers
    assert context_warnings(Qwen2Config(max_position_embeddings=512, sliding_window=64), 256) == []
    gpt_oss = GptOssConfig(num_hidden_layers=2, sliding_window=8, max_position_embeddings=64)
    assert context_warnings(gpt_oss, 32) == []


def test_eval_warns_when_seq_len_exceeds_context(workdir: Path) -> None:
    result = invoke(["eval", "demo", str(workdir / "corpus.txt"), "--seq-len", "200", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "exceeds demo's context (max_position_embeddings = 128)" in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["perplexity"] > 1
    fine = invoke(["eval", "demo", str(workdir / "corpus.txt"), "--seq-len", "64", "--json"])
    assert fine.exit_code == 0 and "Warning" not in fine.stderr
