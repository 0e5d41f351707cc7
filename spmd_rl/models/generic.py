"""Any transformers ``AutoModelForCausalLM`` behind the native decoder's forward contract.

For architectures the native decoder does not cover. It supports packed training (mode 1)
and plain batches (mode 2) and returns final-norm hidden states; it has no KV-cache path
(generation for these models goes through the HF rollout engine).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from spmd_rl.errors import UserError

# Config attributes that post-process logits after the lm head; compute_logits would miss them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
HF_MODEL_PREFIX = "hf_model."  # GenericCausalLM's parameter names are the HF model's behind this


@dataclass(frozen=True)
class GenericExportArgs:
    """What writing an HF folder needs of a transformers model's config, under the names
    :class:`~spmd_rl.models.args.ModelArgs` gives them (``save_pretrained``, generation ids)."""

    hf_config: dict  # the config.json to write

    @classmethod
    def from_config(cls, config) -> GenericExportArgs:
        """From a ``transformers.PretrainedConfig``."""
        as_dict = config.to_dict()
        as_dict["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
        return cls(as_dict)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, trust_remote_code: bool = False) -> GenericExportArgs:
        return cls.from_config(_auto_config(path, trust_remote_code))

    def to_hf_config(self) -> dict:
        return dict(self.hf_config)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.hf_config["tie_word_embeddings"]

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.hf_config.get("eos_token_id")

    @property
    def bos_token_id(self) -> int | None:
        return self.hf_config.get("bos_token_id")

    @property
    def pad_token_id(self) -> int | None:
        return self.hf_config.get("pad_token_id")


def _auto_config(path: str | os.PathLike, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"transformers cannot read the model config in {path}: {_first_sentence(e)}") from None


def _first_sentence(error: Exception) -> str:
    """A transformers error's first sentence on one line (its messages run on for paragraphs)."""
    return " ".join(str(error).split()).split(". ")[0][:300] or type(error).__name__


def expected_hf_shapes(path: str | os.PathLike, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer name -> shape of the transformers causal LM that ``path``'s config.json
    describes (built on the meta device: no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # not GenericCausalLM.from_config: a model it refuses still has shapes
        model = AutoModelForCausalLM.from_config(_auto_config(path, trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def copy_remote_code(source_dir: str | os.PathLike | None, args, folder: Path) -> None:
    """A config with ``auto_map`` names modelling code in its folder: the export carries it along,
    so ``from_pretrained(..., trust_remote_code=True)`` finds it."""
    if source_dir is None or not isinstance(args, GenericExportArgs) or "auto_map" not in args.hf_config:
        return
    for code in Path(source_dir).glob("*.py"):
        shutil.copy2(code, folder / code.name)


class GenericCausalLM(nn.Module):
    """Wraps an HF causal LM; parameters keep HF names under ``hf_model.``."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model
        config = hf_model.config
        for attr in _LOGIT_TRANSFORMS:
            value = getattr(config, attr, None)
            if value not in (None, 1.0):
                raise UserError(
                    f"{config.model_type} applies {attr}={value} to its logits, which spmd-rl does not support"
                )
        head = hf_model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise UserError(f"{config.model_type} has no bias-free lm head, which spmd-rl needs")

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
    ) -> GenericCausalLM:
        """Load an HF folder with ``AutoModelForCausalLM`` (CPU; move it with ``.to``)."""
        from transformers import AutoModelForCausalLM

        try:
            hf_model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True,
                                                                  trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:  # unknown architecture, no weights, unreadable files
            raise UserError(f"transformers cannot load a causal LM from {path}: {_first_sentence(e)}") from None
        if info.get("missing_keys"):  # weights of another architecture would leave a random model
            missing = sorted(info["missing_keys"])
            raise UserError(f"the weights in {path} do not match its config.json: {len(missing)} parameters missing "
                            f"(e.g. {missing[0]}); point model.path at a folder whose weights fit its config")
        return cls(hf_model)

    @classmethod
    def from_config(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        trust_remote_code: bool = False,
    ) -> GenericCausalLM:
        """The architecture of ``path``'s config.json with transformers' random init: no weights
        are read (a folder may have none)."""
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            hf_model = AutoModelForCausalLM.from_config(_auto_config(path, trust_remote_code), dtype=dtype,
                                                        trust_remote_code=trust_remote_code)
        return cls(hf_model)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] or [1, N] packed
        position_ids: torch.Tensor,  # same shape
        *,
        cu_seqlens: torch.Tensor | None = None,  # [S+1]
        kv_cache: object | None = None,
        cache_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, H]`` (``[1, N, H]`` when packed)."""
        if kv_cache is not None or cache_rows is not None:
            raise NotImplementedError("GenericCausalLM has no KV-cache path; generate with the hf rollout engine")
        if cu_seqlens is None:
            return self._hidden(input_ids, position_ids, None)
        return self._packed_hidden(input_ids[0], position_ids[0], cu_seqlens)

    def _hidden(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        # No KV cache: it only costs memory here, and a checkpointed block's recompute would append
        # its keys a second time
        out = self.hf_model.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                       use_cache=False)
        return out.last_hidden_state

    def _packed_hidden(
        self,
        input_ids: torch.Tensor,  # [N]
        position_ids: torch.Tensor,  # [N]
        cu_seqlens: torch.Tensor,  # [S+1]
    ) -> torch.Tensor:
        """Unpack to a right-padded ``[S, L]`` batch, run it, and pack the hidden states again.

        Right padding keeps every real token's causal context unchanged, so this is exact for any
        model that honours ``attention_mask``, whatever its attention implementation.
        """
        cu = cu_seqlens.to(input_ids.device).long()
        lengths = cu[1:] - cu[:-1]  # [S]
        num_seqs, max_len, n = lengths.numel(), int(lengths.max()), input_ids.numel()
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=cu.device), lengths, output_size=n)
        flat = seq_of_token * max_len + torch.arange(n, device=cu.device) - cu[seq_of_token]  # [N] padded index
        ids = input_ids.new_zeros(num_seqs * max_len).index_copy_(0, flat, input_ids)
        pos = position_ids.new_zeros(num_seqs * max_len).index_copy_(0, flat, position_ids)
        mask = torch.arange(max_len, device=cu.device)[None, :] < lengths[:, None]  # [S, L]
        hidden = self._hidden(ids.view(num_seqs, max_len), pos.view(num_seqs, max_len), mask.long())
        return hidden.reshape(num_seqs * max_len, -1)[flat].unsqueeze(0)

    def export_args(self) -> GenericExportArgs:
        """The config an HF export of this model writes."""
        return GenericExportArgs.from_config(self.hf_model.config)

    def lm_head_weight(self) -> torch.Tensor:
        """The ``[V, H]`` output projection."""
        return self.hf_model.get_output_embeddings().weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H] @ W.T -> [..., V]``."""
        return hidden @ self.lm_head_weight().t()
