"""Benchmark layer-streamed execution: peak memory, bytes read, and speed beside in-memory runs.

What it measures, in one run, printed side by side:

1. **Bigger than the budget**: writes a synthetic Qwen3-MoE checkpoint (the hub's on-disk
   layout: per-expert ``mlp.experts.N.gate_proj/up_proj/down_proj``, random bf16, one shard
   per layer, at least ``--gb`` GB) to a temporary directory, and traces it in a fresh
   process with ``--max-memory 2GiB``: peak RSS of that process, and tensor bytes read from
   the checkpoint per pass against its size. The checkpoint is deleted afterwards.
2. **Speed on a model that fits**: the shipped demo traced over ``--tokens`` tokens of the
   built-in corpus in memory (``--no-stream``) and streamed (``--stream``), each in a fresh
   process, and the tokens/s ratio (target >= 0.7).

Usage::

    python benchmarks/stream_bench.py                 # 6 GB synthetic checkpoint, 50k tokens
    python benchmarks/stream_bench.py --gb 2 --tokens 20000
    python benchmarks/stream_bench.py --device cuda   # on a GPU machine
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
from typing import Any

_HIDDEN = 1024
_INTER = 768
_EXPERTS = 64
_TOP_K = 2
_VOCAB = 384


def write_checkpoint(root: Path, gb: float) -> tuple[int, int]:
    """A random bf16 Qwen3-MoE checkpoint of at least ``gb`` GB; returns (layers, bytes)."""
    import torch
    from safetensors.torch import save_file

    from moescope.demo import demo_model_dir

    per_expert = 3 * _HIDDEN * _INTER * 2
    attn = (4 * _HIDDEN * _HIDDEN) * 2
    layers = max(2, int(gb * 1e9 // (_EXPERTS * per_expert + attn)) + 1)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": _VOCAB,
        "hidden_size": _HIDDEN,
        "intermediate_size": 2 * _INTER,
        "moe_intermediate_size": _INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_experts": _EXPERTS,
        "num_experts_per_tok": _TOP_K,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    demo = demo_model_dir("demo")
    assert demo is not None
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo / name, root / name)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> Any:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0
    shards: list[tuple[str, dict[str, Any]]] = []
    glob = {
        "model.embed_tokens.weight": rnd(_VOCAB, _HIDDEN),
        "model.norm.weight": torch.ones(_HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": rnd(_VOCAB, _HIDDEN),
    }
    shards.append(("model-globals.safetensors", glob))
    for i in range(layers):
        p = f"model.layers.{i}."
        t: dict[str, Any] = {
            p + "input_layernorm.weight": torch.ones(_HIDDEN, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(_HIDDEN, dtype=torch.bfloat16),
            p + "self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(128, dtype=torch.bfloat16),
            p + "mlp.gate.weight": rnd(_EXPERTS, _HIDDEN),
        }
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = rnd(_HIDDEN, _HIDDEN)
        for e in range(_EXPERTS):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(_INTER, _HIDDEN)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(_INTER, _HIDDEN)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(_HIDDEN, _INTER)
        shards.append((f"model-{i:05d}.safetensors", t))
        # write each shard as soon as it is built: the generator itself stays small
        name, tensors = shards.pop()
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        total += sum(v.numel() * 2 for v in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    name, tensors = shards.pop()
    save_file(tensors, str(root / name), metadata={"format": "pt"})
    total += sum(v.numel() * 2 for v in tensors.values())
    weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return layers, total


def child_trace(args: list[str]) -> dict[str, Any]:
    """Run ``moescope trace ARGS --json`` in a fresh process; its summary plus peak RSS."""
    code = (
        "import json, resource, sys\n"
        "from typer.testing import CliRunner\n"
        "from moescope.cli.app import app\n"
        "r = CliRunner().invoke(app, sys.argv[1:])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps({'exit': r.exit_code, 'stderr': r.stderr[-2000:], 'peak_rss': peak,"
        " 'summary': json.loads(r.stdout) if r.exit_code == 0 else None}))\n"
    )
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", code, "trace", *args, "--json", "-q"], capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(res.stderr)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["exit"] != 0:
        raise SystemExit(out["stderr"])
    out["wall"] = wall
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=6.0, help="synthetic checkpoint size (GB)")
    parser.add_argument("--budget", default="2GiB", help="--max-memory of the streamed big run")
    parser.add_argument("--big-tokens", type=int, default=2048, help="tokens traced on the big checkpoint")
    parser.add_argument("--tokens", type=int, default=50000, help="tokens of the speed comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    dev = ["--device", args.device]
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="moescope-stream-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_big:
            t0 = time.perf_counter()
            layers, size = write_checkpoint(work / "ckpt", args.gb)
            rows.append(
                (
                    "synthetic checkpoint",
                    f"{size / 1e9:.2f} GB, {layers} layers ({time.perf_counter() - t0:.0f} s to write)",
                )
            )
            big = child_trace([str(work / "ckpt"), "demo", "--max-tokens", str(args.big_tokens), "--seq-len", "256",
                               "--max-memory", args.budget, "--no-plots", "--out", str(work / "t-big"), *dev])  # fmt: skip
            s = big["summary"]
            read = (s.get("execution") or {}).get("bytes_read")
            rows += [
                (
                    f"streamed trace, --max-memory {args.budget}",
                    f"peak RSS {big['peak_rss'] / 2**30:.2f} GiB",
                ),
                ("bytes read per pass / checkpoint size", f"{read / size:.3f}" if read else "n/a"),
                ("streamed tokens/s (big)", f"{s['tokens'] / big['wall']:.0f} (wall incl. start-up)"),
            ]
            shutil.rmtree(work / "ckpt")
        common = ["demo", "demo", "--max-tokens", str(args.tokens), "--no-plots", *dev]
        mem = child_trace([*common, "--no-stream", "--out", str(work / "t-mem")])
        stm = child_trace([*common, "--stream", "--out", str(work / "t-stream")])
        tm = mem["summary"]["timings"]["trace_seconds"]
        ts = stm["summary"]["timings"]["trace_seconds"]
        same = (work / "t-mem" / "expert_load.csv").read_text() == (
            work / "t-stream" / "expert_load.csv"
        ).read_text()
        rows += [
            (f"demo, {mem['summary']['tokens']:,} tokens, in memory", f"{mem['summary']['tokens'] / tm:,.0f} tok/s, peak RSS {mem['peak_rss'] / 2**30:.2f} GiB"),
            ("demo, streamed", f"{stm['summary']['tokens'] / ts:,.0f} tok/s, peak RSS {stm['peak_rss'] / 2**30:.2f} GiB"),
            ("streamed / in-memory tokens/s", f"{tm / ts:.2f} (target >= 0.7)"),
            ("expert_load.csv identical", str(same)),
        ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
