"""Import routing recorded elsewhere (serving engines, custom loggers) as a trace directory.

What: :func:`import_routes` (``moescope import FORMAT PATH... --model MODEL --out DIR``)
reads one of :data:`FORMATS` and writes an ordinary trace directory (``report``,
``prune --criterion frequency``, ``similarity --trace`` read it like any trace):

- ``sglang-dump``: SGLang expert-distribution recorder dumps (``per_token`` or ``stat``
  mode), one file per rank (:mod:`moescope.importers.sglang`);
- ``sglang-response``: JSON lines of SGLang ``/generate`` responses with
  ``meta_info.routed_experts`` (:mod:`moescope.importers.sglang`);
- ``ids``: a long Parquet table ``layer, token, expert [, weight, doc, domain]`` or a
  ``.npy`` array ``[tokens, layers, k]`` (:mod:`moescope.importers.ids`).

How: the model's routing shape comes from its config (:func:`~moescope.importers.common.model_shape`,
header-only), the ids are normalised to logical experts at the MoE layers and reduced by the
trace's own reducer (:class:`~moescope.importers.common.RouteSink`); ``summary.json``
records ``source`` (the format) and ``lacks`` (what the source does not carry:
``gate_weights``, ``out_norms``, ``domains``, ``token_order``; counts-only ``stat`` dumps
also ``per_token``, ``coactivation``, ``capacity``, ``expert_parallel``).
"""

from moescope.importers.api import FORMATS, STAT_LACKS, ImportResult, import_routes
from moescope.importers.common import ModelShape, RoutingImportError, model_shape

__all__ = [
    "FORMATS",
    "STAT_LACKS",
    "ImportResult",
    "ModelShape",
    "RoutingImportError",
    "import_routes",
    "model_shape",
]
