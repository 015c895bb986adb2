"""``--save-routes`` Parquet is queryable as is: DuckDB SQL over ``routes/*.parquet``.

The demo model is traced with ``moescope trace --save-routes`` over a small corpus of three
domains plus one document without a domain. SQL over the route chunks (no moescope code
involved in reading them) must reproduce the counts the trace aggregated online:
``domain_load.csv`` per (domain, layer, expert), ``expert_load.csv`` per (layer, expert)
(tokens without a domain included), the top experts per domain and layer, and the gate
weight sums within float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.safety import invoke

duckdb = pytest.importorskip("duckdb")

# One row per (domain, layer, expert, token slot): the documented UNPIVOT over the
# layer columns, found by name pattern (no layer list needed).
_LONG = """
WITH long AS (
    UNPIVOT (SELECT domain, COLUMNS('^layer[0-9]+_experts$') FROM read_parquet($glob))
    ON COLUMNS('^layer[0-9]+_experts$') INTO NAME col VALUE experts
)
SELECT domain, CAST(regexp_extract(col, '[0-9]+') AS INTEGER) AS layer, UNNEST(experts) AS expert
FROM long
"""

_PER_DOMAIN = f"""
SELECT domain, layer, expert, count(*) AS tokens
FROM ({_LONG}) WHERE domain IS NOT NULL GROUP BY ALL
"""

_TOP = f"""
SELECT domain, layer, expert, tokens FROM ({_PER_DOMAIN})
QUALIFY row_number() OVER (PARTITION BY domain, layer ORDER BY tokens DESC, expert) <= 3
ORDER BY domain, layer, tokens DESC, expert
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo trace with routes over 3 domains x 3 short documents and one unlabelled document."""
    from moescope.corpus.read import read_corpus

    root = tmp_path_factory.mktemp("routes_duckdb")
    lines, per_domain = [], {}
    for doc in read_corpus("demo", split="heldout"):
        if per_domain.get(doc.domain, 0) < 3:
            per_domain[doc.domain] = per_domain.get(doc.domain, 0) + 1
            lines.append({"text": doc.text[:300], "domain": doc.domain})
    lines.append({"text": "a document that belongs to no domain at all, 1 2 3."})
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = root / "trace"
    result = invoke(
        ["trace", "demo", corpus, "--seq-len", "64", "--save-routes", "--no-plots", "--out", out, "-q"]
    )
    assert result.exit_code == 0, result.output
    assert len(per_domain) >= 3
    return out


def _sql(query: str, trace: Path) -> pd.DataFrame:
    con = duckdb.connect()
    return con.execute(query, {"glob": str(trace / "routes" / "*.parquet")}).df()


def test_schema_is_plain_sql_types(traced: Path) -> None:
    types = dict(
        _sql("DESCRIBE SELECT * FROM read_parquet($glob)", traced)[["column_name", "column_type"]].values
    )
    assert types["domain"] == "VARCHAR"
    assert types["token_id"] == "BIGINT"
    assert types["layer0_experts"] == "SMALLINT[]"
    assert types["layer0_weights"] == "FLOAT[]"


def test_per_domain_counts_equal_domain_load(traced: Path) -> None:
    got = _sql(_PER_DOMAIN, traced)
    want = pd.read_csv(traced / "domain_load.csv")
    assert set(got["domain"]) == set(want["domain"]) and len(set(want["domain"])) == 3
    merged = want.merge(got, on=["domain", "layer", "expert"], how="outer").fillna({"count": 0, "tokens": 0})
    assert len(merged) == len(want)  # SQL found no (domain, layer, expert) the trace did not
    assert (merged["count"].astype(int) == merged["tokens"].astype(int)).all()


def test_all_tokens_equal_expert_load(traced: Path) -> None:
    got = _sql(f"SELECT layer, expert, count(*) AS tokens FROM ({_LONG}) GROUP BY ALL", traced)
    want = pd.read_csv(traced / "expert_load.csv")
    merged = want.merge(got, on=["layer", "expert"], how="left").fillna({"tokens": 0})
    assert (merged["count"] == merged["tokens"]).all()
    # the unlabelled document's tokens are in expert_load but in no domain
    nulls = _sql("SELECT count(*) AS n FROM read_parquet($glob) WHERE domain IS NULL", traced)["n"].item()
    summary = json.loads((traced / "summary.json").read_text())
    assert nulls > 0
    domain_tokens = (
        pd.read_csv(traced / "domain_load.csv").query("layer == 0")["count"].sum() // summary["top_k"]
    )
    assert domain_tokens + nulls == summary["tokens"]


def test_top_experts_per_domain_and_layer(traced: Path) -> None:
    got = _sql(_TOP, traced)
    load = pd.read_csv(traced / "domain_load.csv")
    want = (
        load.sort_values(["domain", "layer", "count", "expert"], ascending=[True, True, False, True])
        .groupby(["domain", "layer"])
        .head(3)
    )
    assert (
        got[["domain", "layer", "expert"]].values.tolist()
        == want[["domain", "layer", "expert"]].values.tolist()
    )
    assert got["tokens"].tolist() == want["count"].tolist()


def test_gate_weight_sums(traced: Path) -> None:
    layers = json.loads((traced / "summary.json").read_text())["moe_layers"]
    parts = " UNION ALL ".join(
        f"SELECT {layer} AS layer, UNNEST(layer{layer}_experts) AS expert, "
        f"UNNEST(layer{layer}_weights) AS weight FROM read_parquet($glob)"
        for layer in layers
    )
    got = _sql(f"SELECT layer, expert, sum(weight::DOUBLE) AS w FROM ({parts}) GROUP BY ALL", traced)
    want = pd.read_csv(traced / "expert_load.csv").merge(got, on=["layer", "expert"])
    assert len(want) > 0
    assert ((want["weight_sum"] - want["w"]).abs() <= 1e-4 * want["weight_sum"].abs() + 1e-3).all()
