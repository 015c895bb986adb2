"""The generic MoE adapter: a model's experts, routers and shared experts found in transformers' own modules.

transformers 5 builds every current MoE the same way: a block (``model.layers.N.mlp``) holds
a router (``gate`` / ``router``), one experts module holding 3-D ``[E, ...]`` parameters whose
class is decorated with ``@use_experts_implementation`` (its instances carry
``_is_expert_parallel``), and optional shared experts. :func:`discover` builds the model of a
config on the meta device (no memory, no weights), walks its modules and returns a
:class:`Structure`: per MoE block its layer, expert count (from the tensor shapes), router
and shared-expert paths; top-k from the router module (``top_k``) or the config; the config
field that holds the expert count (found by matching the tensor dimension).

Families with a registry record (:mod:`moescope.families`) keep their record: it carries
published conventions the modules cannot tell. Everything else that transformers can build is
read here, so a new family needs no code. What cannot be determined is refused in one line
naming what is missing, never counted as dense.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from moescope.errors import ConfigError
from moescope.families import LAYER_RE, get

__all__ = ["Site", "Structure", "TOP_K_KEYS", "build_meta_model", "discover", "discovered", "stored_keys"]

#: config fields that hold experts per token, first present wins (after the router's ``top_k``)
TOP_K_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "top_k_experts",
    "experts_per_token",
    "moe_topk",
    "moe_top_k",
    "moe_k",
    "top_k",
    "n_activated_experts",
    "num_selected_experts",
    "router_topk",
)

#: config fields that may hold the routed-expert count (the one equal to the tensor dimension wins)
EXPERT_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
    "n_experts",
    "moe_num_routed_experts",
    "expert_num",
)

#: name endings that are buffers in most families (not parameters) but learned in some
BUFFER_LIKE = ("e_score_correction_bias",)

#: router attribute names on a MoE block, in the order tried
ROUTER_NAMES = ("gate", "router", "router_gate", "gating", "moe_gate", "classifier", "switch")


@dataclass(frozen=True)
class Site:
    """One MoE block of a model, as transformers holds it in memory.

    Attributes:
        block: module path of the block (``model.layers.3.mlp``).
        layer: decoder layer index in the path (None outside a layer stack).
        stack: ``encoder`` / ``decoder`` for encoder-decoder models, else ``""``.
        experts: path of the experts module.
        num_experts: routed experts (dim 0 of its 3-D parameters, or its child count).
        expert_params: parameters of the experts module (all experts).
        router: path of the router module (None when not found).
        router_top_k: the router module's own ``top_k`` attribute, if any.
        router_tensors: the router's saved tensors, relative to it (``weight``, ``proj.weight``,
            ``per_expert_scale``, ``e_score_correction_bias``).
        shared: paths of shared-expert modules under the block.
        shared_params: their parameters.
    """

    block: str
    layer: int | None
    stack: str
    experts: str
    num_experts: int
    expert_params: int
    router: str | None
    router_top_k: int | None
    router_tensors: tuple[str, ...]
    shared: tuple[str, ...]
    shared_params: int


@dataclass(frozen=True)
class Structure:
    """The MoE structure of one config, read from the transformers model built on the meta device.

    Attributes:
        model_type: the config's ``model_type``.
        sites: every MoE block, in module order.
        top_k: experts per token (router ``top_k``, else the config field ``top_k_field``).
        top_k_field: the config field k was read from (``router.top_k`` for the module attribute).
        num_experts_field: the config field whose value equals the expert count (dotted).
        total_params: parameters of the meta model (tied tensors once).
        text_scope: the config part that holds the MoE fields (``""`` or ``text_config``).
        buffers: last name parts of the saved buffers (``expert_bias``, ``tid2eid``): stored
            tensors, not parameters.
        towers: module names of the non-text towers beside the language model of a multimodal
            model (``visual``, ``audio_tower``): in the total, not active for text.
        stored_buffers: the saved buffers as the checkpoint names them (transformers' conversion
            mapping run in the saving direction), layer numbers blanked to ``#``: not parameters.
        stored_towers: the towers' parameters as the checkpoint names them, blanked likewise.
        stored_params: parameters named like buffers elsewhere (a correction bias that is a
            learned parameter in this family), as the checkpoint names them.
        stored_routing: the routers' tensors and the MoE blocks' own (not their children's:
            hy_v3's ``mlp.e_score_correction_bias``) as the checkpoint names them, blanked
            likewise: where pruning finds the router rows (hy_v3 stores ``mlp.gate.weight`` as
            ``mlp.router.gate.weight``, kolibri1 its gate's correction bias as
            ``moe.router.expert_bias``, outside the block).
    """

    model_type: str
    sites: tuple[Site, ...]
    top_k: int | None
    top_k_field: str | None
    num_experts_field: str | None
    total_params: int
    text_scope: str = ""
    buffers: tuple[str, ...] = ()
    towers: tuple[str, ...] = ()
    stored_buffers: frozenset[str] = frozenset()
    stored_towers: frozenset[str] = frozenset()
    stored_params: frozenset[str] = frozenset()
    stored_routing: frozenset[str] = frozenset()

    @property
    def is_moe(self) -> bool:
        return any(s.num_experts > 1 for s in self.sites)

    @property
    def num_experts(self) -> int:
        return max((s.num_experts for s in self.sites), default=0)

    def markers(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(routed, shared, router) name parts relative to a layer, lower case, for the classifier.

        A tensor outside a layer stack, where these cannot apply, is matched by its tower names
        (:attr:`towers`) instead.
        """

        def rel(path: str) -> str:
            m = LAYER_RE.search(path)
            return "." + (path[m.end() + 1 :] if m else path).lower() + "."

        routed = sorted({rel(s.experts) for s in self.sites})
        shared = sorted({rel(p) for s in self.sites for p in s.shared})
        router = sorted({rel(s.router) for s in self.sites if s.router})
        return tuple(routed), tuple(shared), tuple(router)


#: Structures discovered in this process, by model_type (the classifier reads their markers)
_SEEN: dict[str, Structure] = {}


def discovered(model_type: str) -> Structure | None:
    """The structure :func:`discover` found for ``model_type`` in this process, if any."""
    return _SEEN.get(model_type)


def _is_experts(module: Any) -> bool:
    """An experts module: decorated by ``use_experts_implementation``, or a container of experts."""
    return hasattr(module, "_is_expert_parallel")


def _param_count(module: Any) -> int:
    return sum(int(p.numel()) for p in module.parameters())


def _num_experts(module: Any) -> int:
    n = getattr(module, "num_experts", None)
    if isinstance(n, int) and n > 0:
        return n
    dims = [int(p.shape[0]) for p in module.parameters(recurse=False) if p.dim() == 3]
    if dims:
        return max(dims)
    return len(list(module.children()))


def _stack(path: str) -> str:
    parts = path.split(".")
    for stack in ("encoder", "decoder"):
        if stack in parts:
            return stack
    return ""


def _router(block: Any, experts_name: str, e: int) -> tuple[str | None, Any]:
    """(attribute name, module) of the block's router: a named child, else one with an ``[E, H]`` weight."""
    children = dict(block.named_children())
    for name in ROUTER_NAMES:
        if name in children and name != experts_name:
            return name, children[name]
    for name, child in children.items():
        if name == experts_name or "shared" in name:
            continue
        w = getattr(child, "weight", None)
        if w is not None and getattr(w, "dim", lambda: 0)() == 2 and int(w.shape[0]) == e:
            return name, child
    return None, None


def _int_attr(module: Any, *names: str) -> int | None:
    for name in names:
        v = getattr(module, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _sites(model: Any) -> list[Site]:
    modules = dict(model.named_modules())
    sites: list[Site] = []
    inside: list[str] = []
    for path, module in modules.items():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if not _is_experts(module):
            continue
        inside.append(path)
        block_path, _, name = path.rpartition(".")
        block = modules.get(block_path)
        if block is None:
            continue
        e = _num_experts(module)
        rname, router = _router(block, name, e)
        shared = [(n, c) for n, c in block.named_children() if "shared" in n and n != name]
        m = LAYER_RE.search(path)
        sites.append(
            Site(
                block=block_path,
                layer=int(m.group(1)) if m else None,
                stack=_stack(path),
                experts=path,
                num_experts=e,
                expert_params=_param_count(module),
                router=f"{block_path}.{rname}" if rname else None,
                router_top_k=_int_attr(router, "top_k", "num_experts_per_tok")
                if router is not None
                else None,
                router_tensors=tuple(sorted(router.state_dict(keep_vars=True))) if router is not None else (),
                shared=tuple(f"{block_path}.{n}" for n, _ in shared),
                shared_params=sum(_param_count(c) for _, c in shared),
            )
        )
    return sites


def _multimodal(cfg: dict[str, Any]) -> bool:
    """A config with a non-text part (``vision_config``, ``audio_config``, ...)."""
    return any(
        k.endswith("_config")
        and k not in ("text_config", "quantization_config", "rope_config")
        and isinstance(v, dict)
        for k, v in cfg.items()
    )


def _towers(model: Any, sites: list[Site]) -> tuple[str, ...]:
    """Names of the modules beside the language model that hold parameters (vision, audio towers).

    The language model is the module holding the layer stack of the first MoE block
    (``model.language_model`` of ``model.language_model.layers.3.mlp``); its siblings with
    parameters, other than the LM head, are towers.
    """
    if not sites:
        return ()
    m = LAYER_RE.search(sites[0].experts)
    if m is None:
        return ()
    stack = sites[0].experts[: m.start()]  # "model.language_model" (or "model")
    parent_path, _, text_name = stack.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    out = []
    for name, child in parent.named_children():
        if name in (text_name, "lm_head") or not any(True for _ in child.parameters()):
            continue
        out.append(name)
    return tuple(sorted(out))


def _tower_paths(model: Any, sites: list[Site], towers: tuple[str, ...]) -> list[str]:
    """Full module paths of the towers (``model.visual``) beside the language model."""
    if not towers or not sites:
        return []
    m = LAYER_RE.search(sites[0].experts)
    stack = sites[0].experts[: m.start()] if m else ""  # "model.language_model" (or "model")
    root = stack.rpartition(".")[0]
    return [f"{root}.{t}" if root else t for t in towers]


def blank_layer(name: str) -> str:
    """``name`` with its decoder-layer number as ``#`` (the classifier's key for a name shape)."""
    m = LAYER_RE.search(name)
    return f"{name[: m.start(1)]}#{name[m.end(1) :]}" if m else name


def stored_keys(model: Any, names: list[str]) -> frozenset[str]:
    """In-memory tensor names as ``save_pretrained`` writes them, layer numbers blanked.

    transformers renames tensors between a checkpoint and memory (``conversion_mapping``:
    ``mlp.gate.bias`` on disk is ``mlp.gate.e_score_correction_bias`` in memory, ``vit.`` is
    ``model.vision_tower.``); its own renaming run in the saving direction gives the stored
    names. Empty when this transformers has no such machinery.
    """
    if not names:
        return frozenset()
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = model.state_dict(keep_vars=True)
        picked = {n: state[n] for n in names if n in state}
        return frozenset(blank_layer(k) for k in revert_weight_conversion(model, picked))
    except Exception:  # an internal API that moved: fall back to the in-memory names
        return frozenset(blank_layer(n) for n in names)


def _scope(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The config part holding the MoE fields: the top level, else ``text_config`` / ``language_config``."""
    if any(k in cfg for k in (*EXPERT_KEYS, *TOP_K_KEYS)):
        return "", cfg
    for key in ("text_config", "language_config", "llm_config", "thinker_config"):
        sub = cfg.get(key)
        if isinstance(sub, dict) and any(k in sub for k in (*EXPERT_KEYS, *TOP_K_KEYS)):
            return key, sub
    return "", cfg


def _from_model(cfg: dict[str, Any], model: Any, where: str) -> Structure:
    sites = _sites(model)
    prefix, scope = _scope(cfg)
    e = max((s.num_experts for s in sites), default=0)
    exp_field = next(
        (k for k in EXPERT_KEYS if isinstance(scope.get(k), int) and scope.get(k) == e),
        None,
    )
    k: int | None = None
    k_field: str | None = None
    router_ks = {s.router_top_k for s in sites if s.router_top_k is not None}
    if len(router_ks) == 1:
        k, k_field = router_ks.pop(), "router.top_k"
    else:
        for key in TOP_K_KEYS:
            v = get(scope, key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                k, k_field = v, key
                break
    total = sum(int(p.numel()) for p in model.parameters())
    towers = _towers(model, sites) if _multimodal(cfg) else ()
    param_leaves = {n.rpartition(".")[2] for n, _ in model.named_parameters()}
    saved = set(model.state_dict(keep_vars=True)) - {
        n for n, _ in model.named_parameters(remove_duplicate=False)
    }
    buffers = tuple(sorted({n.rpartition(".")[2] for n in saved} - param_leaves))
    tower_params = [
        n
        for n, _ in model.named_parameters()
        if any(n == t or n.startswith(t + ".") for t in _tower_paths(model, sites, towers))
    ]
    stored_buffers, stored_towers = stored_keys(model, sorted(saved)), stored_keys(model, tower_params)
    buffer_like = [n for n, _ in model.named_parameters() if n.endswith(BUFFER_LIKE)]
    stored_params = stored_keys(model, buffer_like)
    routing = [f"{s.router}.{t}" for s in sites if s.router for t in s.router_tensors]
    for s in sites:
        block = model.get_submodule(s.block)
        own = [*block.named_parameters(recurse=False), *block.named_buffers(recurse=False)]
        routing += [f"{s.block}.{n}" for n, _ in own]
    dotted = lambda f: f"{prefix}.{f}" if prefix and f else f  # noqa: E731
    return Structure(
        model_type=str(cfg.get("model_type") or ""),
        sites=tuple(sites),
        top_k=k,
        top_k_field=k_field if k_field == "router.top_k" else dotted(k_field),
        num_experts_field=dotted(exp_field),
        total_params=total,
        text_scope=prefix,
        buffers=buffers,
        towers=towers,
        stored_buffers=stored_buffers,
        stored_towers=stored_towers,
        stored_params=stored_params,
        stored_routing=stored_keys(model, routing),
    )


def _fix_for_transformers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Published configs that the installed transformers refuses as written."""
    cfg = dict(cfg)
    if cfg.get("model_type") == "dbrx" and isinstance(cfg.get("ffn_config"), dict):
        ffn = dict(cfg["ffn_config"])
        if isinstance(ffn.get("moe_normalize_expert_weights"), int):
            ffn["moe_normalize_expert_weights"] = float(ffn["moe_normalize_expert_weights"])
        cfg["ffn_config"] = ffn
    if cfg.get("model_type") == "kimi_k2":
        cfg["model_type"] = "deepseek_v3"
    return cfg


def _json_floats(value: Any) -> Any:
    """A config value with transformers' JSON encoding of non-finite floats decoded.

    ``save_pretrained`` writes ``inf`` as ``{"__float__": "Infinity"}`` (JSON has no infinity);
    ``from_pretrained`` decodes it, and so must a config read as plain JSON.
    """
    if isinstance(value, dict):
        if set(value) == {"__float__"} and isinstance(value["__float__"], str):
            return float(value["__float__"])
        return {k: _json_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_floats(v) for v in value]
    return value


def build_meta_model(cfg: dict[str, Any]) -> Any:
    """Build the transformers model for a config dict on the meta device (no memory, no weights).

    Used as the fallback for families without a closed form and as the test oracle.
    """
    import torch
    import transformers

    cfg = _json_floats(_fix_for_transformers(cfg))
    mt = str(cfg.get("model_type") or "")
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(mt, **kwargs)
    except (ValueError, KeyError) as exc:
        raise ConfigError(
            f"transformers does not know model_type {mt!r} ({exc}); pass a checkpoint with safetensors "
            "weights so moescope can read its tensors instead."
        ) from exc
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            if cls is not None:
                return cls._from_config(config)
            try:
                return transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:
                return transformers.AutoModel.from_config(config)
    finally:
        transformers.logging.set_verbosity(prev)


@functools.lru_cache(maxsize=64)
def _discover_json(text: str, where: str) -> Structure:
    cfg = json.loads(text)
    try:
        model = build_meta_model(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except Exception as exc:  # transformers validates configs its own way, with many error types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"{where}: transformers cannot build model_type {cfg.get('model_type')!r} from this config "
            f"({type(exc).__name__}: {first}); fix the config."
        ) from exc
    return _from_model(cfg, model, where)


def knows(model_type: str) -> bool:
    """Whether the installed transformers has a config class for ``model_type`` (no model is built)."""
    if not model_type:
        return False
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # transformers not installed: nothing to discover with
        return False
    return model_type in CONFIG_MAPPING_NAMES


def discover(cfg: dict[str, Any], where: str = "config.json") -> Structure | None:
    """The MoE structure of a config, from transformers' modules on the meta device.

    Args:
        cfg: a transformers config as a dict.
        where: the file it came from, for messages.

    Returns:
        The :class:`Structure` (``is_moe`` False for a dense model); None when the installed
        transformers does not know the ``model_type``.

    Raises:
        ConfigError: transformers knows the type but cannot build the model from this config.
    """
    mt = str(cfg.get("model_type") or "")
    if not knows(mt):
        return None
    text = json.dumps(cfg, sort_keys=True, default=str)
    structure = _discover_json(text, where)
    _SEEN[mt] = structure
    return structure
