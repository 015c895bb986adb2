"""Options shared by several commands, defined once as ``Annotated`` aliases.

Each command keeps its own default (``dtype: DtypeOpt = "auto"``); the flag name and help
text live here so they read the same in every ``--help``.
"""

from __future__ import annotations

from typing import Annotated

import typer

DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, mps.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the checkpoint's own modelling code.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
