"""`moescope offload`: expert-cache hit rates, batch coverage and prefetch predictability.

Validates flags, calls :func:`moescope.serving.offload.offload_report` and prints three
tables (cache hit rate per policy and size, averaged over layers; distinct experts per
decode step beside independent routing; cross-layer predictability), or ``--json`` /
``--csv`` records of the cache table (``--all``: one object with every table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moescope.cli._errors import friendly
from moescope.cli._output import CsvOpt, JsonOpt, Output, QuietOpt, human

#: spelled out so --help does not import the library (equal to moescope.serving.POLICIES, tested)
POLICIES = ("lru", "lfu", "belady", "static")
CACHE_COLUMNS = ["layer", "policy", "cache_experts", "hit_rate", "bytes_per_token", "hits", "uses", "tokens"]

EXAMPLES = """
Examples:

  moescope trace demo demo --save-routes --out traces/demo     # routes in token order are needed
  moescope offload traces/demo
  moescope offload traces/demo --cache 2,4,6 --policy lru,belady --json
  moescope offload traces/demo --budget 3MiB --dtype bf16        # cache size from a memory budget
  moescope offload traces/demo --plot offload.png --csv > cache.csv
  moescope offload traces/demo --all --json | jq '.coverage[] | select(.batch == 8)'

Policies, per MoE layer, each token's k experts requested in order, a miss loads the expert:
lru (least recently used goes), lfu (least used since the start goes, ties LRU), belady (the
offline optimum: the expert needed farthest in the future goes), static (the C experts most
used in one half of the documents pinned, scored on the other half, both ways).

Batch coverage: distinct experts per layer in one decode step of B tokens, B documents side by
side (concurrent; needs B documents) or B consecutive tokens of one document, beside independent
routing with the layer's marginals, sum_e 1-(1-q_e)^B.

Predictability: from a token's top-1 expert at layer l, the k most frequent successors at the next
MoE layer (fitted on one half of the documents, scored on the other): top-1 hit and top-k recall,
beside predicting the next layer's most used experts.

Output: tables; --json prints the cache records (layer, policy, cache_experts, hit_rate,
bytes_per_token, hits, uses, tokens, expert_bytes), --csv the same rows; --all --json one object
with cache, coverage (layer, batch, concurrent, concurrent_steps, consecutive, consecutive_steps,
independent, num_experts, bytes_per_step) and predictability (layer, next_layer, top1_hit,
topk_recall, top1_base, topk_base, tokens). bytes_per_token: expert weight bytes loaded per token
at that layer (misses x bytes of one expert in --dtype, from the params accounting).
"""


def _ints(value: str | None, flag: str) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"{flag} {value!r}: expected integers like 2,4,8.") from None
    if not out or min(out) < 1:
        raise typer.BadParameter(f"{flag} {value!r}: every value must be at least 1.")
    return out


def _f(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def offload_cmd(
    trace: Annotated[
        Path, typer.Argument(help="Trace directory written with `moescope trace --save-routes`.")
    ],
    cache: Annotated[
        str | None,
        typer.Option("--cache", help="Cache sizes in experts per layer, e.g. 2,4,8 (default: a range)."),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget", help="Instead of --cache: memory for cached experts, all layers, e.g. 12GiB."
        ),
    ] = None,
    policy: Annotated[
        str, typer.Option("--policy", help="Policies, comma-separated: lru, lfu, belady, static.")
    ] = ",".join(POLICIES),
    batch: Annotated[
        str, typer.Option("--batch", help="Batch sizes for the coverage table.")
    ] = "1,2,4,8,16,32,64,128,256,512",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model that sizes the experts (default: the trace's).")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Expert weight format for bytes: stored, bf16, fp8 or int4.")
    ] = "stored",
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Use only the first N tokens of the trace.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write hit rate vs cache size per policy to this .png.")
    ] = None,
    all_tables: Annotated[
        bool, typer.Option("--all", help="With --json: one object holding every table.")
    ] = False,
    json_out: JsonOpt = False,
    csv_out: CsvOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Expert offloading what-ifs from real routing: cache hit rates, batch coverage, prefetch."""
    out = Output.from_flags(json_out, csv_out, quiet)
    sizes = _ints(cache, "--cache")
    batches = _ints(batch, "--batch") or []
    policies = [p.strip().lower() for p in policy.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise typer.BadParameter(f"--policy {policy!r}: use any of {', '.join(POLICIES)}.")
    if cache is not None and budget is not None:
        raise typer.BadParameter("Cannot use --cache and --budget together; pick one.")
    if dtype not in ("stored", "bf16", "fp8", "int4"):
        raise typer.BadParameter(f"--dtype {dtype!r}: use stored, bf16, fp8 or int4.")
    if all_tables and out.fmt != "json":
        raise typer.BadParameter("--all goes with --json.")
    if max_tokens is not None and max_tokens < 1:
        raise typer.BadParameter("--max-tokens must be at least 1.")
    budget_bytes = None
    if budget is not None:
        from moescope.execution.plan import parse_size

        try:
            budget_bytes = float(parse_size(budget))
        except ValueError:
            raise typer.BadParameter(
                f"--budget {budget!r}: expected a size such as 12GiB or 512MB."
            ) from None
    if plot is not None:
        from moescope.serving.plot import check_plot_path

        check_plot_path(plot)
    from moescope.serving.offload import offload_report

    rep = offload_report(
        trace, sizes=sizes, budget=budget_bytes, policies=policies, batches=batches, model=model, dtype=dtype,
        max_tokens=max_tokens,
    )  # fmt: skip
    for n in rep.notes:
        out.warn(n) if n.startswith("expert bytes unknown") else out.info(n)
    if plot is not None:
        from moescope.serving.plot import write_cache_plot

        write_cache_plot(rep.cache, plot, title=f"{rep.model}: expert-cache hit rate ({rep.tokens:,} tokens)")
    if out.fmt == "json":
        out.json(rep.to_dict() if all_tables else [r.to_dict() for r in rep.cache])
        return
    if out.fmt == "csv":
        out.csv([r.to_dict() for r in rep.cache], CACHE_COLUMNS)
        return
    _print_cache(out, rep)
    _print_coverage(out, rep)
    _print_predictability(out, rep)
    if plot is not None:
        out.note(f"wrote {plot}")
    out.note("per-layer rows: --json or --csv; every table: --all --json.")


def _print_cache(out: Output, rep: Any) -> None:
    sizes = sorted({r.cache_experts for r in rep.cache})
    policies = [p for p in POLICIES if any(r.policy == p for r in rep.cache)]
    n_layers = len({r.layer for r in rep.cache})
    rows = []
    for p in policies:
        cells = []
        for c in sizes:
            sel = [r.hit_rate for r in rep.cache if r.policy == p and r.cache_experts == c]
            cells.append(_f(sum(sel) / len(sel)))
        rows.append([p, *cells])
    out.table(
        rows,
        ["policy", *(f"C={c}" for c in sizes)],
        title=f"{rep.model}: expert-cache hit rate, mean over {n_layers} MoE layers ({rep.tokens:,} tokens, "
        f"top-{rep.top_k} of {rep.num_experts}; C = experts cached per layer)",
    )
    if rep.bytes is not None:
        one = sum(rep.bytes.expert_bytes.values()) / max(len(rep.bytes.expert_bytes), 1)
        out.note(
            f"one expert: {human(one, 'B')} ({rep.bytes.dtype}); bytes loaded per token and layer = "
            "(1 - hit rate) x k x that (bytes_per_token in --json/--csv)"
        )


def _print_coverage(out: Output, rep: Any) -> None:
    by: dict[int, list[Any]] = {}
    for c in rep.coverage:
        by.setdefault(c.batch, []).append(c)

    def mean(vals: list[Any]) -> float | None:
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    rows = []
    for b, cs in by.items():
        per_step = [c.bytes_per_step for c in cs]
        total = sum(per_step) if all(v is not None for v in per_step) else None
        rows.append(
            [b, _f(mean([c.concurrent for c in cs]), ".2f"), _f(mean([c.consecutive for c in cs]), ".2f"),
             _f(mean([c.independent for c in cs]), ".2f"), human(total, "B") if total is not None else "-"]
        )  # fmt: skip
    out.table(
        rows,
        ["batch", "concurrent docs", "consecutive tokens", "independent", "expert bytes/step"],
        title=f"Distinct experts per layer and decode step (of {rep.num_experts}; mean over layers)",
    )


def _print_predictability(out: Output, rep: Any) -> None:
    if not rep.predictability:
        return
    out.table(
        [
            [
                f"{p.layer}->{p.next_layer}",
                _f(p.top1_hit),
                _f(p.top1_base),
                _f(p.topk_recall),
                _f(p.topk_base),
            ]
            for p in rep.predictability
        ],
        ["layers", "top-1 hit", "(marginal)", f"top-{rep.top_k} recall", "(marginal)"],
        title="Next layer's experts from this layer's top-1 (most frequent successors, held-out half)",
    )


def register(app: typer.Typer) -> None:
    """Add ``offload`` to the app."""
    app.command("offload", epilog=EXAMPLES)(friendly(offload_cmd))
