"""The demo models shipped inside the package, addressable as ``demo`` and ``demo-dense``.

The weights are trained by ``scripts/train_demo.py`` and live in ``moescope/demo/models/``
(``moe``: Mixtral, 8 experts, top-2; ``dense``: its Mistral twin with matching active
parameters), each with a model card and the ``train_metrics.json`` it quotes. The
built-in corpus they were trained on is assembled at run time by
:mod:`moescope.demo.corpus`.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"

#: model reference -> folder under :data:`MODELS_DIR`
DEMO_MODELS: dict[str, str] = {"demo": "moe", "demo-dense": "dense"}


def demo_model_dir(name: str) -> Path | None:
    """Folder of a shipped demo model, or ``None`` when ``name`` is not a demo name."""
    sub = DEMO_MODELS.get(name)
    return MODELS_DIR / sub if sub else None
