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
  layers. Conversion, dequantisation and the swap
  into the module stay on the calling thread. A streamed pass then takes about
  ``max(read, compute)`` rather than their sum.
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

#: layers read ahead of the resident one by the background reader (the bounded buffer)
PREFETCH_LAYERS = 1

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


def _index_checkpoint(root: Path, num_layers: int) -> _Shards:
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
            if m is None:
                shards.globals_.append(key)
            elif int(m.group(1)) < num_layers:
                shards.by_layer.setdefault(int(m.group(1)), []).append(key)
            # layers past num_hidden_layers (MTP heads) are not part of the causal LM
    return shards


def decoder_layers(model: Any, num_layers: int) -> Any:
    """The ``ModuleList`` of decoder layers (``model.layers``, ``transformer.blocks``, …).

    Raises:
        MoescopeError: none found (an architecture streaming does not know).
    """
    import torch

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.ModuleList) and leaf in ("layers", "blocks", "h"):
            if len(module) == num_layers:
                return module
    raise MoescopeError(
        f"cannot find the {num_layers} decoder layers of {type(model).__name__}; "
        "pass --no-stream to load it whole."
    )


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
        self.num_layers = int(text.num_hidden_layers)
        self.layers = decoder_layers(model, self.num_layers)
        self.shards = _index_checkpoint(self.path, self.num_layers)
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
                view = buf.numpy().data  # a writable memoryview of the buffer
                done = 0
                while done < n:  # preadv may return short counts on large reads
                    got = os.preadv(fds[path], [view[done:]], offset + done)
                    if got <= 0:
                        raise CheckpointError(f"{path}: truncated while reading {k}.")
                    done += got
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

    def load_layer(self, i: int, state: dict[str, Any] | None = None) -> None:
        """Materialise decoder layer ``i`` (and release the one resident before).

        ``state`` is the layer's tensors when the background reader has read them already.
        """
        if self._resident == i:
            return
        if self._resident is not None:
            self.release_layer(self._resident)
        self._load(self.shards.by_layer.get(i, []), state)
        self._resident = i

    @contextlib.contextmanager
    def _reader(
        self, layers: Sequence[int]
    ) -> Iterator[tuple[Callable[[int], dict[str, Any] | None], Callable[[], None]]]:
        """A background thread reading ``layers`` in order, at most :attr:`prefetch` ahead.

        Yields ``(take, loaded)``: ``take(i)`` gives layer ``i``'s tensors (waiting for the
        reader if it is behind); ``loaded()`` says they are in the model, which frees the
        buffer slot, so the reader starts on the next layer while this one computes (memory:
        the resident layer plus ``prefetch`` layers being read). With ``prefetch`` 0 there is
        no thread and ``take`` returns None (read on load).
        """
        import time

        if self.prefetch <= 0 or len(layers) < 2:
            yield (lambda _i: None), (lambda: None)
            return
        slots = threading.Semaphore(self.prefetch)  # the bounded buffer: layers read, not yet taken
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
                    state: Any = self._read(self.shards.by_layer.get(i, []))
                except BaseException as exc:  # handed to the calling thread, raised there
                    ready.put((i, exc))
                    return
                ready.put((i, state))
                del state  # else this frame keeps the layer's bytes alive until the next read

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
            return state  # type: ignore[no-any-return]

        try:
            yield take, slots.release
        finally:
            stop.set()
            thread.join()
            while not ready.empty():  # drop what was read ahead and not used
                ready.get_nowait()

    def release_layer(self, i: int) -> None:
        """Put layer ``i``'s parameters back on the meta device and return the memory."""
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

    # -- execution ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stubbed(self, stub: Callable[[int, Any, dict[str, Any]], Any]) -> Iterator[None]:
        """Replace every decoder layer's forward by ``stub(i, hidden, kwargs)``."""
        for i, layer in enumerate(self.layers):

            def fwd(*args: Any, _i: int = i, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                return stub(_i, hidden, {**kwargs, **({} if not args[1:] else {"_args": args[1:]})})

            layer.forward = fwd
        try:
            yield
        finally:
            for layer in self.layers:
                with contextlib.suppress(AttributeError):
                    del layer.forward

    def _call_layer(self, i: int, hidden: Any, kwargs: dict[str, Any]) -> Any:
        kw = dict(kwargs)
        extra = kw.pop("_args", ())
        out = self.layers[i](hidden, *extra, **kw)
        if isinstance(out, tuple):
            # transformers 5 decoder layers return the hidden states; the stubs do the same
            # (probing a real layer first would fire the caller's hooks one extra time)
            raise MoescopeError(
                f"{self.path}: this architecture's decoder layers return tuples, which streaming does "
                "not handle; pass --no-stream."
            )
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
        current = [0]

        def capture(i: int, h: Any, kw: dict[str, Any]) -> Any:
            if i == 0:
                hidden[current[0]] = h
            kwargs[(i, current[0])] = kw
            return h

        with self._stubbed(capture):
            for b in range(start, stop):
                current[0] = b
                self._base_forward(batches[b])
        order = list(range(self.num_layers))
        with self._reader(order) as (take, loaded):
            for i in order:
                state = take(i)
                self.load_layer(i, state)
                del state
                loaded()
                for b in range(start, stop):
                    out = self._call_layer(i, hidden[b], kwargs.pop((i, b)))
                    hidden[b] = out
                    if after_layer is not None:
                        after_layer(i, b)
                if on_layer_done is not None:
                    on_layer_done(i)
                if progress is not None:
                    progress(i + 1, self.num_layers)
        if self._resident is not None:
            self.release_layer(self._resident)
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
