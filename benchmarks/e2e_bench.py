"""End to end on a model bigger than the machine: trace, similarity, prune (drop, merge), eval (issue #19).

What it does, in one run:

1. Writes a synthetic **DeepSeek-V2-Lite-layout** checkpoint (the hub's on-disk names:
   MLA attention, a dense first layer, 64 routed experts of width 1408 plus 2 shared experts
   per MoE layer, top-6, per-expert ``mlp.experts.N.gate_proj/up_proj/down_proj``; random
   bf16, one shard per layer) of about ``--gb`` GB (default 30: 15.7B parameters at the
   real sizes) into a temporary directory under ``--dir``.
2. Runs, each in a fresh process with ``--max-memory BUDGET`` (default 3GiB):
   ``trace``, ``similarity --trace --no-align-weights`` (the aligned measure is
   ``E (E - 1) / 2`` = 2016 linear assignments of 1408 x 1408 per layer: hours on a small
   CPU), ``prune --drop N`` (verification streamed), ``eval`` of
   the pruned model, then ``prune --method merge --similarity`` (partners by the output
   cosine of the similarity step: ``--merge-by weight`` would align every dropped expert
   with every kept one, 1024 assignments of 1408 x 1408 per layer; verified streamed), then
   ``sweep --top-k 3`` of the checkpoint (native and k=3: one streamed pass each, on
   ``--sweep-tokens``). ``--steps`` runs a subset (``--steps sweep``), each step with what it
   needs.
3. Prints per step: wall seconds, peak RSS (the child's ``VmHWM``: ``ru_maxrss`` would include the parent's), bytes the child
   read (``/proc/self/io``: ``rchar``, syscalls, and ``read_bytes``, from the device) against
   the checkpoint's size, and the stderr plan line.

Everything it writes lives in one temporary directory that is removed at the end, on an
error, on Ctrl-C and on SIGTERM. It refuses to start without room for the checkpoint and
the largest pruned copy (about 1.6 × ``--gb``).

Usage::

    python benchmarks/e2e_bench.py                       # ~30 GB, 1024 tokens, --max-memory 3GiB
    python benchmarks/e2e_bench.py --gb 4 --tokens 256   # a quick rehearsal (fewer layers)
    python benchmarks/e2e_bench.py --dir /mnt/scratch    # where the temporary directory goes

Only run the full size where ``df`` shows more than ~60 GB free; timings on a machine
shared with other jobs are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: DeepSeek-V2-Lite's config (hub deepseek-ai/DeepSeek-V2-Lite), vocab cut to the demo tokenizer's range
CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 4096,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def layer_shapes(cfg: dict[str, Any], i: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of decoder layer ``i`` in the hub layout."""
    H, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    p = f"model.layers.{i}."
    s: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (H,),
        p + "post_attention_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (heads * qk, H),
        p + "self_attn.kv_a_proj_with_mqa.weight": (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], H),
        p + "self_attn.kv_a_layernorm.weight": (cfg["kv_lora_rank"],),
        p + "self_attn.kv_b_proj.weight": (
            heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]),
            cfg["kv_lora_rank"],
        ),
        p + "self_attn.o_proj.weight": (H, heads * cfg["v_head_dim"]),
    }
    if i < cfg["first_k_dense_replace"]:
        inter = cfg["intermediate_size"]
        s |= {
            p + "mlp.gate_proj.weight": (inter, H),
            p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter),
        }
        return s
    moe, E = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    shared = moe * cfg["n_shared_experts"]
    s[p + "mlp.gate.weight"] = (E, H)
    for e in range(E):
        q = p + f"mlp.experts.{e}."
        s |= {
            q + "gate_proj.weight": (moe, H),
            q + "up_proj.weight": (moe, H),
            q + "down_proj.weight": (H, moe),
        }
    q = p + "mlp.shared_experts."
    s |= {
        q + "gate_proj.weight": (shared, H),
        q + "up_proj.weight": (shared, H),
        q + "down_proj.weight": (H, shared),
    }
    return s


def layers_for(gb: float) -> int:
    """Layers of the real shapes that make about ``gb`` GB (at least 3: dense + 2 MoE)."""
    per = sum(_numel(s) for s in layer_shapes(CONFIG, 1).values()) * 2
    dense = sum(_numel(s) for s in layer_shapes(CONFIG, 0).values()) * 2
    return max(3, min(CONFIG["num_hidden_layers"], 1 + round((gb * 1e9 - dense) / per)))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(root: Path, layers: int) -> int:
    """Write the checkpoint shard by shard (memory stays near one layer); returns its tensor bytes."""
    import torch
    from safetensors.torch import save_file

    from moescope.demo import demo_model_dir

    cfg = {**CONFIG, "num_hidden_layers": layers}
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    demo = demo_model_dir("demo")
    assert demo is not None
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo / name, root / name)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0

    def tensor(name: str, shape: tuple[int, ...]) -> Any:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        scale = 0.5 if name.endswith("mlp.gate.weight") else (1.0 if "embed" in name else shape[-1] ** -0.5)
        return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)

    def save(name: str, shapes: dict[str, tuple[int, ...]]) -> None:
        nonlocal total
        tensors = {k: tensor(k, v) for k, v in shapes.items()}
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        total += sum(v.numel() * 2 for v in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))

    H, V = cfg["hidden_size"], cfg["vocab_size"]
    save(
        "model-globals.safetensors",
        {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)},
    )
    for i in range(layers):
        save(f"model-{i:05d}.safetensors", layer_shapes(cfg, i))
        print(f"  wrote layer {i + 1}/{layers} ({total / 1e9:.1f} GB)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


_CHILD = """
import json, sys
from typer.testing import CliRunner
from moescope.cli.app import app
r = CliRunner().invoke(app, sys.argv[1:])
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({"exit": r.exit_code, "stdout": r.stdout[-20000:], "stderr": r.stderr[-3000:],
                  "peak_rss": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024,
                  "rchar": int(io["rchar"]), "read_bytes": int(io["read_bytes"])}))
"""


def step(name: str, argv: list[str], size: int) -> dict[str, Any]:
    """Run ``moescope ARGV`` in a fresh process; wall, peak RSS, bytes read, the plan lines."""
    print(f"[{name}] moescope {' '.join(argv)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"[{name}] failed:\n{res.stderr[-3000:]}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    if data["exit"] != 0:
        raise SystemExit(f"[{name}] exit {data['exit']}:\n{data['stderr']}")
    plan = [ln for ln in data["stderr"].splitlines() if "streaming" in ln or "loading the model" in ln]
    data |= {"wall": wall, "plan": plan, "rchar_x": data["rchar"] / size, "disk_x": data["read_bytes"] / size}
    print(
        f"[{name}] {wall:.0f} s, peak RSS {data['peak_rss'] / 2**30:.2f} GiB, read {data['rchar_x']:.2f}x "
        f"(from the device {data['disk_x']:.2f}x) the checkpoint",
        file=sys.stderr,
        flush=True,
    )
    return dict(data)


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally that removes the files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=30.0, help="checkpoint size (GB); sets the layer count")
    parser.add_argument("--budget", default="3GiB", help="--max-memory of every step")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens traced and evaluated")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--drop", type=int, default=32, help="experts dropped per MoE layer (of 64)")
    parser.add_argument("--samples", type=int, default=64, help="similarity --samples")
    parser.add_argument(
        "--steps",
        default="trace,similarity,drop,eval,merge,sweep",
        help="comma-separated subset (a step runs what it needs: eval runs trace and drop)",
    )
    parser.add_argument("--sweep-tokens", type=int, default=256, help="tokens per sweep setting")
    parser.add_argument("--dir", default=None, help="where the temporary directory goes (default: $TMPDIR)")
    args = parser.parse_args()
    layers = layers_for(args.gb)
    free = shutil.disk_usage(args.dir or tempfile.gettempdir()).free
    need = args.gb * 1e9 * (2 - args.drop / CONFIG["n_routed_experts"]) * 1.05
    if free < need:
        raise SystemExit(
            f"needs about {need / 1e9:.0f} GB free in {args.dir or tempfile.gettempdir()}, has {free / 1e9:.0f} GB."
        )
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="moescope-e2e-", dir=args.dir))
    rows: list[tuple[str, str]] = []
    try:
        t0 = time.perf_counter()
        ckpt = work / "ckpt"
        size = write_checkpoint(ckpt, layers)
        rows.append(
            (
                "checkpoint",
                f"{size / 1e9:.2f} GB, {layers} layers (DeepSeek-V2-Lite layout), written in {time.perf_counter() - t0:.0f} s",
            )
        )
        mem = ["--max-memory", args.budget]
        tok = ["--max-tokens", str(args.tokens), "--seq-len", str(args.seq_len)]
        want = set(args.steps.split(","))
        results: dict[str, dict[str, Any]] = {}
        if want & {"trace", "similarity", "drop", "eval", "merge"}:
            results["trace"] = step("trace", ["trace", str(ckpt), "demo", *tok, *mem, "--no-plots", "--out", str(work / "t"), "--json", "-q"], size)  # fmt: skip
        if want & {"similarity", "merge"}:
            results["similarity"] = step("similarity", ["similarity", str(ckpt), "--trace", str(work / "t"), "--samples", str(args.samples), "--no-align-weights", *mem, "--no-plots", "--out", str(work / "s"), "--json"], size)  # fmt: skip
        if want & {"drop", "eval"}:
            results["prune drop (+ streamed verify)"] = step("prune drop", ["prune", str(ckpt), "--trace", str(work / "t"), "--drop", str(args.drop), *mem, "--out", str(work / "p-drop"), "--json"], size)  # fmt: skip
            pruned = sum(f.stat().st_size for f in (work / "p-drop").glob("*.safetensors"))
            if "eval" in want:
                results["eval of the pruned model"] = step("eval", ["eval", str(work / "p-drop"), "demo", *tok, *mem, "--json"], pruned)  # fmt: skip
            shutil.rmtree(work / "p-drop")  # room for the merged copy
        if "merge" in want:
            results["prune merge (+ streamed verify)"] = step("prune merge", ["prune", str(ckpt), "--trace", str(work / "t"), "--drop", str(args.drop), "--method", "merge", "--similarity", str(work / "s"), *mem, "--out", str(work / "p-merge"), "--json"], size)  # fmt: skip
            shutil.rmtree(work / "p-merge")
        if "sweep" in want:
            # native and top-k 3: one streamed pass each over the checkpoint
            sweep_tok = ["--max-tokens", str(args.sweep_tokens), "--seq-len", str(args.seq_len)]
            results["sweep native, k=3"] = step("sweep", ["sweep", str(ckpt), "demo", "--top-k", "3", *sweep_tok, *mem, "--json"], 2 * size)  # fmt: skip
        for name, r in results.items():
            base = {"eval": "pruned checkpoint", "sweep": "checkpoint per setting"}.get(
                name.split()[0], "checkpoint"
            )
            rows.append(
                (
                    name,
                    f"{r['wall']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB, read {r['rchar_x']:.2f}x the {base} "
                    f"({r['disk_x']:.2f}x from the device); {' | '.join(r['plan']) or 'no plan line'}",
                )
            )
        if "trace" in results:
            trace = json.loads(results["trace"]["stdout"])
            ex = trace.get("execution") or {}
            rows.append(("trace tokens, bytes read per pass", f"{trace['tokens']}, {ex.get('bytes_read', 0) / size:.3f}x the checkpoint ({ex.get('passes')} pass)"))  # fmt: skip
        if "eval of the pruned model" in results:
            ev = json.loads(results["eval of the pruned model"]["stdout"])
            rows.append(
                (
                    "pruned model's perplexity (random weights)",
                    f"{ev['perplexity']:.1f} over {ev['tokens']} tokens",
                )
            )
        if "sweep native, k=3" in results:
            sw = json.loads(results["sweep native, k=3"]["stdout"])
            rows.append(("sweep settings (perplexity, experts/token)", "; ".join(f"{r['setting']}: {r['perplexity']:.1f}, {r['experts_per_token']:.2f}" for r in sw)))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}", file=sys.stderr)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
