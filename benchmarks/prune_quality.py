"""Held-out perplexity after pruning, by method, criterion, ratio and domain balancing.

What: traces the model on the corpus's ``train`` split (the calibration data) and measures
expert similarity on the same split (``moescope similarity``, for merging by outputs), then
for each drop ratio (25% and 50% of experts per layer), each method (``drop``; ``merge``:
each dropped expert folded into its most similar kept expert by the ``outputs`` measure,
neurons aligned, frequency-weighted) and each criterion (``frequency``, ``soft``, ``reap``,
``ean``; ``frequency`` and ``soft`` also with ``--balance-domains``, the only ones the
per-domain loads support) writes the pruned checkpoint and measures sliding-window
perplexity on the ``heldout`` split, overall and per domain. ``random`` is run with 5
seeds and reported as mean ± standard deviation. Two ablation rows per ratio merge
``reap``'s plan by the aligned weight cosine instead, and with ``--merge-router kept``.
The unpruned model is the first row. Prints one table (markdown) to stdout; progress goes
to stderr.

Run: ``.venv/bin/python benchmarks/prune_quality.py [--model demo] [--corpus demo]
[--methods drop,merge]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def evaluate_dir(path: str, tokenizer: Any, corpus: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from moescope.corpus.read import read_corpus
    from moescope.evaluation.perplexity import perplexity

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("eager")  # fastest on CPU (TRANSFORMERS_MOE.md)
        except (ValueError, TypeError):
            pass
    model.eval()
    res = perplexity(
        model,
        tokenizer,
        read_corpus([corpus], split="heldout"),
        seq_len=args.seq_len,
        stride=args.stride,
        max_tokens=args.max_tokens,
    )
    return {"ppl": res.perplexity, "domains": {d: r.perplexity for d, r in res.domains.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--corpus", default="demo")
    ap.add_argument("--trace", default=None, help="existing trace dir (default: trace the train split)")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--seeds", type=int, default=5)
    # inside the demo's 128-token training context (positions past it were never trained)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=30_000)
    ap.add_argument("--trace-tokens", type=int, default=60_000)
    ap.add_argument("--methods", default="drop,merge")
    ap.add_argument("--similarity-samples", type=int, default=512)
    args = ap.parse_args()

    from moescope import pruning as P
    from moescope.checkpoint.ref import local_dir
    from moescope.execution.load import load_model
    from moescope.redundancy.run import similarity
    from moescope.tracing import run_trace

    scratch = Path(tempfile.mkdtemp(prefix="prune_quality_"))
    t_start = time.perf_counter()
    try:
        trace = Path(args.trace) if args.trace else scratch / "trace"
        if not args.trace:
            print(f"tracing {args.model} on {args.corpus} (train split)...", file=sys.stderr)
            run_trace(
                args.model,
                [args.corpus],
                trace,
                split="train",
                max_tokens=args.trace_tokens,
                seq_len=args.seq_len,
                plots=False,
            )
        methods = args.methods.split(",")
        sim = scratch / "similarity"
        if "merge" in methods:
            print("measuring expert similarity (train split)...", file=sys.stderr)
            similarity(
                args.model,
                sim,
                corpus=[args.corpus],
                split="train",
                samples=args.similarity_samples,
                plots=False,
            )
        _, tokenizer = load_model(args.model)
        src = str(local_dir(args.model))
        rows: list[tuple[str, str, str, dict[str, Any]]] = []
        print("evaluating the unpruned model...", file=sys.stderr)
        base = evaluate_dir(src, tokenizer, args.corpus, args)
        domains = sorted(base["domains"])
        rows.append(("0%", "-", "none (unpruned)", base))
        for ratio in (float(r) for r in args.ratios.split(",")):
            for method in methods:
                merge = {"method": "merge", "similarity": sim} if method == "merge" else {}
                rows += _ratio_rows(P, trace, scratch, tokenizer, args, ratio, method, merge)
            if "merge" in methods:  # ablations: partners by aligned weights; routing as drop's
                for label, extra in (
                    ("reap, partners by weight", {"merge_by": "weight"}),
                    ("reap, --merge-router kept", {"similarity": sim, "merge_router": "kept"}),
                ):
                    res = _run(
                        P,
                        trace,
                        scratch,
                        tokenizer,
                        args,
                        ratio,
                        "reap",
                        False,
                        0,
                        {"method": "merge", **extra},
                    )
                    rows.append((f"{ratio:.0%}", "merge", label, res))
        header = ["drop", "method", "criterion", "perplexity", *domains]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for drop, method, label, res in rows:
            cells = [drop, method, label, _fmt(res["ppl"])] + [_fmt(res["domains"].get(d)) for d in domains]
            print("| " + " | ".join(cells) + " |")
        print(
            f"\n{args.model}, held-out split of {args.corpus}, seq_len {args.seq_len}, stride {args.stride}, "
            f"up to {args.max_tokens} tokens; trace: train split, {args.trace_tokens} tokens; "
            f"{time.perf_counter() - t_start:.0f} s in all."
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _ratio_rows(
    P: Any,
    trace: Path,
    scratch: Path,
    tokenizer: Any,
    args: argparse.Namespace,
    ratio: float,
    method: str,
    merge: dict[str, Any],
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """One row per informed criterion and one for ``random`` (mean ± sd over the seeds)."""
    runs: list[tuple[str, bool, int]] = []
    for crit in ("frequency", "soft", "reap", "ean"):
        runs.append((crit, False, 0))
        if crit in ("frequency", "soft"):
            runs.append((crit, True, 0))
    runs += [("random", False, s) for s in range(args.seeds)]
    rows: list[tuple[str, str, str, dict[str, Any]]] = []
    randoms: list[dict[str, Any]] = []
    for crit, balance, seed in runs:
        res = _run(P, trace, scratch, tokenizer, args, ratio, crit, balance, seed, merge)
        if crit == "random":
            randoms.append(res)
        else:
            rows.append((f"{ratio:.0%}", method, crit + (" --balance-domains" if balance else ""), res))
    if randoms:
        rows.append((f"{ratio:.0%}", method, f"random ({len(randoms)} seeds, mean ± sd)", _mean_sd(randoms)))
    return rows


def _run(
    P: Any,
    trace: Path,
    scratch: Path,
    tokenizer: Any,
    args: argparse.Namespace,
    ratio: float,
    crit: str,
    balance: bool,
    seed: int,
    merge: dict[str, Any],
) -> dict[str, Any]:
    """Prune (or merge) once and evaluate the result."""
    out = scratch / "pruned"
    P.prune(
        args.model,
        trace,
        out,
        ratio=ratio,
        criterion=crit,
        seed=seed,
        balance_domains=balance,
        verify=False,
        overwrite=True,
        **merge,
    )
    res = evaluate_dir(str(out), tokenizer, args.corpus, args)
    label = f"{merge.get('method', 'drop')} {ratio:.0%} {crit}{' --balance-domains' if balance else ''} seed {seed}"
    print(
        f"  {label} {merge.get('merge_by', '')}{merge.get('merge_router', '')}: ppl {res['ppl']:.3f}",
        file=sys.stderr,
    )
    return res


def _mean_sd(results: list[dict[str, Any]]) -> dict[str, Any]:
    def agg(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    domains = results[0]["domains"]
    return {
        "ppl": agg([r["ppl"] for r in results]),
        "domains": {d: agg([r["domains"][d] for r in results]) for d in domains},
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return f"{value[0]:.2f} ± {value[1]:.2f}"
    return f"{value:.2f}"


if __name__ == "__main__":
    main()
