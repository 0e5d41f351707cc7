"""Models: the native Llama-family decoder, HF folder I/O, and a generic transformers fallback."""

from __future__ import annotations

import torch
import torch.nn as nn

from spmd_rl.errors import UserError
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.decoder import DecoderLayer, Transformer
from spmd_rl.models.generic import GenericCausalLM
from spmd_rl.models.hf_io import load_pretrained, load_state_dict, read_hf_config, save_pretrained

NATIVE_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe"}

__all__ = [
    "NATIVE_MODEL_TYPES",
    "DecoderLayer",
    "GenericCausalLM",
    "ModelArgs",
    "Transformer",
    "build_model",
    "native_args",
    "load_pretrained",
    "load_state_dict",
    "read_hf_config",
    "save_pretrained",
]


def native_args(path: str, implementation: str = "auto", *, why: str = "model.random_init=true",
                fix: str = "load its weights instead (model.random_init=false)") -> ModelArgs:
    """The native decoder's shape from ``path``'s config.json, for a use that only the native
    decoder supports (``why``); a one-line UserError ending in ``fix`` for another model."""
    config = read_hf_config(path)
    if implementation == "generic" or config.get("model_type") not in NATIVE_MODEL_TYPES:
        raise UserError(f"{why} needs the native decoder ({', '.join(sorted(NATIVE_MODEL_TYPES))}); {path} is "
                        f"model_type {config.get('model_type')!r} (model.implementation={implementation}): {fix}")
    return ModelArgs.from_hf_config(config)


def build_model(
    path: str | None,
    *,
    args: ModelArgs | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefer_native: bool = True,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The policy/reference model: pretrained from an HF folder, or randomly initialised.

    With ``path``: the native decoder when the folder's model_type is native (and
    ``prefer_native``), else ``GenericCausalLM``. Without: a native ``Transformer`` from
    ``args``, built on the meta device and initialised in place with ``seed``.
    """
    if path is not None:
        model_type = read_hf_config(path).get("model_type")
        if prefer_native and model_type in NATIVE_MODEL_TYPES:
            return load_pretrained(path, device=device, dtype=dtype)
        return GenericCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    if args is None:
        raise ValueError("build_model needs a model folder or ModelArgs")
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype).to_empty(device=device)
    model.init_weights(seed=seed)
    return model
