"""Layer-streamed execution: run a model bigger than memory one decoder layer at a time.

What: :class:`StreamedModel` runs a list of token batches through a checkpoint in
*layer-major* order, so only one decoder layer's weights are resident at a time and each
weight is read once per pass, as calibration tools for quantisers do. Trace, eval,
similarity and the pruning scores use it when the model does not fit the memory budget.

How:

- The model skeleton is built from its config with parameters on the meta device and
  buffers (rotary tables) real (``accelerate.init_empty_weights(include_buffers=False)``).
- Weights go through transformers' own checkpoint conversion
  (``convert_and_load_state_dict_in_model`` with the model's conversion mapping), fed
  with only one layer's tensors at a time as lazy ``safe_open`` slices: the on-disk layout
  (e.g. Mixtral's per-expert ``block_sparse_moe.experts.N.w1``) becomes the module layout
  (fused ``mlp.experts.gate_up_proj``) exactly as ``from_pretrained`` does it, without
  writing anything to disk. Embeddings, final norm and head are loaded once.
- A first pass replaces every decoder layer's forward with a stub that records its
  inputs (hidden states for layer 0, keyword arguments for every layer: position
  embeddings and the mask of that layer's attention type) and passes the hidden states
  through. Then, for each layer: load its weights, run every batch through it (routing
  hooks fire as in a normal forward), keep the outputs as the next layer's inputs, and
  release the weights (back to meta; glibc is asked to return the memory).
- Eval needs logits: a final pass runs the model's own tail (norm, head, soft-capping)
  with the decoder layers stubbed to return the streamed final hidden states.
- Reading overlaps computing: while layer ``l`` runs, a background reader thread reads
  layer ``l+1``'s bytes (``os.preadv`` into a fresh buffer at the offsets of the safetensors
  header, which releases the GIL, so disk or page-cache reads run beside torch's kernels).
  The buffer is bounded: at most :data:`PREFETCH_LAYERS` layers are read ahead of the
  resident one (``MOESCOPE_STREAM_PREFETCH``; 0 reads on load), so memory holds about two
  layers. The thread also runs the conversion (and dequantisation) into that layer's
  modules, which the computing thread does not touch until it takes the layer. A streamed
  pass then takes about ``max(read + convert, compute)`` rather than their sum.
- Batches whose hidden states exceed a share of the memory budget are run in chunks,
  each chunk one layer-major pass (weights are then read once per chunk). When to stream
  at all is decided in :mod:`moescope.execution.plan`.

The results equal the in-memory model's (the same ops on the same inputs; bit-identical
in float32 on CPU, see tests/test_stream.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope.errors import CheckpointError, MoescopeError
from moescope.execution.placement import pread_into

#: layers read ahead of the resident one by the background reader (the bounded buffer)
PREFETCH_LAYERS = 1

#: what the background reader hands over for a layer it has read and loaded into the model
_CONVERTED: Any = object()

# safetensors dtype names -> torch dtype names (what the direct reader can view bytes as)
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

# Decoder blocks are ``…layers.{i}.`` in almost every family, ``blocks.{i}`` in dbrx.
_LAYER_KEY_RE = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")


def _release_memory() -> None:
    """Ask glibc to hand freed pages back (fragmentation, not live tensors).

    The released weights are freed by reference counting when their parameters are
    replaced; a full ``gc.collect`` here cost more than the forward passes of a small model.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


@dataclass
class _Shards:
    """Which tensors of the checkpoint belong to which decoder layer, and their bytes."""

    files: dict[str, Path]
    by_layer: dict[int, list[str]] = field(default_factory=dict)
    globals_: list[str] = field(default_factory=list)
    nbytes: dict[str, int] = field(default_factory=dict)
    #: key -> (absolute byte offset in its file, safetensors dtype, shape)
    where: dict[str, tuple[int, str, tuple[int, ...]]] = field(default_factory=dict)


def _index_checkpoint(root: Path, num_layers: int, others: Sequence[str] = ()) -> _Shards:
    """Group the checkpoint's tensors by decoder layer; ``others``: prefixes of other layer lists
    (a vision or audio tower's ``…layers.N``), whose tensors are loaded once with the globals."""
    from moescope.checkpoint.header import read_safetensors_header
    from moescope.checkpoint.jsonfiles import index_shards, safe_child

    index = root / "model.safetensors.index.json"
    if index.exists():
        names = index_shards(root, index)
    else:
        names = sorted(p.name for p in root.glob("*.safetensors"))
    if not names:
        raise CheckpointError(
            f"{root} has no safetensors weights; streaming reads safetensors only (convert with "
            "save_pretrained(safe_serialization=True))."
        )
    shards = _Shards(files={})
    for name in names:
        path = safe_child(root, name, f"{index.name} shard")
        start, header = read_safetensors_header(path)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            shards.files[key] = path
            begin, end = info["data_offsets"]
            shards.nbytes[key] = int(end) - int(begin)
            shards.where[key] = (int(start) + int(begin), str(info["dtype"]), tuple(info["shape"]))
            m = _LAYER_KEY_RE.search(key)
            if m is None or any(key.startswith(o + ".") for o in others):
                shards.globals_.append(key)
            elif int(m.group(1)) < num_layers:
                shards.by_layer.setdefault(int(m.group(1)), []).append(key)
            # layers past num_hidden_layers (MTP heads) are not part of the causal LM
    return shards


def decoder_layers(model: Any, num_layers: int | Sequence[int]) -> Any:
    """The ``ModuleList`` of decoder layers (``model.layers``, ``transformer.blocks``, …).

    ``num_layers``: the layer count, or candidates in order of preference (longcat_flash's
    ``num_hidden_layers`` counts its two attention sublayers per block; ``num_layers`` is
    the block count).

    Raises:
        MoescopeError: none found (an architecture streaming does not know).
    """
    import torch

    wanted = [num_layers] if isinstance(num_layers, int) else list(num_layers)
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "blocks", "h")
    ]

    def has_experts(module: Any) -> bool:  # a multimodal model's towers have layers too
        return any(n.rsplit(".", 1)[-1] == "experts" for n, _ in module.named_modules())

    for n in wanted:
        found = [m for _, m in lists if len(m) == n]
        if found:
            return next((m for m in found if has_experts(m)), found[0])
    raise MoescopeError(
        f"cannot find the {wanted[0]} decoder layers of {type(model).__name__}; "
        "pass --no-stream to load it whole."
    )


def _layer_outputs(model: Any, layers: Any) -> int:
    """How many values the model's forward unpacks from each decoder layer call (1: the hidden states).

    Read from the source of the forward that loops over ``layers`` (``hidden_states,
    topk_indices = decoder_layer(...)`` in glm_moe_dsa, mistral_large4, zaya, …): those
    layers return the hidden states plus state handed to the next layer.
    """
    import inspect

    owner = next((m for m in model.modules() if any(c is layers for c in m.children())), None)
    if owner is None:
        return 1
    try:
        source = inspect.getsource(type(owner).forward)
    except (OSError, TypeError):
        return 1
    loop = re.search(r"for\s+(?:\w+\s*,\s*)?(\w+)\s+in\s+(?:enumerate\()?self\.\w+", source)
    if loop is None:
        return 1
    call = re.search(rf"^\s*(\w+(?:\s*,\s*\w+)+)\s*=\s*{re.escape(loop.group(1))}\(", source, re.M)
    return 1 if call is None else len(call.group(1).split(","))


class _Carried:
    """Stands, in the capture pass, for output ``slot`` (1, 2, …) of decoder layer ``layer``.

    Layers that return ``(hidden, state)`` hand ``state`` to the next layer through the model's
    loop; at run time the real value, per batch, replaces this placeholder.
    """

    __slots__ = ("layer", "slot")

    def __init__(self, layer: int, slot: int) -> None:
        self.layer, self.slot = layer, slot

    def __repr__(self) -> str:
        return f"<output {self.slot} of decoder layer {self.layer}>"


def _tensors(obj: Any) -> Iterator[Any]:
    """The tensors in ``obj`` (a tensor, or one level of tuple/list/dict of them)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            if isinstance(x, torch.Tensor):
                yield x
    elif isinstance(obj, dict):
        for x in obj.values():
            if isinstance(x, torch.Tensor):
                yield x


def _taint_mode() -> Any:
    """A torch function mode that marks every tensor computed from a marked tensor.

    The capture pass marks what the layer stubs return; a later layer receiving a marked
    tensor other than the previous layer's output means the model's loop computes on the
    layers' outputs between layers (a scale, a concatenation of block states), which the
    layer-major runner would skip.
    """
    from torch.overrides import TorchFunctionMode

    class Taint(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.marked: dict[int, Any] = {}  # id -> weakref (tensors compare elementwise)

        def mark(self, tensor: Any) -> None:
            import weakref

            self.marked[id(tensor)] = weakref.ref(tensor)

        def is_marked(self, tensor: Any) -> bool:
            ref = self.marked.get(id(tensor))
            return ref is not None and ref() is tensor

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if self.marked:
                inputs = [*args, *(kwargs or {}).values()]
                if any(self.is_marked(t) for x in inputs for t in _tensors(x)):
                    for t in _tensors(out):
                        self.mark(t)
            return out

    return Taint()


class StreamedModel:
    """A causal LM whose decoder layers are materialised one at a time.

    Args:
        path: a local safetensors checkpoint directory (``save_pretrained`` or a snapshot).
        dtype: ``auto`` (the checkpoint's) or a torch dtype name.
        device: torch device for the weights and activations.
        trust_remote_code: allow the checkpoint's own modelling code.

    Attributes:
        model: the skeleton (meta parameters except the resident globals): hook it like a
            loaded model, e.g. with :class:`moescope.execution.routing.RoutingRecorder`.
        bytes_read: tensor bytes loaded from the checkpoint so far.
    """

    def __init__(
        self, path: str | Path, *, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False
    ) -> None:
        import torch
        import transformers
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from moescope.execution.load import auto_class, default_experts_implementation, torch_dtype

        self.path = Path(path)
        self.device = torch.device(device)
        config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
        if getattr(config, "is_encoder_decoder", False):
            raise MoescopeError(f"{path}: encoder-decoder models are not streamed; pass --no-stream.")
        quant = getattr(config, "quantization_config", None)
        self.quantized = bool(quant)
        self.block: tuple[int, int] | None = None
        if quant:
            method = (
                quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
            )
            if str(method) not in ("fp8", "mxfp4", "QuantizationMethod.FP8", "QuantizationMethod.MXFP4"):
                raise MoescopeError(
                    f"{path}: {method} quantisation is not streamed (FP8 block scales and MXFP4 are); "
                    "pass --no-stream."
                )
            size = (
                quant.get("weight_block_size")
                if isinstance(quant, dict)
                else getattr(quant, "weight_block_size", None)
            )
            self.block = (int(size[0]), int(size[1])) if size else None
            # the skeleton is plain: layers are fed dequantised weights (moescope.execution.quant)
            with contextlib.suppress(AttributeError):
                delattr(config, "quantization_config")
        want = torch_dtype(dtype)
        if want == "auto":
            want = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            if isinstance(want, str):
                want = getattr(torch, want)
        self.dtype = want
        head, _kind = auto_class(config)
        with init_empty_weights(include_buffers=False):
            model = head.from_config(config, dtype=self.dtype, trust_remote_code=trust_remote_code)
        model.eval()
        with contextlib.suppress(Exception):  # families whose experts take no implementation
            model.set_experts_implementation(default_experts_implementation(str(device)))
        self.model = model
        text = config.get_text_config()
        counts = [
            int(v)
            for k in ("num_hidden_layers", "num_layers")
            if isinstance(v := getattr(text, k, None), int)
        ]
        self.layers = decoder_layers(model, counts)
        self.num_layers = len(self.layers)
        #: values each decoder layer returns (more than 1: hidden states and state for the next layer)
        self.layer_outputs = _layer_outputs(model, self.layers)
        where = next(n for n, m in model.named_modules() if m is self.layers)
        others = [  # a tower's layer lists (not the decoder's, nor lists inside its layers)
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.ModuleList) and n != where and not n.startswith(where + ".")
        ]
        self.shards = _index_checkpoint(self.path, self.num_layers, others)
        self.bytes_read = 0
        self.passes = 0
        #: checkpoint keys that matched no parameter, or matched one of another shape (verify reads these)
        self.unexpected_keys: set[str] = set()
        self.mismatched_keys: set[str] = set()
        #: seconds spent reading tensor bytes, and seconds the calling thread waited for the reader
        self.read_wait_s = 0.0
        self.read_s = 0.0
        # MOESCOPE_STREAM_PREFETCH=0 turns the reader off (read on load), for benchmarks
        self.prefetch = int(os.environ.get("MOESCOPE_STREAM_PREFETCH", PREFETCH_LAYERS))
        self._transformers = transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.modeling_utils import LoadStateDictConfig

        self._load_config = LoadStateDictConfig(
            pretrained_model_name_or_path=str(self.path),
            device_map={"": self.device},
            dtype=self.dtype,
            weight_mapping=get_model_conversion_mapping(model),  # type: ignore[arg-type]
        )
        from moescope.execution.placement import Placer

        #: the direct reader of decoder layers (CPU; MOESCOPE_STREAM_PLACE=0 turns it off)
        self.placer: Placer | None = None
        if (
            self.device.type == "cpu"
            and not self.quantized
            and os.environ.get("MOESCOPE_STREAM_PLACE") != "0"
        ):
            self.placer = Placer(
                model,
                self._load_config.weight_mapping or [],
                self.shards.where,
                self.shards.files,
                self.shards.nbytes,
                _ST_DTYPES,
            )
        self._load(self.shards.globals_)
        model.tie_weights()
        self._resident: int | None = None

    # -- weights --------------------------------------------------------------------------------
    def _read(self, keys: Sequence[str]) -> dict[str, Any]:
        """The tensors of ``keys``, read into fresh memory (thread-safe; no GIL held while reading).

        Each tensor is one ``os.preadv`` at its header offset into a new buffer, then viewed as
        its dtype and shape; a dtype torch cannot view falls back to ``safe_open``.
        """
        import time

        import torch

        t0 = time.perf_counter()
        state: dict[str, Any] = {}
        fds: dict[Path, int] = {}
        try:
            for k in keys:
                offset, st_dtype, shape = self.shards.where[k]
                name = _ST_DTYPES.get(st_dtype)
                if name is None or not hasattr(torch, name):  # a dtype torch cannot view bytes as
                    from safetensors import safe_open

                    with safe_open(str(self.shards.files[k]), framework="pt", device="cpu") as fh:
                        state[k] = fh.get_tensor(k)
                    continue
                path = self.shards.files[k]
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                n = self.shards.nbytes[k]
                buf = torch.empty(n, dtype=torch.uint8)
                pread_into(fds[path], buf, offset, n, path, k)
                dt = getattr(torch, name)
                state[k] = (buf.view(dt) if n else torch.empty(0, dtype=dt)).reshape(shape)
        finally:
            for fd in fds.values():
                os.close(fd)
        self.read_s += time.perf_counter() - t0
        return state

    def _load(self, keys: Sequence[str], state: dict[str, Any] | None = None) -> None:
        """Convert and load ``keys`` into the model (``state``: already read by :meth:`_read`)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.utils import logging as hf_logging

        if not keys:
            return
        if state is None:
            state = self._read(keys)
        if self.quantized:
            from moescope.execution.quant import dequantize_state

            state = dequantize_state(state, self.dtype, self.block)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, state, self._load_config)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if getattr(info, "conversion_errors", None):
            raise CheckpointError(f"{self.path}: converting weights failed: {info.conversion_errors}")
        self.unexpected_keys |= set(getattr(info, "unexpected_keys", ()) or ())
        self.mismatched_keys |= {
            str(m[0]) if isinstance(m, tuple) else str(m) for m in getattr(info, "mismatched_keys", ()) or ()
        }
        self.bytes_read += sum(self.shards.nbytes[k] for k in keys)

    def load_layer(self, i: int, state: Any = None) -> None:
        """Materialise decoder layer ``i`` (and release the one resident before).

        ``state`` is :data:`_CONVERTED` when the background reader has loaded it already.
        """
        if self._resident == i:
            return
        if self._resident is not None:
            self.release_layer(self._resident)
        if state is not _CONVERTED:  # else the reader converted and loaded it already
            self._load_layer(self.shards.by_layer.get(i, []))
        self._resident = i

    def _load_layer(self, keys: Sequence[str]) -> None:
        """Load a decoder layer's ``keys``: placed directly when the placer's plan for this
        layer kind is verified, else by transformers' conversion (verifying the plan)."""
        import time

        placer = self.placer
        plan = placer.plan(keys) if placer is not None and keys else None
        if placer is None or plan is None or plan.shape in placer.rejected:
            self._load(keys)
            return
        if plan.shape not in placer.verified:
            state = self._read(keys)
            self._load(keys, state)
            (placer.verified if placer.verify(plan, state) else placer.rejected).add(plan.shape)
            return
        t0 = time.perf_counter()
        tensors = placer.fill(plan)
        self.read_s += time.perf_counter() - t0
        placer.install(tensors)
        placer.placed += 1
        self.bytes_read += sum(self.shards.nbytes[k] for k in keys)

    @contextlib.contextmanager
    def _reader(
        self, layers: Sequence[int]
    ) -> Iterator[tuple[Callable[[int], dict[str, Any] | None], Callable[[], None]]]:
        """A background thread reading and loading ``layers`` in order, at most :attr:`prefetch` ahead.

        The thread loads a layer into its modules (placed directly, or read and converted by
        transformers: the per-expert stacking costs as much as a small layer's forward), while
        the calling thread computes the layer before: different modules, so the two never
        touch the same parameters. Yields ``(take, loaded)``: ``take(i)`` waits until layer
        ``i`` is loaded and returns :data:`_CONVERTED`; ``loaded()`` says the caller made it
        the resident layer, which frees the slot, so the thread starts on the next one
        (memory: the resident layer plus ``prefetch`` layers loaded ahead). With ``prefetch``
        0 there is no thread and ``take`` returns None (read and convert on load). Layers
        loaded ahead and never taken (an error) are released on exit.
        """
        import time

        if self.prefetch <= 0 or len(layers) < 2:
            yield (lambda _i: None), (lambda: None)
            return
        slots = threading.Semaphore(self.prefetch)  # the bounded buffer: layers loaded, not yet taken
        ahead: set[int] = set()  # loaded by the thread, not yet taken
        ready: queue.Queue[tuple[int, Any]] = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            for i in layers:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    self._load_layer(self.shards.by_layer.get(i, []))
                except BaseException as exc:  # handed to the calling thread, raised there
                    ready.put((i, exc))
                    return
                ahead.add(i)
                ready.put((i, _CONVERTED))

        thread = threading.Thread(target=work, name="moescope-layer-reader", daemon=True)
        thread.start()

        def take(i: int) -> dict[str, Any] | None:
            t0 = time.perf_counter()
            got, state = ready.get()
            self.read_wait_s += time.perf_counter() - t0
            if isinstance(state, BaseException):
                raise state
            if got != i:  # the reader follows the same order; anything else is a bug
                raise MoescopeError(f"layer reader out of order: wanted layer {i}, got {got}")
            ahead.discard(i)
            return state  # type: ignore[no-any-return]

        try:
            yield take, slots.release
        finally:
            stop.set()
            thread.join()
            while not ready.empty():  # drop what was read ahead and not used
                ready.get_nowait()
            for i in ahead - {self._resident}:
                self.release_layer(i)

    def release_layer(self, i: int) -> None:
        """Put layer ``i``'s parameters back on the meta device and return the memory (the
        placer keeps the tensors for the next layer it places)."""
        if self.placer is not None:
            self.placer.recycle(self.layers[i])
        else:
            self.layers[i].to("meta")
        if self._resident == i:
            self._resident = None
        _release_memory()

    @property
    def config(self) -> Any:
        """The model's config."""
        return self.model.config

    def layer_bytes(self) -> int:
        """Bytes of the largest decoder layer as stored."""
        return max(
            (sum(self.shards.nbytes[k] for k in keys) for keys in self.shards.by_layer.values()), default=0
        )

    def close(self) -> None:
        """Close the checkpoint files and release every layer."""
        if self._resident is not None:
            self.release_layer(self._resident)
        if self.placer is not None:
            self.placer.drop_pool()
            _release_memory()

    # -- execution ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stubbed(self, stub: Callable[[int, Any, dict[str, Any]], Any]) -> Iterator[None]:
        """Replace every decoder layer's forward by ``stub(i, hidden, kwargs)``.

        Positional arguments after the hidden states travel as ``kwargs["_args"]``. For
        layers returning several values the stub's result is followed by one
        :class:`_Carried` placeholder per extra value.
        """
        extra = self.layer_outputs - 1
        for i, layer in enumerate(self.layers):

            def fwd(*args: Any, _i: int = i, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                out = stub(_i, hidden, {**kwargs, **({} if not args[1:] else {"_args": args[1:]})})
                return (out, *(_Carried(_i, s + 1) for s in range(extra))) if extra else out

            layer.forward = fwd
        try:
            yield
        finally:
            for layer in self.layers:
                with contextlib.suppress(AttributeError):
                    del layer.forward

    def _call_layer(
        self, i: int, hidden: Any, kwargs: dict[str, Any], carried: dict[tuple[int, int], Any]
    ) -> Any:
        """Run decoder layer ``i``; ``carried``: (layer, slot) -> value, the extra outputs of earlier layers."""

        def real(v: Any) -> Any:
            return carried[(v.layer, v.slot)] if isinstance(v, _Carried) else v

        kw = {k: real(v) for k, v in kwargs.items()}
        extra = tuple(real(v) for v in kw.pop("_args", ()))
        out = self.layers[i](hidden, *extra, **kw)
        if isinstance(out, tuple):
            if len(out) != self.layer_outputs:
                # transformers 5 decoder layers return the hidden states; the stubs do the same
                # (probing a real layer first would fire the caller's hooks one extra time)
                raise MoescopeError(
                    f"{self.path}: this architecture's decoder layers return {len(out)} values where its "
                    f"forward unpacks {self.layer_outputs}, which streaming does not handle; pass --no-stream."
                )
            for s, value in enumerate(out[1:], start=1):
                carried[(i, s)] = value
            return out[0]
        return out

    def _base_forward(self, batch: dict[str, Any]) -> Any:
        base = getattr(self.model, "base_model", self.model)
        return base(**{k: v.to(self.device) for k, v in batch.items()}, use_cache=False)

    def run(
        self,
        batches: Sequence[dict[str, Any]],
        *,
        after_layer: Callable[[int, int], None] | None = None,
        logits: Callable[[int, Any], None] | None = None,
        max_hidden_bytes: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> None:
        """Run ``batches`` (dicts with ``input_ids`` and ``attention_mask``) layer-major.

        Args:
            batches: the inputs, in order.
            after_layer: called as ``after_layer(layer, batch)`` right after decoder layer
                ``layer`` ran on batch ``batch`` (read routing hooks there).
            logits: called as ``logits(batch, tensor)`` with each batch's logits at the end.
            max_hidden_bytes: hidden states kept between layers at most; batches beyond
                are run in further chunks (each re-reads the weights).
            progress: called as ``progress(layers_done, layers_total)`` per layer and chunk.
            on_layer_done: called as ``on_layer_done(layer)`` once every batch of the chunk
                ran through ``layer``, while its weights are still resident.
        """
        import torch

        if not batches:
            return
        with torch.inference_mode():
            for start, stop in self._chunks(batches, max_hidden_bytes):
                self.passes += 1
                self._run_chunk(batches, start, stop, after_layer, logits, progress, on_layer_done)

    def _chunks(self, batches: Sequence[dict[str, Any]], limit: int | None) -> list[tuple[int, int]]:
        hidden = int(self.model.config.get_text_config().hidden_size)
        item = torch_itemsize(self.dtype)
        sizes = [int(b["input_ids"].numel()) * hidden * item for b in batches]
        if limit is None:
            return [(0, len(batches))]
        chunks, start, used = [], 0, 0
        for i, size in enumerate(sizes):
            if used and used + size > limit:
                chunks.append((start, i))
                start, used = i, 0
            used += size
        chunks.append((start, len(batches)))
        return chunks

    def _run_chunk(
        self,
        batches: Sequence[dict[str, Any]],
        start: int,
        stop: int,
        after_layer: Callable[[int, int], None] | None,
        logits: Callable[[int, Any], None] | None,
        progress: Callable[[int, int], None] | None,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> None:
        hidden: dict[int, Any] = {}
        kwargs: dict[tuple[int, int], dict[str, Any]] = {}
        carried: dict[int, dict[tuple[int, int], Any]] = {b: {} for b in range(start, stop)}
        current = [0]
        taint = _taint_mode()
        returned: list[Any] = [None]

        def capture(i: int, h: Any, kw: dict[str, Any]) -> Any:
            if i == 0:
                hidden[current[0]] = h
            elif h is not returned[0] or any(
                taint.is_marked(t) for v in (*kw.values(), *kw.get("_args", ())) for t in _tensors(v)
            ):
                raise MoescopeError(
                    f"{self.path}: {type(self.model).__name__} computes on the decoder layers' outputs "
                    f"between layers (before layer {i}), which the layer-major runner cannot replay; "
                    "pass --no-stream."
                )
            kwargs[(i, current[0])] = kw
            out = h.view(h.shape)  # a new tensor object (same memory): the input stays unmarked
            taint.mark(out)
            returned[0] = out
            return out

        with self._stubbed(capture), taint:
            for b in range(start, stop):
                current[0] = b
                returned[0] = None
                self._base_forward(batches[b])
        # the last layer that reads each carried value (dropped after it ran)
        last_use: dict[tuple[int, int], int] = {}
        for (i, _b), kw in kwargs.items():
            for v in (*kw.values(), *kw.get("_args", ())):
                if isinstance(v, _Carried):
                    key = (v.layer, v.slot)
                    last_use[key] = max(last_use.get(key, -1), i)
        order = list(range(self.num_layers))
        with self._reader(order) as (take, loaded):
            for i in order:
                state = take(i)
                self.load_layer(i, state)
                del state
                loaded()
                for b in range(start, stop):
                    out = self._call_layer(i, hidden[b], kwargs.pop((i, b)), carried[b])
                    hidden[b] = out
                    for key in [k for k in carried[b] if last_use.get(k, -1) <= i]:
                        del carried[b][key]
                    if after_layer is not None:
                        after_layer(i, b)
                if on_layer_done is not None:
                    on_layer_done(i)
                if progress is not None:
                    progress(i + 1, self.num_layers)
        if self._resident is not None:
            self.release_layer(self._resident)
        if self.placer is not None:  # the last layer's tensors are not needed for the tail
            self.placer.drop_pool()
            _release_memory()
        if logits is None:
            return
        for b in range(start, stop):
            final = hidden.pop(b)

            def tail(i: int, h: Any, kw: dict[str, Any], _f: Any = final) -> Any:
                out = _f if i == self.num_layers - 1 else h
                return out

            with self._stubbed(tail):
                batch = {k: v.to(self.device) for k, v in batches[b].items()}
                logits(b, self.model(**batch, use_cache=False).logits)


def torch_itemsize(dtype: Any) -> int:
    """Bytes per element of a torch dtype."""
    import torch

    return int(torch.empty((), dtype=dtype).element_size())
