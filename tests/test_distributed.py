"""torchrun: two gloo processes trace one corpus into one directory equal to a single-process run.

Both runs use one thread per process (torchrun's default), so every matmul is computed the
same way; the trace files must then be byte-identical, the routes the same rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

_ARGS = ["demo", "demo", "--max-tokens", "3000", "--batch-size", "2", "--seq-len", "128", "--no-plots",
         "--save-routes", "-q"]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _routes(folder: Path) -> pd.DataFrame:
    parts = [pq.read_table(p).to_pandas() for p in sorted((folder / "routes").glob("*.parquet"))]
    return pd.concat(parts).sort_values(["window", "position"]).reset_index(drop=True)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path: Path) -> None:
    dist, single = tmp_path / "dist", tmp_path / "single"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    res = subprocess.run([*run, "-m", "moescope", "trace", *_ARGS, "--out", str(dist)], env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "moescope", "trace", *_ARGS, "--out", str(single)], env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("expert_load.csv", "coactivation.csv", "capacity.csv", "domain_load.csv"):
        assert (dist / name).read_bytes() == (single / name).read_bytes(), name
    with np.load(dist / "state.npz") as a, np.load(single / "state.npz") as b:
        for key in a.files:
            if key != "header":
                assert np.array_equal(a[key], b[key]), key
    pd.testing.assert_frame_equal(_routes(dist), _routes(single))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (dist, single))
    assert sa["execution"]["ranks"] == 2 and "ranks" not in (sb["execution"] or {})
    skip = {"timings", "run_id", "execution", "owned_files", "files"}
    assert {k: v for k, v in sa.items() if k not in skip} == {k: v for k, v in sb.items() if k not in skip}
    # the ranks really split the work: each wrote its batches' routes, gathered by rank 0
    assert len(list((dist / "routes").glob("*.parquet"))) == 2
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".moescope")]
    assert leftovers == []
