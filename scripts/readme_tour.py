"""Regenerate (or check) every output block of the README tour from the shipped demo.

The tour shows commands as a ```` ```console ```` block whose lines start with ``$ moescope``,
followed by a plain ```` ``` ```` block with what they print. This script runs each such
command in order, in one scratch directory (so ``traces/demo`` written by ``trace`` is
there for ``report``), at a fixed terminal width, stdout only, and writes the output
back into the block. A console block with no output block after it is shown, not run
(hub ids, long jobs).

Usage::

    python scripts/readme_tour.py            # rewrite README.md
    python scripts/readme_tour.py --check    # exit 1 if any block is stale (CI)
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTH = "100"
_BLOCK = re.compile(r"```console\n(?P<cmds>(?:\$ [^\n]*\n)+)```\n```\n(?P<out>.*?)```\n", re.S)


def _command(line: str) -> list[str]:
    """``$ moescope trace demo demo --out x   # comment`` → argv (comment dropped)."""
    text = line[2:]
    args = shlex.split(text, comments=True)
    if not args or args[0] != "moescope":
        raise SystemExit(f"README tour: not a moescope command: {line!r}")
    return [sys.executable, "-m", "moescope", *args[1:]]


def run_block(cmds: str, cwd: Path) -> str:
    """Run each ``$`` line; return their stdout concatenated."""
    env = {**os.environ, "COLUMNS": WIDTH, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "TERM": "dumb"}
    env.pop("FORCE_COLOR", None)
    out = []
    for line in cmds.splitlines():
        res = subprocess.run(_command(line), cwd=cwd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"README tour: `{line[2:]}` failed ({res.returncode}):\n{res.stderr}")
        out.append(res.stdout)
    return "".join(out)


def regenerate(text: str, cwd: Path) -> str:
    """The README with every output block replaced by what its commands print now."""
    parts, last = [], 0
    for m in _BLOCK.finditer(text):
        output = run_block(m.group("cmds"), cwd)
        if output and not output.endswith("\n"):
            output += "\n"
        parts += [text[last : m.start("out")], output]
        last = m.end("out")
    parts.append(text[last:])
    return "".join(parts)


def served_responses(cwd: Path) -> None:
    """Write ``responses.jsonl`` for the import tour: the demo's routing as SGLang returns it.

    The demo is traced with ``--save-routes`` (12,000 tokens) and each document becomes one
    ``/generate`` response whose ``meta_info.routed_experts`` is base64 of little-endian int32
    ``[tokens, layers, top_k]``, exactly what ``--enable-return-routed-experts`` gives.
    """
    import base64
    import json

    import numpy as np
    import pandas as pd

    prep = cwd / ".served"
    cmd = [
        "trace",
        "demo",
        "demo",
        "--max-tokens",
        "12000",
        "--save-routes",
        "--no-plots",
        "--out",
        str(prep),
        "-q",
    ]
    res = subprocess.run([sys.executable, "-m", "moescope", *cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"README tour: preparing responses.jsonl failed:\n{res.stderr}")
    routes = pd.concat(pd.read_parquet(f) for f in sorted((prep / "routes").glob("*.parquet")))
    routes = routes.sort_values(["window", "position"], kind="stable")
    layers = sorted(int(c[5:-8]) for c in routes.columns if c.endswith("_experts"))
    lines = []
    for doc, rows in routes.groupby("doc", sort=True):
        ids = np.stack([np.stack(rows[f"layer{li}_experts"].to_numpy()) for li in layers], axis=1)
        payload = base64.b64encode(ids.astype("<i4").tobytes()).decode()
        domain = rows["domain"].iloc[0]
        lines.append(json.dumps({"text": "", "meta_info": {"id": f"doc{doc}", "routed_experts": payload},
                                 "domain": domain}))  # fmt: skip
    (cwd / "responses.jsonl").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is not current")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    with tempfile.TemporaryDirectory(prefix="moescope-tour-") as tmp:
        (Path(tmp) / "sample_configs").symlink_to(ROOT / "sample_configs")  # the tour names them
        served_responses(Path(tmp))  # the import tour's input
        new = regenerate(text, Path(tmp))
    if new == text:
        print("README tour is current.")
        return 0
    if args.check:
        diff = difflib.unified_diff(
            text.splitlines(), new.splitlines(), "README.md", "regenerated", lineterm=""
        )
        print("\n".join(list(diff)[:80]))
        print(
            "README tour is stale: run `python scripts/readme_tour.py` and commit README.md.", file=sys.stderr
        )
        return 1
    readme.write_text(new)
    print("README.md tour regenerated.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
