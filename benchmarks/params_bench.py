"""Benchmark ``moescope params``: hub header reads and whole-process start-up, side by side.

1. A Kimi-K2-sized checkpoint (the published config; per-expert FP8 weights with
   ``weight_scale_inv`` beside them, an MTP layer, 62 shards) is written as sparse files
   (headers real, data regions holes: no disk used) and served by the loopback hub stand-in
   with 50 ms added to every request. We time ``moescope params org/kimi`` as a whole
   process and count bytes and requests, beside huggingface_hub's own
   ``get_safetensors_metadata`` on the same server.
2. ``moescope params`` on a local checkpoint and on a config file, as whole processes,
   beside ``python -c "import torch, transformers"``; for the local Kimi-K2 checkpoint also
   the in-process split between reading the headers and accounting them.

Usage: python benchmarks/params_bench.py [--latency 0.05] [--repeat 3] [--skip-hub]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moescope.arch.closedform import config_inventory  # noqa: E402
from moescope.arch.moe import moe_spec  # noqa: E402
from tests.hubstub import HubStub, write_sparse_shard  # noqa: E402


def kimi_shards(cfg: dict) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """Per-shard tensors of a Kimi-K2-like FP8 checkpoint in the original per-expert layout."""
    spec = moe_spec(cfg)
    shards: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    n_layers = spec.num_layers + spec.mtp_layers
    names = [f"model-{i + 1:05d}-of-{n_layers + 1:05d}.safetensors" for i in range(n_layers + 1)]

    def fp8(shard: dict, name: str, shape: tuple[int, ...]) -> None:
        shard[name + ".weight"] = ("F8_E4M3", shape)
        shard[name + ".weight_scale_inv"] = ("F32", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))

    inv = config_inventory(cfg, spec)
    for layer in range(n_layers):
        src = min(layer, spec.num_layers - 1)  # the MTP layer mirrors the last decoder layer
        shard: dict[str, tuple[str, tuple[int, ...]]] = {}
        prefix = f"model.layers.{src}."
        for t in inv:
            if not t.name.startswith(prefix):
                continue
            name = f"model.layers.{layer}." + t.name[len(prefix) :]
            if t.name.endswith("experts.gate_up_proj"):
                e, two_i, h = t.shape
                for j in range(e):
                    base = name.replace("experts.gate_up_proj", f"experts.{j}")
                    fp8(shard, base + ".gate_proj", (two_i // 2, h))
                    fp8(shard, base + ".up_proj", (two_i // 2, h))
            elif t.name.endswith("experts.down_proj"):
                e, h, i = t.shape
                for j in range(e):
                    fp8(shard, name.replace("experts.down_proj", f"experts.{j}") + ".down_proj", (h, i))
            elif len(t.shape) == 2 and "gate.weight" not in t.name:
                fp8(shard, name[: -len(".weight")], t.shape)
            else:
                shard[name] = ("BF16", t.shape)
        if ".mlp.gate.weight" in " ".join(shard):
            shard[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = ("F32", (spec.num_experts,))
        shards[names[layer]] = shard
    rest = {t.name: ("BF16", t.shape) for t in inv if not t.name.startswith("model.layers.")}
    shards[names[-1]] = rest
    return shards


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr}")
    return dt, r.stdout


def median_time(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    return statistics.median(run(cmd, env)[0] for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-hub", action="store_true", help="only the local whole-process timings")
    args = ap.parse_args()
    cfg_path = ROOT / "sample_configs" / "Kimi-K2-Instruct.json"
    cfg = {k: v for k, v in json.loads(cfg_path.read_text()).items() if not k.startswith("_moescope")}

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "kimi"
        d.mkdir()
        total = 0
        wm = {}
        n_tensors = 0
        for fname, tensors in kimi_shards(cfg).items():
            total += write_sparse_shard(d / fname, tensors)
            wm.update({k: fname for k in tensors})
            n_tensors += len(tensors)
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
        )
        (d / "config.json").write_text(json.dumps(cfg))
        n_shards = len(list(d.glob("*.safetensors")))
        print(
            f"checkpoint: Kimi-K2 layout, {n_shards} shards, {n_tensors:,} tensors, {total / 1e12:.3f} TB (sparse)"
        )

        if not args.skip_hub:
            hub_bench(d, total, n_tensors, n_shards, args)
        local_bench(d, cfg_path, n_tensors, args)


def hub_bench(d: Path, total: int, n_tensors: int, n_shards: int, args: argparse.Namespace) -> None:
    """``moescope params org/kimi`` against the loopback hub, beside huggingface_hub's own reader."""
    moescope = [sys.executable, "-m", "moescope"]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def hub_run(latency: float) -> tuple[float, int, int, dict]:
        with HubStub({"org/kimi": d}, latency=latency) as hub:
            env["HF_ENDPOINT"] = hub.endpoint
            times, sent, reqs = [], [], []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as cache:
                    env["HF_HOME"] = cache
                    env["HF_HUB_CACHE"] = str(Path(cache) / "hub")
                    b0, r0 = hub.bytes_sent, hub.requests
                    dt, out = run([*moescope, "params", "org/kimi", "--json"], env)
                    times.append(dt)
                    sent.append(hub.bytes_sent - b0)
                    reqs.append(hub.requests - r0)
        return (
            statistics.median(times),
            int(statistics.median(sent)),
            int(statistics.median(reqs)),
            json.loads(out)[0],
        )

    wall, sent, reqs, report = hub_run(args.latency)
    wall0, _, _, _ = hub_run(0.0)
    # huggingface_hub's own helper on the same server, for comparison
    code = (
        "import os, time; from huggingface_hub import HfApi; t=time.perf_counter(); "
        "HfApi(endpoint=os.environ['HF_ENDPOINT']).get_safetensors_metadata('org/kimi'); "
        "print(time.perf_counter()-t)"
    )
    with HubStub({"org/kimi": d}, latency=args.latency) as hub, tempfile.TemporaryDirectory() as cache:
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=cache, HF_HUB_CACHE=str(Path(cache) / "hub"))
        _, hf_out = run([sys.executable, "-c", code], env)
        hf_sent, hf_reqs = hub.bytes_sent, hub.requests
    ms = args.latency * 1e3
    print(
        f"\n== hub: moescope params org/kimi (whole process, fresh HF cache each run, median of {args.repeat}) =="
    )
    print(f"total_params                 {report['total_params']:,}")
    print(f"wall time, {ms:.0f} ms/request      {wall:.3f} s")
    print(f"wall time, 0 ms/request       {wall0:.3f} s  (start-up + parsing {n_tensors:,} tensors)")
    print(
        f"cost of latency              {wall - wall0:.3f} s = {(wall - wall0) / args.latency:.1f} requests' worth (target < 4)"
    )
    print(f"requests                     {reqs} ({n_shards} shard headers, concurrently)")
    print(
        f"bytes transferred            {sent / 1e6:.2f} MB = {100 * sent / total:.5f}% of the checkpoint (target < 0.01%)"
    )
    print(
        f"huggingface_hub get_safetensors_metadata, same server: {float(hf_out):.3f} s in-process, "
        f"{hf_reqs} requests, {hf_sent / 1e6:.2f} MB"
    )


def local_bench(d: Path, cfg_path: Path, n_tensors: int, args: argparse.Namespace) -> None:
    """Whole-process wall time of ``moescope params`` on local sources, and the in-process split.

    The Kimi-K2 checkpoint is timed twice, interleaved run by run: as shipped (shard headers
    parsed and classified on two cores, see ``moescope.checkpoint.forksplit``) and with
    ``MOESCOPE_NO_FORK=1`` (one process), so the ratio holds even on a noisy machine. The
    config file's time is the floor every command pays (interpreter, typer, rich, imports).
    """
    moescope = [sys.executable, "-m", "moescope"]
    one_proc = {**os.environ, "MOESCOPE_NO_FORK": "1"}
    print(f"\n== local: whole-process wall time (median of {args.repeat}) ==")
    split_t, one_t = [], []
    for _ in range(args.repeat):
        split_t.append(run([*moescope, "params", str(d), "--json"])[0])
        one_t.append(run([*moescope, "params", str(d), "--json"], env=one_proc)[0])
    t_local, t_one = statistics.median(split_t), statistics.median(one_t)
    t_demo = (
        median_time([*moescope, "params", "demo", "--json"], args.repeat)
        if (ROOT / "moescope/demo/models/moe/config.json").exists()
        else None
    )
    t_cfg = median_time([*moescope, "params", str(cfg_path), "--json"], args.repeat)
    t_import = median_time([sys.executable, "-c", "import torch, transformers"], args.repeat)
    print(f"python -c 'import torch, transformers'   {t_import:.3f} s")
    print(
        f"moescope params <config file>            {t_cfg:.3f} s   ({t_import / t_cfg:.1f}x faster than the import; "
        "the floor: interpreter, typer, rich, imports)"
    )
    if t_demo is not None:
        print(f"moescope params demo (local checkpoint)  {t_demo:.3f} s   ({t_import / t_demo:.1f}x faster)")
    print(
        f"moescope params <local Kimi-K2, 62 shards, {n_tensors:,} tensors> {t_local:.3f} s   "
        f"({t_import / t_local:.1f}x faster; target < 0.5 s)"
    )
    print(
        f"  same, one process (MOESCOPE_NO_FORK=1)  {t_one:.3f} s   (two cores: {t_one / t_local:.2f}x; "
        f"above the floor {t_local - t_cfg:.3f} s vs {t_one - t_cfg:.3f} s)"
    )
    code = (
        "import sys, time; t0 = time.perf_counter(); "
        "from moescope.checkpoint.ref import open_checkpoint; from moescope.accounting.params import account; "
        "from moescope.arch.tensorclasses import ShardClassifier; "
        "t1 = time.perf_counter(); c = ShardClassifier(); ck = open_checkpoint(sys.argv[1], per_shard=c); "
        "t2 = time.perf_counter(); account(ck, classes=c); t3 = time.perf_counter(); "
        "print(f'{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {ck.bytes_read}')"
    )
    for label, env in (("two cores", None), ("one process", one_proc)):
        runs = [run([sys.executable, "-c", code, str(d)], env=env)[1].split() for _ in range(args.repeat)]
        imp, read, acc, nbytes = (statistics.median(float(r[k]) for r in runs) for k in range(4))
        print(
            f"  in process, {label}: import {imp:.3f} s, read + check + classify {nbytes / 1e6:.1f} MB of "
            f"headers {read:.3f} s, account {acc:.3f} s"
        )


if __name__ == "__main__":
    main()
