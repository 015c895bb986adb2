#!/usr/bin/env python
"""Train the shipped demo models: a small Mixtral MoE and its dense (Mistral) twin.

What: both models are trained from scratch on the ``train`` split of the built-in
``demo`` corpus (stdlib code, pydoc prose, generated numbers; :mod:`moescope.demo.corpus`)
with a byte-level tokenizer, evaluated on the ``heldout`` split per domain, and saved with
``save_pretrained`` (safetensors, float32) next to a ``train_metrics.json`` and a model
card (``README.md``) that quotes it. The MoE has 8 experts, top-2, and is trained with the
Mixtral load-balancing loss (``output_router_logits`` + ``router_aux_loss_coef``) so no
expert collapses; the dense twin has the same attention and depth and an MLP of
``top_k × expert width``, so its active parameters per token match the MoE's.

How: everything is seeded and runs with ``torch.use_deterministic_algorithms(True)`` on a
fixed number of threads; both models see the same batches (windows drawn from the
concatenated train documents by a seeded generator). After training, the script measures
per-domain held-out loss for both models, and for the MoE the share of routed assignments
per expert and layer on the held-out split, per domain, and the Jensen-Shannon divergence
(base 2, 0 = same distribution, 1 = disjoint) between the domains' load distributions.

Usage:
    python scripts/train_demo.py                       # writes moescope/demo/models/{moe,dense}
    python scripts/train_demo.py --out /tmp/demo-check  # a re-run to compare with the shipped one
    python scripts/train_demo.py --steps 5 --out /tmp/smoke   # smoke test of the pipeline
    python scripts/train_demo.py --compare /tmp/demo-check    # compare a re-run's held-out losses
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

# The machine is shared: with busy cores, OpenMP's spinning workers stall each other (steps
# measured 5-10x slower); passive waiting keeps 2 threads useful. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moescope.demo import MODELS_DIR  # noqa: E402
from moescope.demo.corpus import DOMAINS, iter_demo  # noqa: E402

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


# --- tokenizer -------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, so token id == byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_tokenizer() -> Any:
    """A byte-level tokenizer (ids 0-255 are the bytes) with bos/eos/pad specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    assert fast.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [BOS_ID, EOS_ID, PAD_ID]
    return fast


def encode(text: str) -> list[int]:
    """Token ids of a document as trained on: bos, its UTF-8 bytes, eos."""
    return [BOS_ID, *text.encode("utf-8"), EOS_ID]


# --- data ------------------------------------------------------------------------------------


def token_streams(split: str) -> dict[str, torch.Tensor]:
    """One long tensor of token ids per domain: the split's documents, concatenated."""
    ids: dict[str, list[int]] = {d: [] for d in DOMAINS}
    for domain, _doc_id, text in iter_demo(split=split):
        ids[domain].extend(encode(text))
    return {d: torch.tensor(v, dtype=torch.long) for d, v in ids.items()}


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows from the start of a held-out stream, ``[n, seq_len]``."""
    n = min(len(stream) // seq_len, max_windows)
    return stream[: n * seq_len].view(n, seq_len)


# --- models ----------------------------------------------------------------------------------


def configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The MoE (Mixtral) config and its dense (Mistral) twin: same attention, depth, vocab."""
    from transformers import MistralConfig, MixtralConfig

    common: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        # the context the model is trained on: eval and sweep default to windows inside it
        # (the config once said 1024, and 512-token windows scored untrained positions)
        max_position_embeddings=args.seq_len,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.02,
        use_cache=True,
    )
    moe = MixtralConfig(
        **common,
        intermediate_size=args.expert_width,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    dense = MistralConfig(**common, intermediate_size=args.top_k * args.expert_width)
    return moe, dense


def param_counts(model: torch.nn.Module, experts: int = 1, top_k: int = 1) -> dict[str, int]:
    """Total and active parameters (active = total − routed experts × (1 − top_k/experts))."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embedding = model.get_input_embeddings().weight.numel()
    active = total - round(routed * (1 - top_k / experts))
    return {
        "total": total,
        "active": active,
        "active_no_embedding": active - embedding,
        "routed_experts": routed,
    }


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style balance loss computed per layer, then averaged over layers.

    For each layer, ``E * sum_i f_i * P_i`` with ``f_i`` the share of the layer's top-k
    assignments that went to expert ``i`` and ``P_i`` its mean router probability; 1.0 when
    perfectly balanced. transformers' Mixtral ``aux_loss`` concatenates all layers' logits
    before computing this, so expert ``i`` of one layer is pooled with expert ``i`` of the
    others and a single layer can collapse unpunished (measured: a layer with an expert at
    0.02% of assignments while the pooled loss read "balanced").
    """
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        experts = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        f = F.one_hot(top, experts).float().sum(dim=(0, 1)) / (top.shape[0] * top_k)
        losses.append(experts * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: Any,
    train_ids: torch.Tensor,
    args: argparse.Namespace,
    name: str,
    is_moe: bool,
) -> dict[str, Any]:
    """Train in place; returns the loss history and wall time."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # same batches for both models
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    model.train()
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    warmup = max(1, args.steps // 20)
    run_lm = run_aux = 0.0
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        out = model(input_ids=batch, output_router_logits=True) if is_moe else model(input_ids=batch)
        lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB_SIZE).float(), batch[:, 1:].reshape(-1))
        loss = lm
        if is_moe:
            aux = load_balancing_loss(out.router_logits, args.top_k)
            loss = lm + args.aux_coef * aux
            run_aux += float(aux.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_lm += float(lm.detach())
        every = max(1, min(args.log_every, args.steps))
        if (step + 1) % every == 0 or step + 1 == args.steps:
            n = (step % every) + 1
            rec = {"step": step + 1, "lm_loss": run_lm / n, "lr": lr}
            if is_moe:
                rec["aux_loss"] = run_aux / n
            history.append(rec)
            elapsed = time.perf_counter() - t0
            aux = f" aux {rec['aux_loss']:.3f}" if is_moe else ""
            print(
                f"[{name}] step {step + 1}/{args.steps} loss {rec['lm_loss']:.4f}{aux} "
                f"lr {lr:.2e} {elapsed:.0f}s",
                flush=True,
            )
            run_lm = run_aux = 0.0
    model.eval()
    return {"history": history, "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def heldout_loss(model: Any, windows: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """Mean next-token cross-entropy (nats/byte) per domain and over all held-out tokens."""
    out: dict[str, float] = {}
    tot_loss = 0.0
    tot_n = 0
    for domain, w in windows.items():
        loss_sum = 0.0
        n = 0
        for i in range(0, len(w), batch_size):
            batch = w[i : i + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss_sum += float(
                F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1), reduction="sum")
            )
            n += batch[:, 1:].numel()
        out[domain] = round(loss_sum / n, 4)
        tot_loss += loss_sum
        tot_n += n
    out["all"] = round(tot_loss / tot_n, 4)
    return out


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def routing_stats(model: Any, windows: dict[str, torch.Tensor], batch_size: int) -> dict[str, Any]:
    """Per layer and domain, how the held-out tokens' top-k assignments spread over experts."""
    cfg = model.config
    layers, experts, k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    counts = {d: torch.zeros(layers, experts, dtype=torch.float64) for d in windows}
    for domain, w in windows.items():
        for i in range(0, len(w), batch_size):
            out = model(input_ids=w[i : i + batch_size], output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                top = logits.float().topk(k, dim=-1).indices.reshape(-1)
                counts[domain][layer] += torch.bincount(top, minlength=experts).double()
    total = sum(counts.values())
    share = total / total.sum(dim=1, keepdim=True)
    domain_share = {d: c / c.sum(dim=1, keepdim=True) for d, c in counts.items()}
    js = []
    for layer in range(layers):
        pairs = {
            f"{a}|{b}": round(js_divergence(domain_share[a][layer], domain_share[b][layer]), 4)
            for a, b in combinations(windows, 2)
        }
        js.append({"layer": layer, "pairs": pairs, "mean": round(sum(pairs.values()) / len(pairs), 4)})
    return {
        "assignments_per_layer": int(total[0].sum()),
        "share": [[round(float(x), 4) for x in row] for row in share],
        "min_share_per_layer": [round(float(row.min()), 4) for row in share],
        "max_share_per_layer": [round(float(row.max()), 4) for row in share],
        "domain_share": {
            d: [[round(float(x), 4) for x in row] for row in s] for d, s in domain_share.items()
        },
        "js_divergence_bits": js,
    }


SAMPLE_PROMPTS = ("def read_config(path):\n    ", "The ", "id,date,city,item,quantity,unit_price,total\n")


@torch.no_grad()
def samples(model: Any, tok: Any, seed: int, new_tokens: int = 120) -> list[str]:
    """Short seeded samples (temperature 0.7, top-k 20), one per domain, for the model card.

    Greedy decoding of a byte-level toy model falls into runs of spaces, so the card
    shows seeded samples instead; they are reproducible with the same torch build.
    """
    out = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        torch.manual_seed(seed + i)
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(
            ids, max_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_k=20, pad_token_id=PAD_ID
        )
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


# --- model cards ------------------------------------------------------------------------------


def _loss_table(metrics: dict[str, Any]) -> str:
    moe, dense = metrics["models"]["moe"]["heldout_loss"], metrics["models"]["dense"]["heldout_loss"]
    rows = ["| domain | held-out tokens | MoE loss | dense loss | MoE − dense |", "|---|---:|---:|---:|---:|"]
    for d in [*DOMAINS, "all"]:
        n = metrics["data"]["heldout_eval_tokens"][d]
        rows.append(f"| {d} | {n:,} | {moe[d]:.4f} | {dense[d]:.4f} | {moe[d] - dense[d]:+.4f} |")
    return "\n".join(rows)


def model_card(kind: str, metrics: dict[str, Any]) -> str:
    """README.md for one model folder, quoting ``train_metrics.json``."""
    m = metrics["models"][kind]
    other = "dense" if kind == "moe" else "moe"
    a = metrics["args"]
    arch = (
        f"Mixtral (`MixtralForCausalLM`): {a['layers']} layers, hidden {a['hidden']}, "
        f"{a['heads']} attention heads ({a['kv_heads']} key/value heads), {a['experts']} routed experts "
        f"per layer of width {a['expert_width']} (SwiGLU), top-{a['top_k']} routing, "
        f"load-balancing loss coefficient {a['aux_coef']}"
        if kind == "moe"
        else f"Mistral (`MistralForCausalLM`): {a['layers']} layers, hidden {a['hidden']}, "
        f"{a['heads']} attention heads ({a['kv_heads']} key/value heads), a dense SwiGLU MLP of width "
        f"{a['top_k'] * a['expert_width']} (= top-k × expert width of the MoE twin)"
    )
    lines = [
        "---",
        "library_name: transformers",
        "license: apache-2.0",
        "pipeline_tag: text-generation",
        "tags: [moescope, demo, " + ("mixture-of-experts]" if kind == "moe" else "dense]"),
        "---",
        "",
        f"# moescope demo model: `{'demo' if kind == 'moe' else 'demo-dense'}`",
        "",
        "A tiny byte-level language model shipped inside moescope so every command can run offline.",
        f"Its {'dense twin' if kind == 'moe' else 'MoE twin'} is in `../{other}` "
        f"(`{'demo-dense' if kind == 'moe' else 'demo'}`). It is a toy: it has learnt the look of Python "
        "code, Python documentation and CSV/JSON records, not language.",
        "",
        "## Architecture",
        "",
        f"- {arch}; untied input embedding and LM head; vocabulary {VOCAB_SIZE} "
        "(256 bytes + `<|bos|>`, `<|eos|>`, `<|pad|>`).",
        f"- Parameters: {m['params']['total']:,} total, {m['params']['active']:,} active per token "
        f"({m['params']['active_no_embedding']:,} without the input embedding). Active = total − routed-expert "
        "parameters × (1 − top_k / num_experts); embedding and head included.",
        f"- Weights: safetensors, **{metrics['weights_dtype']}**.",
        "- Tokenizer: `tokenizer.json` built with the `tokenizers` library (byte-level, token id = byte value), "
        "loaded by `AutoTokenizer` as a `PreTrainedTokenizerFast`.",
        "",
        "## Data",
        "",
        "The `train` split of moescope's built-in `demo` corpus, assembled at run time from the "
        f"Python {metrics['python']} installation: standard-library source files (`code`), pydoc topic texts "
        "(`prose`) and seeded CSV/JSON records (`numbers`). The split is a SHA-256 of the document id "
        f"(15% held out). Train tokens: "
        + ", ".join(f"{d} {n:,}" for d, n in metrics["data"]["train_tokens"].items())
        + ".",
        "",
        "## Training",
        "",
        f"`scripts/train_demo.py`: {a['steps']} steps of AdamW, batch {a['batch_size']} × {a['seq_len']} "
        f"tokens ({metrics['tokens_seen']:,} tokens), peak learning rate {a['lr']}, warmup then cosine decay, "
        f"seed {a['seed']}, {a['threads']} CPU threads, deterministic algorithms. Both models saw the same "
        f"batches. Training wall time: {m['train_seconds']:.0f} s; the whole script (both models, "
        f"evaluation, saving): {metrics['total_seconds']:.0f} s (torch {metrics['torch']}, transformers "
        f"{metrics['transformers']}).",
        "",
        "## Held-out loss (nats per byte, lower is better)",
        "",
        _loss_table(metrics),
        "",
    ]
    if kind == "moe":
        r = metrics["routing"]
        lines += [
            "## Routing on the held-out split",
            "",
            f"Share of each layer's routed assignments ({r['assignments_per_layer']:,} per layer = tokens × top-k):",
            "",
            "| layer | min expert share | max expert share | JS divergence between domains (mean, bits) |",
            "|---:|---:|---:|---:|",
        ]
        for i, (lo, hi) in enumerate(zip(r["min_share_per_layer"], r["max_share_per_layer"], strict=True)):
            lines.append(f"| {i} | {lo:.1%} | {hi:.1%} | {r['js_divergence_bits'][i]['mean']:.3f} |")
        lines += [
            "",
            "Every expert of every layer receives at least 2% of its layer's assignments (no dead experts); "
            "the per-domain load distributions differ (Jensen-Shannon divergence per pair in "
            "`train_metrics.json`).",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from moescope.execution.load import load_model",
        "",
        f'model, tok = load_model("{"demo" if kind == "moe" else "demo-dense"}")',
        "```",
        "",
        "or `AutoModelForCausalLM.from_pretrained(moescope.demo.demo_model_dir(...))`.",
        "",
        "Samples (temperature 0.7, top-k 20, seeded; the prompt is the first line):",
        "",
    ]
    for text in m["samples"]:
        lines += ["```", text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=MODELS_DIR, help="writes OUT/moe and OUT/dense (default: the package)"
    )
    p.add_argument(
        "--compare", type=Path, default=None, help="compare OUT's held-out losses with this re-run and exit"
    )
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=128)
    p.add_argument("--aux-coef", type=float, default=0.05)
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows per domain")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--recard",
        action="store_true",
        help="reload the models in OUT, redo the samples and rewrite the model cards (no training)",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="train the MoE only, print its routing, save nothing (for tuning)",
    )
    return p.parse_args(argv)


def compare(shipped: Path, rerun: Path) -> int:
    """Print the relative difference of held-out losses; exit 1 when any is over 2%."""
    a = json.loads((shipped / "moe" / "train_metrics.json").read_text())
    b = json.loads((rerun / "moe" / "train_metrics.json").read_text())
    worst = 0.0
    for kind in ("moe", "dense"):
        for d, x in a["models"][kind]["heldout_loss"].items():
            y = b["models"][kind]["heldout_loss"][d]
            rel = abs(y - x) / x
            worst = max(worst, rel)
            print(f"{kind:5s} {d:8s} shipped {x:.4f} rerun {y:.4f} rel diff {rel:.3%}")
    print(f"worst relative difference {worst:.3%} ({'OK' if worst <= 0.02 else 'OVER 2%'})")
    return 0 if worst <= 0.02 else 1


def write_cards(out: Path, metrics: dict[str, Any]) -> None:
    """Write ``train_metrics.json`` and ``README.md`` into both model folders."""
    for name in ("moe", "dense"):
        (out / name / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        (out / name / "README.md").write_text(model_card(name, metrics))


def recard(out: Path) -> int:
    """Redo the samples of the saved models and rewrite their cards from ``train_metrics.json``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    metrics = json.loads((out / "moe" / "train_metrics.json").read_text())
    for name in ("moe", "dense"):
        model = AutoModelForCausalLM.from_pretrained(out / name).eval()
        tok = AutoTokenizer.from_pretrained(out / name)
        metrics["models"][name].pop("sample", None)
        metrics["models"][name]["samples"] = samples(model, tok, metrics["args"]["seed"])
    write_cards(out, metrics)
    print(f"rewrote the cards in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare is not None:
        return compare(args.out, args.compare)
    if args.recard:
        return recard(args.out)

    import tokenizers
    import transformers
    from transformers import MistralForCausalLM, MixtralForCausalLM

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()

    tok = build_tokenizer()
    train_streams = token_streams("train")
    held_streams = token_streams("heldout")
    train_ids = torch.cat([train_streams[d] for d in DOMAINS])
    windows = {d: eval_windows(held_streams[d], args.seq_len, args.eval_windows) for d in DOMAINS}
    print(
        "train tokens "
        + ", ".join(f"{d} {len(s):,}" for d, s in train_streams.items())
        + f"; held-out windows {', '.join(f'{d} {len(w)}' for d, w in windows.items())}",
        flush=True,
    )

    moe_cfg, dense_cfg = configs(args)
    torch.manual_seed(args.seed)
    moe = MixtralForCausalLM(moe_cfg)
    if hasattr(moe, "set_experts_implementation"):
        moe.set_experts_implementation("eager")  # ~4x faster than grouped_mm on CPU
    torch.manual_seed(args.seed)
    dense = MistralForCausalLM(dense_cfg)
    counts = {
        "moe": param_counts(moe, args.experts, args.top_k),
        "dense": param_counts(dense),
    }
    gap = counts["moe"]["active"] / counts["dense"]["active"] - 1
    print(f"params {counts}; active gap {gap:+.2%}", flush=True)

    results: dict[str, Any] = {}
    runs = (("moe", moe, True),) if args.probe else (("moe", moe, True), ("dense", dense, False))
    for name, model, is_moe in runs:
        run = train(model, train_ids, args, name, is_moe)
        loss = heldout_loss(model, windows, args.batch_size)
        print(f"[{name}] held-out loss {loss}", flush=True)
        results[name] = {
            "model_type": model.config.model_type,
            "params": counts[name],
            "heldout_loss": loss,
            "train_seconds": run["seconds"],
            "final_train_loss": run["history"][-1]["lm_loss"],
            "history": run["history"],
            "samples": samples(model, tok, args.seed),
        }
    routing = routing_stats(moe, windows, args.batch_size)
    print(f"min expert share per layer {routing['min_share_per_layer']}", flush=True)
    print(f"JS divergence (mean per layer) {[x['mean'] for x in routing['js_divergence_bits']]}", flush=True)
    if args.probe:
        return 0

    metrics: dict[str, Any] = {
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out", "compare")
        },
        "weights_dtype": "float32",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "data": {
            "train_tokens": {d: len(s) for d, s in train_streams.items()},
            "heldout_tokens": {d: len(s) for d, s in held_streams.items()},
            "heldout_eval_tokens": {
                **{d: int(w[:, 1:].numel()) for d, w in windows.items()},
                "all": int(sum(w[:, 1:].numel() for w in windows.values())),
            },
        },
        "active_params_gap": round(gap, 4),
        "models": results,
        "routing": routing,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    for name, model in (("moe", moe), ("dense", dense)):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        model.config.use_cache = True
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        # transformers 5 writes its internal class name; name the public one so any loader maps it.
        tc_path = folder / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    write_cards(args.out, metrics)
    for name in ("moe", "dense"):
        for f in (args.out / name).iterdir():
            f.chmod(0o644)  # save_pretrained writes weights 0600; installed package data must be readable
    print(f"wrote {args.out / 'moe'} and {args.out / 'dense'} in {metrics['total_seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
