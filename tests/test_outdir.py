"""Output safety: moescope replaces only what it wrote, atomically, and refuses everything else.

Two parts:

- a case table of hostile ``--out`` values and inputs for every writing command (trace,
  merge, similarity, prune), each asserting exit 1, one ``Error:`` line, no traceback, and
  that every input and every pre-existing file beside the output is byte-identical;
- fault injection: ``KeyboardInterrupt`` and ``OSError(ENOSPC)`` raised at every write and
  rename step of every writing command, asserting the destination then holds the complete
  old output or the complete new one, never neither and never a mix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moescope import outdir
from moescope.demo import demo_model_dir
from moescope.errors import OutputError
from tests.safety import assert_clean_error, invoke, snapshot

_TOKENS = "192"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo copy, a full trace, two shard traces, a pruned checkpoint and a similarity report."""
    root = tmp_path_factory.mktemp("outputs")
    model = root / "models" / "model"
    shutil.copytree(demo_model_dir("demo"), model)  # type: ignore[arg-type]
    t = root / "traces"
    base = ["--max-tokens", _TOKENS, "--seq-len", "32", "--no-plots", "-q"]
    for args in (
        ["trace", model, "demo", "--out", t / "full", *base],
        ["trace", model, "demo", "--out", t / "s0", "--shard", "0/2", *base],
        ["trace", model, "demo", "--out", t / "s1", "--shard", "1/2", *base],
        ["prune", model, "--trace", t / "full", "--drop", "2", "--out", root / "pruned", "--no-verify", "-q"],
        ["similarity", model, "--no-outputs", "--no-plots", "--out", root / "sim", "-q"],
    ):
        res = invoke(args)
        assert res.exit_code == 0, (args, res.stderr)
    return {"root": root, "model": model, "full": t / "full", "s0": t / "s0", "s1": t / "s1",
            "pruned": root / "pruned", "sim": root / "sim"}  # fmt: skip


def _user_dir(root: Path, name: str = "mine") -> Path:
    d = root / name
    d.mkdir(exist_ok=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "src").mkdir(exist_ok=True)
    (d / "src" / "train.py").write_text("print('mine')\n")
    return d


# Each case: (id, function(env, tmp) -> (args, paths that must stay byte-identical, error text)).
Case = Callable[[dict[str, Path], Path], tuple[list[Any], list[Path], str]]


def _prune(env: dict[str, Path], out: Any, *extra: str) -> list[Any]:
    return ["prune", env["model"], "--trace", env["full"], "--drop", "2", "--out", out, "--no-verify", *extra]


def _trace(env: dict[str, Path], out: Any, *extra: Any) -> list[Any]:
    return ["trace", env["model"], "demo", "--max-tokens", "64", "--seq-len", "32", "--no-plots", "--out", out,
            *extra]  # fmt: skip


def _sim(env: dict[str, Path], out: Any, *extra: Any) -> list[Any]:
    return ["similarity", env["model"], "--no-outputs", "--no-plots", "--out", out, *extra]


def _c_prune_dot(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    _user_dir(tmp, "cwd")
    os.chdir(tmp / "cwd")
    return _prune(env, ".", "--overwrite"), [tmp / "cwd"], "working directory"


def _c_prune_empty(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    _user_dir(tmp, "cwd")
    os.chdir(tmp / "cwd")
    return _prune(env, "", "--overwrite"), [tmp / "cwd"], ""


def _c_prune_ancestor(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return _prune(env, env["root"], "--overwrite"), [env["model"], env["full"]], "contains the input"


def _c_prune_model(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return _prune(env, env["model"], "--overwrite"), [env["model"]], "contains the input"


def _c_prune_foreign(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = _user_dir(tmp)
    return _prune(env, d, "--overwrite"), [d], "not a complete moescope prune output"


def _c_prune_existing_no_overwrite(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return _prune(env, env["pruned"]), [env["pruned"]], "--overwrite"


def _c_prune_existing_plus_file(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = tmp / "pruned"
    shutil.copytree(env["pruned"], d)
    (d / "my_eval.txt").write_text("ppl 3.1\n")
    return _prune(env, d, "--overwrite"), [d], "my_eval.txt"


def _c_prune_into_trace(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return _prune(env, env["full"], "--overwrite"), [env["full"]], "contains the input"


def _c_prune_home(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    _user_dir(tmp, "home")
    os.environ["HOME"] = str(tmp / "home")
    return _prune(env, "~", "--overwrite"), [tmp / "home"], "home directory"


def _c_prune_root(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return _prune(env, "/", "--overwrite"), [], "root"


def _c_prune_file(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    f = tmp / "out.txt"
    f.write_text("mine\n")
    return _prune(env, f, "--overwrite"), [f], "not a directory"


def _c_prune_symlink(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    # the destination is resolved first: a link to a user's folder is that folder
    d = _user_dir(tmp)
    (tmp / "link").symlink_to(d)
    return _prune(env, tmp / "link", "--overwrite"), [d, tmp / "link"], "not a complete moescope"


def _c_prune_fake_manifest(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = _user_dir(tmp)
    (d / "prune_manifest.json").write_text(json.dumps({"complete": True}))
    return _prune(env, d, "--overwrite"), [d], "not a complete moescope prune output"


def _c_prune_other_checkpoint(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    # same directory name "model", different weights: a name check would accept it
    other = tmp / "b" / "model"
    shutil.copytree(env["model"], other)
    shard = other / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n : 8 + n + 64] = bytes(64)
    shard.write_bytes(bytes(raw))
    os.chdir(tmp / "b")
    return (["prune", "model", "--trace", env["full"], "--drop", "2", "--out", tmp / "p", "--no-verify"],
            [other, env["full"]], "another checkpoint")  # fmt: skip


def _c_trace_foreign_summary(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = _user_dir(tmp)
    (d / "summary.json").write_text(json.dumps({"complete": True, "mine": 1}))
    return _trace(env, d), [d], "not a complete moescope trace output"


def _c_trace_old_trace_plus_notes(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = tmp / "t"
    shutil.copytree(env["full"], d)
    (d / "notes.md").write_text("looks balanced\n")
    return _trace(env, d), [d], "notes.md"


def _c_trace_old_trace_plus_dir(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = tmp / "t"
    shutil.copytree(env["full"], d)
    (d / "src").mkdir()
    return _trace(env, d), [d], "src"


def _c_trace_dot(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    _user_dir(tmp, "cwd")
    os.chdir(tmp / "cwd")
    return _trace(env, "."), [tmp / "cwd"], "working directory"


def _c_trace_parent_of_cwd(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    _user_dir(tmp, "cwd")
    os.chdir(tmp / "cwd")
    return _trace(env, ".."), [tmp / "cwd"], "ancestors"


def _c_trace_model_ancestor(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return _trace(env, env["model"].parent), [env["model"]], "contains the input"


def _c_trace_corpus_ancestor(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = tmp / "data"
    d.mkdir()
    (d / "c.txt").write_text("hello world " * 50)
    args = ["trace", env["model"], d / "c.txt", "--no-plots", "--out", d]
    return args, [d], "contains the input"


def _c_trace_similarity_dir(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = tmp / "sim"
    shutil.copytree(env["sim"], d)
    return _trace(env, d), [d], "not a complete moescope trace output"


def _c_merge_into_input(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return ["merge", env["s0"], env["s1"], "--out", env["s0"]], [env["s0"], env["s1"]], "contains the input"


def _c_merge_full_full(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return ["merge", env["full"], env["full"], "--out", tmp / "m"], [env["full"]], "twice"


def _c_merge_full_copy(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    shutil.copytree(env["full"], tmp / "copy")
    return ["merge", env["full"], tmp / "copy", "--out", tmp / "m"], [env["full"], tmp / "copy"], "copies"


def _c_merge_shard_and_full(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return (["merge", env["s0"], env["full"], "--out", tmp / "m"], [env["s0"], env["full"]],
            "shard counts")  # fmt: skip


def _c_merge_repeated_shard(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    shutil.copytree(env["s0"], tmp / "s0b")
    return (["merge", env["s0"], tmp / "s0b", "--out", tmp / "m"], [env["s0"], tmp / "s0b"],
            "copies")  # fmt: skip


def _c_merge_missing_shard(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return ["merge", env["s0"], "--out", tmp / "m"], [env["s0"]], "missing"


def _c_merge_other_corpus(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    s1 = tmp / "s1"
    shutil.copytree(env["s1"], s1)
    summary = json.loads((s1 / "summary.json").read_text())
    # a shard 1/2 of another corpus: change the state's recorded corpus fingerprint
    from moescope.tracing import TraceState

    state = TraceState.load(s1 / "state.npz")
    state.meta["corpus_fingerprint"] = "sha256:" + "0" * 64
    state.save(s1 / "state.npz")
    (s1 / "summary.json").write_text(json.dumps(summary))
    return ["merge", env["s0"], s1, "--out", tmp / "m"], [env["s0"], s1], "corpus_fingerprint"


def _c_merge_foreign_out(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = _user_dir(tmp)
    return ["merge", env["s0"], env["s1"], "--out", d], [d, env["s0"], env["s1"]], "not a complete"


def _c_sim_foreign(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = _user_dir(tmp)
    (d / "pairs.csv").write_text("mine\n")
    return _sim(env, d), [d], "not a complete moescope similarity output"


def _c_sim_dot(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    _user_dir(tmp, "cwd")
    os.chdir(tmp / "cwd")
    return _sim(env, "."), [tmp / "cwd"], "working directory"


def _c_sim_trace_dir(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return _sim(env, env["full"], "--trace", env["full"]), [env["full"]], "contains the input"


def _c_sim_model_dir(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    return _sim(env, env["model"]), [env["model"]], "contains the input"


def _c_sim_old_plus_file(env: dict[str, Path], tmp: Path) -> tuple[list[Any], list[Path], str]:
    d = tmp / "sim"
    shutil.copytree(env["sim"], d)
    (d / "fig.pdf").write_bytes(b"%PDF")
    return _sim(env, d), [d], "fig.pdf"


CASES: dict[str, Case] = {
    "prune --out . --overwrite": _c_prune_dot,
    "prune --out '' (unset variable)": _c_prune_empty,
    "prune --out ancestor of checkpoint and trace": _c_prune_ancestor,
    "prune --out the source checkpoint": _c_prune_model,
    "prune --out a user's directory --overwrite": _c_prune_foreign,
    "prune --out an old pruned model, no --overwrite": _c_prune_existing_no_overwrite,
    "prune --out an old pruned model with a user file": _c_prune_existing_plus_file,
    "prune --out the trace": _c_prune_into_trace,
    "prune --out ~": _c_prune_home,
    "prune --out /": _c_prune_root,
    "prune --out a file": _c_prune_file,
    "prune --out a symlink": _c_prune_symlink,
    "prune --out a dir with a hand-made manifest": _c_prune_fake_manifest,
    "prune with a trace of another checkpoint of the same name": _c_prune_other_checkpoint,
    "trace --out a dir with a foreign summary.json": _c_trace_foreign_summary,
    "trace --out an old trace with notes": _c_trace_old_trace_plus_notes,
    "trace --out an old trace with an empty folder": _c_trace_old_trace_plus_dir,
    "trace --out .": _c_trace_dot,
    "trace --out ..": _c_trace_parent_of_cwd,
    "trace --out ancestor of the model": _c_trace_model_ancestor,
    "trace --out the corpus folder": _c_trace_corpus_ancestor,
    "trace --out a similarity report": _c_trace_similarity_dir,
    "merge s0 s1 --out s0": _c_merge_into_input,
    "merge full full": _c_merge_full_full,
    "merge full copy-of-full": _c_merge_full_copy,
    "merge shard + full run": _c_merge_shard_and_full,
    "merge a shard and its copy": _c_merge_repeated_shard,
    "merge one shard of two": _c_merge_missing_shard,
    "merge shards of different corpora": _c_merge_other_corpus,
    "merge --out a user's directory": _c_merge_foreign_out,
    "similarity --out a user's directory": _c_sim_foreign,
    "similarity --out .": _c_sim_dot,
    "similarity --out its own --trace": _c_sim_trace_dir,
    "similarity --out the model": _c_sim_model_dir,
    "similarity --out an old report with a user file": _c_sim_old_plus_file,
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_outputs_change_nothing(
    name: str, env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", os.environ.get("HOME", str(tmp_path)))
    args, keep, expect = CASES[name](env, tmp_path)
    watched = [*keep, env["model"], env["full"], env["s0"], env["s1"], env["pruned"], env["sim"]]
    before = snapshot(*watched, tmp_path)
    res = invoke(args)
    assert_clean_error(res, 1, contains=expect or None)
    assert snapshot(*watched, tmp_path) == before
    assert not [p for p in tmp_path.rglob(".moescope-*")], "temporary directories left behind"


# ----------------------------------------------------------------------------- what succeeds


def test_own_outputs_are_replaced(env: dict[str, Path], tmp_path: Path) -> None:
    t = tmp_path / "t"
    shutil.copytree(env["full"], t)
    old_run = json.loads((t / "summary.json").read_text())["run_id"]
    assert invoke(_trace(env, t, "-q")).exit_code == 0
    new = json.loads((t / "summary.json").read_text())
    assert new["run_id"] != old_run and new["tool"] == "moescope" and new["kind"] == "trace"
    assert sorted(new["owned_files"]) == sorted(p for p in outdir._all_files(t) if p != "summary.json")
    p = tmp_path / "p"
    shutil.copytree(env["pruned"], p)
    res = invoke(_prune(env, p, "--overwrite", "-q"))
    assert res.exit_code == 0, res.stderr
    assert json.loads((p / "prune_manifest.json").read_text())["complete"] is True
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke(_sim(env, empty, "-q")).exit_code == 0
    assert (empty / "similarity.json").exists()
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".moescope")] == []


def test_pruned_checkpoint_has_own_card_and_no_foreign_files(env: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "model"
    shutil.copytree(env["model"], src)
    secret = tmp_path / "secret.txt"
    secret.write_text("API_KEY=hunter2\n")
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to(secret)  # an allow-listed name linking outside
    (src / "private_notes.txt").write_text("do not ship\n")
    out = tmp_path / "p"
    res = invoke(["prune", src, "--trace", env["full"], "--drop", "2", "--out", out, "--no-verify"])
    # the trace was recorded on env["model"], an identical copy: same fingerprint, accepted
    assert res.exit_code == 0, res.stderr
    assert "links outside the checkpoint" in res.stderr
    names = {p.name for p in out.iterdir()}
    assert "private_notes.txt" not in names and "tokenizer_config.json" not in names
    assert "train_metrics.json" not in names
    card = (out / "README.md").read_text()
    assert card != (src / "README.md").read_text()
    assert "pruned to 6 of 8 experts" in card and "reap" in card
    manifest = json.loads((out / "prune_manifest.json").read_text())
    for layer, rec in manifest["layers"].items():
        assert 0 < rec["dropped_count_share"] < 1, layer
        assert f"| {layer} | {', '.join(map(str, rec['dropped']))} |" in card
    assert manifest["trace_fingerprint"] == manifest["source_fingerprint"]
    assert "hunter2" not in "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())


def test_stale_leftovers_are_cleaned_or_restored(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no such process
    tmp = tmp_path / f"{outdir.TMP_PREFIX}t-{dead}-0123abcd"
    tmp.mkdir()
    (tmp / "half.csv").write_text("x")
    old = tmp_path / f"{outdir.OLD_PREFIX}u-{dead}-0123abcd"
    old.mkdir()
    (old / "summary.json").write_text("{}")
    live = tmp_path / f"{outdir.TMP_PREFIX}v-{os.getpid()}-0123abcd"
    live.mkdir()
    mine = tmp_path / ".moescope-tmp-notes"  # does not match the pattern: a user's, kept
    mine.mkdir()
    actions = outdir.clean_leftovers(tmp_path, warn=None)
    assert len(actions) == 2
    assert not tmp.exists() and (tmp_path / "u" / "summary.json").exists() and not old.exists()
    assert live.exists() and mine.exists()


def test_check_destination_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for bad in ("", "  ", None, ".", "..", "/", str(tmp_path)):
        with pytest.raises(OutputError):
            outdir.check_destination(bad, "trace")
    assert outdir.check_destination("new/sub", "trace") == tmp_path / "new" / "sub"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("x")
    with pytest.raises(OutputError, match="contains the input"):
        outdir.check_destination(tmp_path / "in", "trace", inputs=[tmp_path / "in" / "x.txt"])
    # an output inside an input's folder is fine: nothing of the input is replaced
    assert outdir.check_destination(tmp_path / "in" / "out", "trace", inputs=[tmp_path / "in"])


# ----------------------------------------------------------------------------- fault injection


class _Injector:
    """Counts write/rename steps; raises ``exc`` at step ``at`` (None: only count)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None, exc: BaseException) -> None:
        import builtins

        self.steps: list[str] = []
        self.at, self.exc = at, exc
        real_open, real_os_open = builtins.open, os.open
        real_rename, real_replace, real_exchange = os.rename, os.replace, outdir._exchange

        def step(what: str) -> None:
            self.steps.append(what)
            if self.at is not None and len(self.steps) - 1 == self.at:
                self.at = None  # one fault per run: the clean-up afterwards runs normally
                raise self.exc

        def fake_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            if any(c in mode for c in "wax+"):
                step(f"open {Path(str(file)).name}")
            return real_open(file, mode, *a, **k)

        def fake_os_open(path: Any, flags: int, *a: Any, **k: Any) -> Any:
            if flags & (os.O_WRONLY | os.O_RDWR):
                step(f"os.open {Path(str(path)).name}")
            return real_os_open(path, flags, *a, **k)

        def fake_rename(a: Any, b: Any, *r: Any, **k: Any) -> Any:
            step(f"rename {Path(str(b)).name}")
            return real_rename(a, b, *r, **k)

        def fake_replace(a: Any, b: Any, *r: Any, **k: Any) -> Any:
            step(f"replace {Path(str(b)).name}")
            return real_replace(a, b, *r, **k)

        def fake_exchange(a: Path, b: Path) -> bool:
            step(f"exchange {b.name}")
            return real_exchange(a, b)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "rename", fake_rename)
        monkeypatch.setattr(os, "replace", fake_replace)
        monkeypatch.setattr(outdir, "_exchange", fake_exchange)


def _rel(root: Path) -> dict[str, str]:
    """A snapshot keyed by path relative to ``root`` (to compare two directories' contents)."""
    return {str(Path(k).relative_to(root)): v for k, v in snapshot(root).items()}


def _is_complete_new(dest: Path, kind: str, old: dict[str, str], snap: dict[str, str]) -> bool:
    marker = outdir.read_marker(dest, kind)
    if marker is None or marker.get("complete") is not True or "owned_files" not in marker:
        return False
    files = set(outdir._all_files(dest))
    return files == {*marker["owned_files"], outdir.MARKERS[kind]} and snap != old


def _run_trace(env: dict[str, Path], out: Path) -> None:
    from moescope.tracing import run_trace

    run_trace(str(env["model"]), "demo", out, max_tokens=64, seq_len=32, plots=True, save_routes=True)


def _run_merge(env: dict[str, Path], out: Path) -> None:
    from moescope.tracing import merge_traces

    merge_traces([env["s0"], env["s1"]], out, plots=False)


def _run_similarity(env: dict[str, Path], out: Path) -> None:
    from moescope.redundancy.run import similarity

    similarity(str(env["model"]), out, trace=env["full"], outputs=False, plots=False)  # old: no trace


def _run_prune(env: dict[str, Path], out: Path) -> None:
    from moescope.pruning import prune

    prune(str(env["model"]), env["full"], out, drop=3, verify=False, overwrite=True)  # old: drop 2


WRITERS: dict[str, tuple[str, str, Callable[[dict[str, Path], Path], None]]] = {
    "trace": ("trace", "full", _run_trace),
    "merge": ("trace", "full", _run_merge),
    "similarity": ("similarity", "sim", _run_similarity),
    "prune": ("prune", "pruned", _run_prune),
    # where renameat2 is missing (another OS or file system): rename aside, rename in
    "similarity-no-exchange": ("similarity", "sim", _run_similarity),
}


@pytest.mark.slow
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["ctrl-c", "enospc"])  # fmt: skip
@pytest.mark.parametrize("writer", list(WRITERS))
def test_fault_at_every_step_leaves_old_or_new(
    writer: str, exc: BaseException, env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind, existing, run = WRITERS[writer]
    if writer.endswith("no-exchange"):
        monkeypatch.setattr(outdir, "_renameat2", lambda: None)
    dest = tmp_path / "probe"
    shutil.copytree(env[existing], dest)
    with pytest.MonkeyPatch.context() as mp:  # count the steps of a clean run
        probe = _Injector(mp, None, exc)
        run(env, dest)
    n_steps = len(probe.steps)
    assert n_steps >= 4, probe.steps
    assert any(s.startswith(("exchange", "rename")) for s in probe.steps)
    outcomes = {"old": 0, "new": 0}
    for at in range(n_steps):
        dest = tmp_path / f"out{at}"
        shutil.copytree(env[existing], dest)
        old = snapshot(dest)
        with pytest.MonkeyPatch.context() as mp:
            inj = _Injector(mp, at, exc)
            try:
                run(env, dest)
                raised = None
            except (KeyboardInterrupt, OSError) as e:
                raised = e
        assert inj.at is None, f"step {at} ({probe.steps[at]}) was not reached: {probe.steps} vs {inj.steps}"
        snap = snapshot(dest)
        if snap == old:
            outcomes["old"] += 1
            # (a fault in a step some library catches itself, e.g. a probe of /dev/null, may pass)
            if raised is not None:
                assert "previous output" in getattr(raised, "moescope_outcome", ""), (at, probe.steps[at])
        else:
            assert _is_complete_new(dest, kind, old, snap), f"a mix after a fault at {probe.steps[at]}"
            outcomes["new"] += 1
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(outdir.TMP_PREFIX)]
        assert leftovers == [], (at, probe.steps[at], leftovers)
    assert outcomes["old"] >= 1
    # and the probe's clean run really replaced the old output with a different, complete one
    probe_dest = tmp_path / "probe"
    assert _is_complete_new(probe_dest, kind, _rel(env[existing]), _rel(probe_dest))
