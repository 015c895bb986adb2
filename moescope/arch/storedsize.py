"""Bytes a checkpoint stores, estimated from its config alone (``quantization_config`` included).

When ``moescope params`` has only a config (a ``config.json``, a spec file, a hub id whose
headers were not read), "weights as stored" is this estimate; with safetensors headers it is
their sum (read, not estimated). How: every tensor of the config-derived inventory
(:func:`moescope.arch.closedform.config_inventory`, MTP layers included) is classified; the
matrices a quantiser converts are sized in its storage format, everything else in the
config's ``torch_dtype`` (bf16 when a quantised config gives none, as gpt-oss's does):

- ``fp8`` (DeepSeek-V3, Kimi-K2): F8 weight, plus an F32 ``weight_scale_inv`` of
  ``ceil(out/bo) × ceil(in/bi)`` per matrix (``weight_block_size``, 128 × 128), or one F32
  scale per matrix without blocks. Every linear layer except routers, embeddings and heads.
- ``mxfp4`` (gpt-oss): routed experts only, ``out × in/2`` bytes of blocks plus one E8M0
  scale byte per 32 values.
- ``bitsandbytes``: 4-bit: half a byte per value, an absmax per 64 values (F32, or one byte
  plus an F32 per 256 blocks with double quantisation) and a 16-entry map; 8-bit: a byte per
  value plus an F32 scale per output row.
- ``gptq`` / ``awq``: ``bits`` per value packed in int32, fp16 scales and packed zeros per
  ``group_size`` inputs and output; GPTQ adds an int32 ``g_idx`` per input.
- ``compressed-tensors``: ``num_bits`` per value, scales per ``strategy`` (tensor, channel,
  group, block) in 16 bits, zero points when asymmetric, a ``weight_shape`` when packed.

``modules_to_not_convert`` (and bitsandbytes' ``llm_int8_skip_modules``, compressed-tensors'
``ignore``) are honoured: plain names match as substrings of the module path (transformers'
rule), ``*`` patterns by glob, ``re:`` patterns by regular expression. Routers stay in 16 bit.
Multi-token-prediction layers are stored, so they are counted; so is the F32
``e_score_correction_bias`` buffer that sigmoid-routed families store beside each router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from math import ceil, prod
from typing import Any

from moescope.arch.inventory import Inventory
from moescope.arch.moe import MoESpec, classify
from moescope.errors import ConfigError
from moescope.families import get as _get

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "fp8": 1}
#: components whose matmul weights a quantiser converts (routers and embeddings are kept)
_LINEAR = ("attention", "dense_mlp", "routed_experts", "shared_experts")


@dataclass
class StoredEstimate:
    """A config-derived estimate of the bytes a checkpoint stores.

    Attributes:
        bytes: the estimate, or None when the config gives neither a dtype nor a quantisation
            format moescope models.
        format: how the estimate was made (``"fp8 128x128 blocks + bfloat16"``...).
        notes: caveats to show with the figure.
    """

    bytes: int | None
    format: str | None
    notes: list[str] = field(default_factory=list)


def _module(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` of ``model.layers.0.self_attn.q_proj.weight``."""
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def _matches(module: str, patterns: list[str]) -> bool:
    for pat in patterns:
        if pat.startswith("re:"):
            if re.search(pat[3:], module):
                return True
        elif "*" in pat or "?" in pat:
            parts = module.split(".")
            if any(fnmatchcase(".".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
                return True
        elif pat and pat in module:
            return True
    return False


def _matrices(name: str, shape: tuple[int, ...], family: str) -> tuple[int, int, int]:
    """(how many matrices, out features, in features) a stored weight holds.

    In-memory fused experts are ``[E, out, in]`` except gpt-oss's ``[E, in, out]``; a fused
    ``gate_up_proj`` is stored by per-expert checkpoints as two ``[I, H]`` matrices.
    """
    count = prod(shape[:-2]) if len(shape) > 2 else 1
    out, inp = shape[-2], shape[-1]
    if family == "gpt_oss" and ".experts." in name:
        return count, inp, out
    if name.endswith("gate_up_proj") and len(shape) == 3:
        return 2 * count, out // 2, inp
    return count, out, inp


class _Format:
    """One quantisation method: which matrices it converts and how many bytes each takes."""

    def __init__(self, q: dict[str, Any], dtype_bytes: int) -> None:
        self.method = str(q.get("quant_method") or "").lower().replace("_", "-")
        skip = q.get("modules_to_not_convert") or []
        if not isinstance(skip, (list, tuple)):
            raise ConfigError(
                f"quantization_config.modules_to_not_convert is {skip!r}; it must be a list of module "
                "names (fix the config)."
            )
        self.skip = [str(p) for p in skip]
        self.components: tuple[str, ...] = _LINEAR
        self.dtype_bytes = dtype_bytes
        self.q = q
        self.label = self.method
        self.known = True
        m = self.method
        if m == "fp8":
            blk = q.get("weight_block_size")
            self.block = (int(blk[0]), int(blk[1])) if isinstance(blk, list) and len(blk) == 2 else None
            self.label = f"fp8 {self.block[0]}x{self.block[1]} blocks" if self.block else "fp8 per-tensor"
        elif m == "mxfp4":
            self.components = ("routed_experts",)
        elif m == "bitsandbytes":
            self.skip += [str(p) for p in (q.get("llm_int8_skip_modules") or ["lm_head"])]
            self.four = bool(q.get("load_in_4bit"))
            self.double = bool(q.get("bnb_4bit_use_double_quant"))
            self.label = "bitsandbytes " + (
                f"4-bit {q.get('bnb_4bit_quant_type', 'fp4')}" if self.four else "8-bit"
            )
        elif m in ("gptq", "awq"):
            self.bits = int(q.get("bits", q.get("w_bit", 4)))
            g = int(q.get("group_size", q.get("q_group_size", 128)))
            self.group = g if g > 0 else 0
            self.skip += ["lm_head"]
            self.label = f"{m} {self.bits}-bit" + (f" g{self.group}" if self.group else "")
        elif m == "compressed-tensors":
            self.skip += [str(p) for p in (q.get("ignore") or [])]
            groups = [g for g in (q.get("config_groups") or {}).values() if isinstance(g, dict)]
            self.groups = [g for g in groups if isinstance(g.get("weights"), dict)]
            self.packed = "pack" in str(q.get("format") or "")
            w = self.groups[0]["weights"] if self.groups else {}
            self.label = f"compressed-tensors {w.get('num_bits', '?')}-bit {w.get('strategy', '')}".strip()
            self.known = bool(self.groups)
        else:
            self.known = False

    def converts(self, component: str, module: str) -> dict[str, Any] | bool:
        if not self.known or component not in self.components or _matches(module, self.skip):
            return False
        if self.method == "compressed-tensors":
            for g in self.groups:
                targets = [str(t) for t in (g.get("targets") or ["Linear"])]
                if "Linear" in targets or _matches(module, [t for t in targets if t.startswith("re:")]):
                    return dict(g["weights"])
            return False
        return True

    def nbytes(self, count: int, out: int, inp: int, args: dict[str, Any] | bool) -> int:
        """Bytes of ``count`` converted ``[out, in]`` matrices, weights and scales."""
        n = out * inp
        m = self.method
        if m == "fp8":
            scales = ceil(out / self.block[0]) * ceil(inp / self.block[1]) if self.block else 1
            return count * (n + 4 * scales)
        if m == "mxfp4":
            groups = ceil(inp / 32)
            return count * out * groups * 17  # 16 bytes of FP4 pairs + one E8M0 scale per group
        if m == "bitsandbytes":
            if not self.four:
                return count * (n + 4 * out)
            blocks = ceil(n / 64)
            absmax = blocks + 4 * ceil(blocks / 256) if self.double else 4 * blocks
            return count * (ceil(n / 2) + absmax + 64)
        if m in ("gptq", "awq"):
            groups = ceil(inp / self.group) if self.group else 1
            packed = ceil(n * self.bits / 8) + ceil(groups * out * self.bits / 8) + 2 * groups * out
            return count * (packed + (4 * inp if m == "gptq" else 0))
        assert isinstance(args, dict)  # compressed-tensors: the group's weight arguments
        bits = int(args.get("num_bits", 8))
        strategy = str(args.get("strategy", "tensor"))
        g = int(args.get("group_size") or 0)
        if strategy == "group" and g:
            scales = out * ceil(inp / g)
        elif strategy == "block" and isinstance(args.get("block_structure"), list):
            bo, bi = (int(x) for x in args["block_structure"][:2])
            scales = ceil(out / bo) * ceil(inp / bi)
        elif strategy == "channel":
            scales = out
        else:
            scales = 1
        zeros = 0 if args.get("symmetric", True) else ceil(scales * bits / 8)
        return count * (ceil(n * bits / 8) + 2 * scales + zeros + (8 if self.packed else 0))


def _quant_component(name: str, shape: tuple[int, ...], spec: MoESpec) -> tuple[str, bool]:
    """(component, is matmul weight) of a tensor; an MTP layer's decoder parts are classified
    as the same parts of the last decoder layer (they are quantised alike)."""
    c = classify(name, spec, len(shape))
    if c.component == "mtp" and c.layer is not None and spec.num_layers:
        last = max(spec.moe_layers) if spec.moe_layers else spec.num_layers - 1
        c = classify(name.replace(f".{c.layer}.", f".{last}.", 1), spec, len(shape))
        if c.component not in _LINEAR:
            return "mtp", False
    return c.component, c.is_matmul and not name.endswith(("bias", "_bias"))


def estimate_stored_bytes(cfg: dict[str, Any], spec: MoESpec, tensors: Inventory) -> StoredEstimate:
    """Bytes the checkpoint of ``cfg`` stores, from the config-derived inventory ``tensors``.

    Args:
        cfg: the (validated) config dict.
        spec: its :class:`~moescope.arch.moe.MoESpec`.
        tensors: the config-derived inventory, MTP layers included.

    Returns:
        A :class:`StoredEstimate` (``bytes`` None when the config gives no dtype or format).
    """
    q = _get(cfg, "quantization_config", "text_config.quantization_config")
    dt = str(_get(cfg, "torch_dtype", "dtype", "text_config.torch_dtype", default="") or "").lower()
    dtype_bytes = _DTYPE_BYTES.get(dt)
    notes: list[str] = []
    if not isinstance(q, dict):
        if dtype_bytes is None:
            return StoredEstimate(None, None)
        return StoredEstimate(sum(t.numel for t in tensors) * dtype_bytes, dt)
    if dtype_bytes is None:
        dtype_bytes, dt = 2, "bfloat16"
        notes.append("the config gives no torch_dtype: tensors that are not quantised counted as bfloat16")
    fmt = _Format(q, dtype_bytes)
    if not fmt.known:
        notes.append(
            f"quantization_config method {fmt.method!r} is not modelled: stored bytes estimated as if "
            f"unquantised ({dt})"
        )
    total = 0
    for t in tensors:
        comp, matmul = _quant_component(t.name, t.shape, spec)
        args = fmt.converts(comp, _module(t.name)) if matmul and len(t.shape) >= 2 else False
        if args:
            total += fmt.nbytes(*_matrices(t.name, t.shape, spec.family), args)
        else:
            total += t.numel * dtype_bytes
    if spec.family in ("deepseek_v3", "glm4_moe") and spec.is_moe:
        # the F32 e_score_correction_bias buffer stored beside each router, MTP layers' included
        moe_layers = len(spec.moe_layers) + spec.mtp_layers
        total += 4 * spec.num_experts * moe_layers
    label = f"{fmt.label} + {dt}" if fmt.known else dt
    return StoredEstimate(total, label, notes)
