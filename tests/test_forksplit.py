"""Work split with a forked child gives what one process gives: results, errors and their
order, and a child that fails is made up for; a large checkpoint read with the split (and its
shards classified where they are parsed) gives the same ``params`` as one process."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import moescope.checkpoint.shards as shards
from moescope.accounting.params import count_params
from moescope.checkpoint.forksplit import can_fork, split_map
from moescope.errors import CheckpointError
from tests.hubstub import write_sparse_shard

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2, reason="the split needs Linux and two CPUs"
)
PARENT = os.getpid()


@pytest.fixture(autouse=True)
def _no_other_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Earlier tests leave idle daemon threads behind (a tqdm monitor, loopback hub handlers),
    which would make every split here run in one process: count only this test's threads."""
    baseline = set(threading.enumerate()) - {threading.main_thread()}
    monkeypatch.setattr(
        "moescope.checkpoint.forksplit.threading.active_count",
        lambda: len(set(threading.enumerate()) - baseline),
    )


def _split(items: list[int], work: Any, expected: type[Exception] | None = None) -> list[Any]:
    return split_map(
        items,
        work,
        weights=[1] * len(items),
        min_weight=0,
        encode=lambda r: r,
        decode=lambda d: d,
        expected=expected,
    )


def _square_here(x: int) -> tuple[int, bool]:
    return x * x, os.getpid() == PARENT


def test_results_in_order_and_the_child_did_half() -> None:
    out = _split(list(range(10)), _square_here)
    assert [r for r, _ in out] == [x * x for x in range(10)]
    # the first half here, the second in the child
    assert [here for _, here in out] == [True] * 5 + [False] * 5


def test_one_process_when_forking_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESCOPE_NO_FORK", "1")
    assert not can_fork()
    assert all(here for _, here in _split(list(range(6)), _square_here))
    monkeypatch.delenv("MOESCOPE_NO_FORK")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:  # another Python thread: forking could copy a lock mid-use
        assert not can_fork()
        assert all(here for _, here in _split(list(range(6)), _square_here))
    finally:
        stop.set()
        t.join()


def _fail_at(bad: set[int]) -> Any:
    def work(x: int) -> int:
        if x in bad:
            raise CheckpointError(f"item {x} is bad")
        return x

    return work


@pytest.mark.parametrize(
    ("bad", "first"),
    [({7}, 7), ({2}, 2), ({2, 7}, 2), ({6, 9}, 6)],
    ids=["child-half", "parent-half", "both-halves", "two-in-child"],
)
def test_the_first_error_in_item_order_is_raised(bad: set[int], first: int) -> None:
    with pytest.raises(CheckpointError, match=f"^item {first} is bad$"):
        _split(list(range(10)), _fail_at(bad), expected=CheckpointError)


def test_an_unexpected_error_in_the_child_is_made_up_for_here() -> None:
    def work(x: int) -> int:
        if os.getpid() != PARENT:
            raise RuntimeError("only the child fails")
        return x + 1

    assert _split(list(range(8)), work) == list(range(1, 9))


def test_a_child_that_dies_is_made_up_for_here() -> None:
    def work(x: int) -> int:
        if os.getpid() != PARENT:
            os._exit(3)
        return -x

    assert _split(list(range(8)), work) == [-x for x in range(8)]


def test_an_error_here_stops_the_child() -> None:
    """The parent's own half fails: its error is raised and the child is not left behind."""

    def work(x: int) -> int:
        if x == 0:
            raise CheckpointError("first")
        return x

    with pytest.raises(CheckpointError, match="first"):
        _split(list(range(8)), work, expected=CheckpointError)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no child of this process is left, not even a zombie


# ---------------------------------------------------------------------------------------
# A sharded checkpoint, read with the split forced on small files
# ---------------------------------------------------------------------------------------


def _checkpoint(d: Path, layers: int = 6, experts: int = 8) -> list[str]:
    """A Qwen3-MoE-like per-expert checkpoint, one shard per layer plus one, with its index."""
    cfg = {
        "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 16, "intermediate_size": 32,
        "moe_intermediate_size": 8, "num_hidden_layers": layers, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "num_experts": experts, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
    }  # fmt: skip
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    files, wm = [], {}
    for layer in range(layers + 1):
        t: dict[str, tuple[str, tuple[int, ...]]] = {}
        if layer == layers:
            t = {"model.embed_tokens.weight": ("BF16", (128, 16)), "lm_head.weight": ("BF16", (128, 16))}
            t["model.norm.weight"] = ("BF16", (16,))
        else:
            p = f"model.layers.{layer}."
            for proj, shape in (
                ("q_proj", (16, 16)),
                ("k_proj", (8, 16)),
                ("v_proj", (8, 16)),
                ("o_proj", (16, 16)),
            ):
                t[p + f"self_attn.{proj}.weight"] = ("BF16", shape)
            t[p + "self_attn.q_norm.weight"] = ("BF16", (8,))
            t[p + "self_attn.k_norm.weight"] = ("BF16", (8,))
            t[p + "input_layernorm.weight"] = ("BF16", (16,))
            t[p + "post_attention_layernorm.weight"] = ("BF16", (16,))
            t[p + "mlp.gate.weight"] = ("BF16", (experts, 16))
            for e in range(experts):
                for proj, shape in (("gate_proj", (8, 16)), ("up_proj", (8, 16)), ("down_proj", (16, 8))):
                    t[p + f"mlp.experts.{e}.{proj}.weight"] = ("BF16", shape)
        name = f"model-{layer + 1:05d}-of-{layers + 1:05d}.safetensors"
        write_sparse_shard(d / name, t)
        files.append(name)
        wm.update(dict.fromkeys(t, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return files


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "FORK_MIN_HEADER_BYTES", 0)


def _one_process(ref: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    with monkeypatch.context() as m:
        m.setenv("MOESCOPE_NO_FORK", "1")
        return count_params(ref).to_dict()


def test_params_split_equals_one_process(
    tmp_path: Path, forced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "ck"
    _checkpoint(d)
    split = count_params(str(d)).to_dict()
    assert split == _one_process(str(d), monkeypatch)
    assert split["total_params"] > 0 and split["is_moe"]


def test_index_errors_come_first(tmp_path: Path, forced: None) -> None:
    d = tmp_path / "ck"
    files = _checkpoint(d)
    (d / files[5]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")  # in the child's half
    with pytest.raises(CheckpointError, match=files[5]):
        count_params(str(d))
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        count_params(str(d))


def test_a_listed_missing_shard_before_a_bad_one(tmp_path: Path, forced: None) -> None:
    d = tmp_path / "ck"
    files = _checkpoint(d)
    (d / files[1]).write_bytes(b"\x01")
    (d / files[6]).unlink()
    with pytest.raises(CheckpointError, match=f"shard {files[6]} listed in .* is missing"):
        count_params(str(d))


def test_unlisted_files_are_ignored_and_listed_subdirectories_read(
    tmp_path: Path, forced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "ck"
    files = _checkpoint(d)
    want = _one_process(str(d), monkeypatch)
    (d / "stray.safetensors").write_bytes(b"\x01")  # not in the index: never an error
    (d / "sub").mkdir()
    (d / files[3]).rename(d / "sub" / files[3])
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: ("sub/" + v if v == files[3] else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    got = count_params(str(d)).to_dict()
    assert got["total_params"] == want["total_params"] and got["active_params"] == want["active_params"]


def test_each_shard_is_classified_where_it_is_parsed(tmp_path: Path, forced: None) -> None:
    """The per-shard classes are used (not recomputed) and the parent parsed only part."""
    from moescope.arch.tensorclasses import ShardClassifier
    from moescope.checkpoint.ref import open_checkpoint

    d = tmp_path / "ck"
    _checkpoint(d)
    where: list[int] = []
    classes = ShardClassifier()

    def per_shard(config: dict[str, Any] | None) -> Any:
        fn = classes(config)
        assert fn is not None

        def run(tensors: Any) -> Any:
            where.append(os.getpid())
            return fn(tensors)

        return run

    ck = open_checkpoint(str(d), per_shard=per_shard)
    assert ck.shard_extras is not None and len(ck.shard_extras) == len(ck.files)
    assert 0 < len(where) < len(ck.files)  # the rest ran in the child
    assert classes.spec is not None
    groups = classes.groups(ck.shard_extras, classes.spec)
    assert groups is not None
    seen = sorted(i for g in groups for i in g.positions)
    assert seen == list(range(len(ck.tensors)))
    from moescope.arch.moe import classify

    for g in groups:
        for i in g.positions:
            c = classify(ck.tensors.names[i], classes.spec, len(ck.tensors.shapes[i]))
            assert c._replace(expert=None) == g.cls
            assert (c.expert is None) == (g.experts is None)


@pytest.mark.parametrize(
    "positions", [[3], [0, 1, 2, 3], [5, 11, 17, 23], [2, 3, 7], [4, 9, 14, 20]], ids=str
)
def test_shard_positions_travel_back_unchanged(positions: list[int]) -> None:
    from moescope.arch.tensorclasses import _pack, _unpack

    packed = _pack(positions)
    assert list(_unpack(packed, 0)) == positions
    assert list(_unpack(packed, 100)) == [p + 100 for p in positions]
    # evenly spaced runs travel as (start, stop, step), the rest as raw bytes
    assert isinstance(packed, tuple) == (
        len(positions) >= 2 and len({b - a for a, b in zip(positions, positions[1:], strict=False)}) == 1
    )
