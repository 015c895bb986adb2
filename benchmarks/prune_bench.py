"""Peak memory and throughput of `moescope prune` on a synthetic multi-GB checkpoint.

What: writes a Mixtral-shaped checkpoint of zeros (bf16, fused ``[E, ...]`` experts,
several shards, about 2.6 GB by default) shard by shard with ``safetensors.numpy``,
a matching synthetic trace, then prunes half the experts in a child process (so its
peak RSS is the pruning's, not this script's) and, for comparison, copies the same
shards with ``shutil.copyfile``. Prints both side by side, checks the peak RSS against
the budget ``2 x largest tensor + 500 MB``, and deletes everything.

Run: ``.venv/bin/python benchmarks/prune_bench.py [--layers 24] [--keep 4] [--dir /tmp]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HIDDEN = 2048
INTER = 1024
EXPERTS = 8
VOCAB = 32000
MB = 2**20


def write_checkpoint(root: Path, layers: int, layers_per_shard: int) -> tuple[int, int]:
    """Write config, shards (one in memory at a time) and index; returns (total, largest tensor) bytes."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True)

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.bfloat16)

    def layer_tensors(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        out = {
            p + "mlp.experts.gate_up_proj": zeros(EXPERTS, 2 * INTER, HIDDEN),
            p + "mlp.experts.down_proj": zeros(EXPERTS, HIDDEN, INTER),
            p + "mlp.gate.weight": zeros(EXPERTS, HIDDEN),
            p + "self_attn.q_proj.weight": zeros(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": zeros(512, HIDDEN),
            p + "self_attn.v_proj.weight": zeros(512, HIDDEN),
            p + "self_attn.o_proj.weight": zeros(HIDDEN, HIDDEN),
            p + "input_layernorm.weight": zeros(HIDDEN),
            p + "post_attention_layernorm.weight": zeros(HIDDEN),
        }
        return out

    plan: list[list[int] | str] = ["embed"]
    plan += [list(range(s, min(layers, s + layers_per_shard))) for s in range(0, layers, layers_per_shard)]
    plan.append("head")
    weight_map: dict[str, str] = {}
    total = largest = 0
    for k, part in enumerate(plan):
        if part == "embed":
            shard = {"model.embed_tokens.weight": zeros(VOCAB, HIDDEN)}
        elif part == "head":
            shard = {"model.norm.weight": zeros(HIDDEN), "lm_head.weight": zeros(VOCAB, HIDDEN)}
        else:
            shard = {}
            for i in part:
                shard.update(layer_tensors(i))
        name = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        for t, arr in shard.items():
            weight_map[t] = name
            nbytes = arr.numel() * arr.element_size()
            total += nbytes
            largest = max(largest, nbytes)
        del shard
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "vocab_size": VOCAB,
        "torch_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer_config.json").write_text("{}")
    return total, largest


def write_trace(root: Path, layers: int) -> None:
    """A real trace directory (state + derived files) with random loads, as `moescope trace` writes."""
    from moescope.tracedir.state import TraceState
    from moescope.tracing.write import write_trace_dir

    state = TraceState(list(range(layers)), EXPERTS, 2, meta={"model": "bench"})
    rng = np.random.default_rng(0)
    state.counts[:] = rng.integers(100, 1000, size=(layers, EXPERTS))
    counts = state.counts.astype(float)
    state.tokens = int(counts.sum() // 2)
    state.set_floats("weight", 0.4 * counts)
    state.set_floats("out_norm", 2.0 * counts)
    state.set_floats("wout_norm", 0.8 * counts)
    write_trace_dir(root, state, timings={}, plots=False)


CHILD = r"""
import json, sys, time
from moescope import pruning as P


def hwm():  # VmHWM is per address space (reset by exec), unlike ru_maxrss which a fork inherits
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

src, trace, out, keep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = hwm()
t0 = time.perf_counter()
ckpt = P.open_checkpoint(src)
layout = P.detect_layout(ckpt)
tr = P.read_trace(trace)
P.check_trace_matches(tr, ckpt, layout, "bench")
scores = P.expert_scores(tr, "reap")
plan = P.plan_prune(scores, num_experts=layout.num_experts, top_k=layout.top_k, keep=keep,
                    criterion="reap", config=ckpt.config)
result = P.prune_checkpoint(ckpt, layout, plan, out, model_ref="bench", trace_path=trace)
dt = time.perf_counter() - t0
peak = hwm()
print(json.dumps({"seconds": dt, "bytes_in": result.bytes_in, "bytes_out": result.bytes_out,
                  "peak_rss": peak, "baseline_rss": base}))
"""


def kernel_copy(src: Path, dst: Path) -> None:
    """Whole-file copy with os.copy_file_range, the syscall the pruner uses for its byte ranges."""
    import os

    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        done = 0
        while done < size:
            done += os.copy_file_range(fin.fileno(), fout.fileno(), min(64 * MB, size - done), done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--layers-per-shard", type=int, default=4)
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="prune_bench_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        total, largest = write_checkpoint(scratch / "src", args.layers, args.layers_per_shard)
        print(
            f"synthetic checkpoint: {total / MB:.0f} MiB in "
            f"{len(list((scratch / 'src').glob('*.safetensors')))} shards, largest tensor "
            f"{largest / MB:.0f} MiB (written in {time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
        write_trace(scratch / "trace", args.layers)
        # plain copy of the same shards (the floor for any tool that rewrites them), and the
        # prune in a child process; alternated and repeated, best of each kept (shared machine).
        copies, kcopies, runs = [], [], []
        for _ in range(args.repeat):
            (scratch / "copy").mkdir()
            t0 = time.perf_counter()
            for f in sorted((scratch / "src").glob("*.safetensors")):
                shutil.copyfile(f, scratch / "copy" / f.name)
            copies.append(time.perf_counter() - t0)
            shutil.rmtree(scratch / "copy")
            (scratch / "copy").mkdir()
            t0 = time.perf_counter()
            for f in sorted((scratch / "src").glob("*.safetensors")):
                kernel_copy(f, scratch / "copy" / f.name)
            kcopies.append(time.perf_counter() - t0)
            shutil.rmtree(scratch / "copy")
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(scratch / "src"),
                    str(scratch / "trace"),
                    str(scratch / "out"),
                    str(args.keep),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            shutil.rmtree(scratch / "out")
        copy_s = min(copies)
        kcopy_s = min(kcopies)
        r = min(runs, key=lambda x: x["seconds"])
        r["peak_rss"] = max(x["peak_rss"] for x in runs)
        budget = 2 * largest + 500 * MB
        cols = ("prune", "shutil.copyfile", "copy_file_range")
        print(f"{'':28}" + "".join(f"{c:>17}" for c in cols))
        secs = (r["seconds"], copy_s, kcopy_s)
        print(f"{'seconds':28}" + "".join(f"{x:>17.2f}" for x in secs))
        src_mib = (r["bytes_in"] / MB, total / MB, total / MB)
        print(
            f"{'source MiB / seconds':28}"
            + "".join(f"{m / x:>17.0f}" for m, x in zip(src_mib, secs, strict=True))
        )
        out_mib = (r["bytes_out"] / MB, total / MB, total / MB)
        print(f"{'written MiB':28}" + "".join(f"{m:>17.0f}" for m in out_mib))
        print(
            f"{'written MiB/s':28}" + "".join(f"{m / x:>17.0f}" for m, x in zip(out_mib, secs, strict=True))
        )
        print(f"{'peak RSS MiB (process)':28}{r['peak_rss'] / MB:>17.0f}")
        print(f"{'RSS after imports MiB':28}{r['baseline_rss'] / MB:>17.0f}")
        print(f"{'budget 2x largest+500 MiB':28}{budget / MB:>17.0f}")
        ok = r["peak_rss"] <= budget
        print(f"peak RSS within budget: {ok}")
        if not ok:
            sys.exit(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
