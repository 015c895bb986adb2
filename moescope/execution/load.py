"""Load a model reference with transformers, for tracing, similarity, pruning and eval.

A reference is ``demo`` / ``demo-dense`` (shipped), a local ``save_pretrained``
directory, or a hub id (``org/name`` or ``org/name@revision``) read through the
standard HF cache. Remote code runs only with ``trust_remote_code=True``.
torch and transformers are imported inside the functions so the CLI starts fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from moescope.checkpoint.ref import ResolvedRef, as_ref
from moescope.errors import CheckpointError, ModelNotFoundError

_DTYPES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def torch_dtype(name: str) -> Any:
    """Map a dtype name (``auto``, ``bf16``, ``float32``...) to what ``from_pretrained`` takes."""
    import torch

    key = _DTYPES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, float32, bfloat16, float16.")
    return "auto" if key == "auto" else getattr(torch, key)


def default_experts_implementation(device: str) -> str:
    """On CPU the eager experts loop is several times faster than grouped_mm (docs/TRANSFORMERS_MOE.md)."""
    return "eager" if device.startswith("cpu") else "grouped_mm"


#: file suffixes of pickled weights: unpickling runs arbitrary code, so moescope never loads them
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

CONVERT_HINT = (
    "convert it once, in an environment you trust: "
    "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True), "
    "or for a hub repo use the hub's safetensors conversion (huggingface.co/spaces/safetensors/convert)"
)


def _require_safetensors(root: Path, ref: str) -> None:
    """Refuse a local checkpoint whose weights are only pickles, before transformers sees it.

    Raises:
        CheckpointError: no ``*.safetensors`` but pickled weights (``*.bin``, ``*.pt``, ...).
    """
    if (
        not root.is_dir()
        or (root / "model.safetensors.index.json").exists()
        or any(root.glob("*.safetensors"))
    ):
        return
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise CheckpointError(
            f"{ref} has only pickled weights ({pickles[0]}) and moescope reads safetensors only "
            f"(unpickling can run arbitrary code); {CONVERT_HINT}."
        )


def load_model(
    ref: ResolvedRef | str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    experts_implementation: str | None = None,
    device_map: str | None = None,
    max_memory: dict[Any, str] | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for a reference, in eval mode on ``device``.

    With ``device_map="auto"`` placement across GPUs, CPU and disk is accelerate's
    (``max_memory`` in its syntax, e.g. ``{"0": "20GiB", "cpu": "60GiB"}``) and
    ``device`` is ignored; offloaded weights are re-read on every forward pass.

    Weights are read from safetensors only (``use_safetensors=True``); a checkpoint with
    only pickled weights (``.bin``, ``.pt``) is refused with the way to convert it. Hub ids
    honour ``HF_HUB_OFFLINE`` and fail in seconds when the hub is unreachable and the model
    is not cached (see :func:`moescope.checkpoint.ref.hub_offline_reason`).

    Raises:
        ModelNotFoundError: the reference resolves to nothing (or is neither cached nor reachable).
        CheckpointError: transformers cannot load it (message says why), or the weights are pickles.
    """
    import transformers
    from transformers import AutoTokenizer

    mref = as_ref(ref, revision)
    ref = mref.ref
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype),
        "trust_remote_code": trust_remote_code,
    }
    offload: Any = None
    if device_map is not None:
        import tempfile

        offload = tempfile.TemporaryDirectory(prefix="moescope-offload-")
        kwargs.update(device_map=device_map, offload_folder=offload.name)
        if max_memory:
            kwargs["max_memory"] = max_memory
    if mref.revision:
        kwargs["revision"] = mref.revision
    offline_why: str | None = None
    if mref.is_local:
        _require_safetensors(Path(mref.path_or_id), ref)
    else:
        from moescope.checkpoint.hub import hub_env, hub_offline_reason

        env = hub_env()
        offline_why = hub_offline_reason(mref.path_or_id, mref.revision, env)
        kwargs["cache_dir"] = env["cache_dir"]
        if env["token"]:
            kwargs["token"] = env["token"]
        if offline_why is not None:
            kwargs["local_files_only"] = True
    tok_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    impl = experts_implementation or default_experts_implementation(device)
    transformers.logging.set_verbosity_error()
    if not sys.stderr.isatty():  # keep stderr to one line per message when piped (--json, CI)
        transformers.utils.logging.disable_progress_bar()
    model: Any
    try:
        # only how to find the files: anything else would become a config attribute
        hub_keys = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code")
        config_kwargs = {k: v for k, v in kwargs.items() if k in hub_keys}
        config = transformers.AutoConfig.from_pretrained(mref.path_or_id, **config_kwargs)
        head, kind = auto_class(config)
        try:
            model = head.from_pretrained(
                mref.path_or_id, config=config, experts_implementation=impl, use_safetensors=True, **kwargs
            )
        except (ValueError, TypeError) as exc:
            # Some families (llama4, dbrx, switch) refuse the setting: load with their default.
            if "experts_implementation" not in str(exc) and "experts" not in str(exc):
                raise
            model = head.from_pretrained(mref.path_or_id, config=config, use_safetensors=True, **kwargs)
        # tokenizer.json / sentencepiece / tiktoken files: none of them is a pickle
        tok = AutoTokenizer.from_pretrained(mref.path_or_id, **tok_kwargs)
    except OSError as exc:
        if exc.errno is not None:  # a real I/O error (disk full, permissions): the CLI maps it
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "safetensors" in first and ("no file named" in first or "does not appear to have" in first):
            raise CheckpointError(
                f"{ref} has no safetensors weights and moescope never unpickles .bin/.pt files; {CONVERT_HINT}."
            ) from exc
        hint = (
            f" ({offline_why}: run `moescope download {ref}` on a machine with network first)"
            if offline_why
            else ""
        )
        raise ModelNotFoundError(f"cannot load {ref}: {first}{hint}") from exc
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"transformers cannot load {ref}: {str(exc).splitlines()[0]}") from exc
    model._moescope_head = kind  # `base`: no LM head, so no perplexity (moescope.evaluation)
    if getattr(config, "model_type", None) == "nllb-moe":
        from moescope.execution.nllb import install

        install(model)  # the router's top-2 dispatch, not transformers 5.x's experts loop
    if device_map is None:
        model.to(device)
    else:
        model._moescope_offload = offload  # the offload folder lives as long as the model
    model.eval()
    return model, tok


#: the Auto classes tried for a config, in order, with the kind of model each gives
AUTO_CLASSES = (
    ("AutoModelForCausalLM", "causal"),
    ("AutoModelForImageTextToText", "image_text"),
    ("AutoModelForSeq2SeqLM", "seq2seq"),
)


def auto_class(config: Any) -> tuple[Any, str]:
    """``(Auto class, kind)`` that builds a language-model head for ``config``.

    A causal LM where transformers maps the config to one; else the image-text-to-text class
    of a vision-language MoE (its text path runs on token ids alone); else sequence-to-sequence
    (switch_transformers, nllb-moe); else the bare model (``base``: a text sub-model such as
    ``qwen3_vl_moe_text``, whose routing can be traced but which gives no logits).

    Raises:
        CheckpointError: none of them maps this config.
    """
    import transformers

    for name, kind in AUTO_CLASSES:
        cls = getattr(transformers, name, None)
        if cls is not None and type(config) in cls._model_mapping:
            return cls, kind
    if type(config) in transformers.AutoModel._model_mapping:  # a text sub-model: routing, no logits
        return transformers.AutoModel, "base"
    raise CheckpointError(
        f"transformers has no language-model head for model_type {getattr(config, 'model_type', '?')!r} "
        "(causal LM, image-text-to-text or seq2seq); moescope cannot run it."
    )


def encoder_layers(config: Any) -> int:
    """Encoder blocks of an encoder-decoder config (``num_layers`` of T5/Switch, ``encoder_layers`` of NLLB)."""
    for key in ("encoder_layers", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise CheckpointError(
        f"{getattr(config, 'model_type', '?')}: the config does not say how many encoder layers."
    )


def number_stacks(sites: list[Any], config: Any) -> list[Any]:
    """MoE sites with an encoder-decoder's decoder layers numbered after the encoder's.

    That is how ``params``, ``trace`` and ``prune`` number them (``encoder.N`` is layer N,
    ``decoder.N`` is layer ``encoder_layers + N``); decoder-only models' sites are unchanged.
    """
    import dataclasses

    if not getattr(config, "is_encoder_decoder", False):
        return sites
    n_enc = encoder_layers(config)
    return [dataclasses.replace(s, layer=s.layer + n_enc) if s.stack == "decoder" else s for s in sites]


class TeacherForced:
    """An encoder-decoder run on one text: the encoder reads it, the decoder is fed it shifted right.

    The decoder's routing is then defined by the corpus alone (the target is the text itself,
    started with the config's ``decoder_start_token_id``), so the encoder's and the decoder's
    MoE layers are both traced, token for token, under the same mask.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        start = getattr(model.config, "decoder_start_token_id", None)
        self.start = (
            int(start) if isinstance(start, int) else int(getattr(model.config, "pad_token_id", 0) or 0)
        )

    def decoder_inputs(self, input_ids: Any) -> Any:
        dec = input_ids.new_full(input_ids.shape, self.start)
        dec[:, 1:] = input_ids[:, :-1]
        return dec

    def __call__(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=self.decoder_inputs(input_ids),
            decoder_attention_mask=attention_mask,
            **kwargs,
        )

    def logits(self, input_ids: Any) -> Any:
        """Logits shifted so that position t predicts token t+1 (a causal LM's convention).

        The decoder's position t+1 predicts token t+1 having seen tokens up to t; the last
        position repeats (nothing scores it).
        """
        import torch

        out = self(input_ids=input_ids, use_cache=False).logits
        return torch.cat([out[:, 1:], out[:, -1:]], dim=1)


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local checkpoint directory (tokenizer.json / sentencepiece / tiktoken: no pickles)."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # long corpora are cut into windows by moescope
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({str(exc).splitlines()[0]}).") from exc
