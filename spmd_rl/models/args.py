"""Shape and option set of a native decoder, read from and written to an HF ``config.json``.

``ModelArgs`` is the one place that knows how the supported HF families (Llama, Mistral,
Qwen2, Qwen3, and the mixture-of-experts Mixtral and Qwen3-MoE) spell their options. The
decoder itself only sees the normalised fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from spmd_rl.errors import UserError

# model_type -> architecture written when the config has no ``architectures`` list.
DEFAULT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelArgs:
    """Hyper-parameters of a Llama-family decoder (see ``decoder.Transformer``)."""

    architecture: str  # HF architectures[0], e.g. "Qwen2ForCausalLM"
    model_type: str  # "llama" | "qwen2" | "qwen3" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF dict with "rope_type"; None means plain RoPE
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 when set)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    o_proj_bias: bool = False  # bias on o_proj (Llama/Qwen3 `attention_bias`; never Qwen2)
    sliding_window: int | None = None  # attend to the last `sliding_window` tokens (Mistral v0.1)
    # Mixture of experts (Mixtral, Qwen3-MoE; models/moe.py): 0 experts = dense MLPs everywhere.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's intermediate size (Mixtral: intermediate_size)
    norm_topk_prob: bool = True  # renormalise the top-k routing weights (always on for Mixtral)
    moe_layers: tuple[int, ...] = ()  # indices of the sparse layers; the others keep a dense MLP

    def __post_init__(self) -> None:
        self.moe_layers = tuple(self.moe_layers)
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UserError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                            f"{self.num_experts}]: fix config.json")
        if bool(self.moe_layers) != (self.num_experts > 0) or any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise UserError(f"sparse layers {list(self.moe_layers)} do not fit num_experts={self.num_experts} and "
                            f"{self.num_layers} layers: fix num_experts / mlp_only_layers / decoder_sparse_step "
                            "in config.json")
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise UserError(f"moe_intermediate_size={self.moe_intermediate_size} must be > 0 for a "
                            "mixture-of-experts model: fix config.json")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """Read an HF ``config.json`` dict; UserError for anything the native decoder cannot run."""
        model_type = cfg.get("model_type")
        if model_type not in DEFAULT_ARCHITECTURES:
            raise UserError(
                f"model_type {model_type!r} is not supported by the native decoder "
                f"(supported: {', '.join(sorted(DEFAULT_ARCHITECTURES))}); "
                "load it through the generic transformers path (GenericCausalLM) instead"
            )
        _check_unsupported_options(cfg, model_type)
        moe = _read_moe(cfg, model_type)
        num_heads = int(cfg["num_attention_heads"])
        rope_theta, rope_scaling = _read_rope(cfg)
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=(cfg.get("architectures") or [DEFAULT_ARCHITECTURES[model_type]])[0],
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            # All four families default to untied heads when the key is absent.
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and never an o_proj bias; Llama/Qwen3 share one flag.
            attention_bias=True if model_type == "qwen2" else bias,
            o_proj_bias=False if model_type == "qwen2" else bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=cfg.get("sliding_window") if model_type in ("mistral", "mixtral") else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            **moe,
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def mixtral_names(self) -> bool:
        """Mixtral spells its sparse block ``block_sparse_moe`` with experts ``w1/w3/w2``."""
        return self.model_type == "mixtral"

    def active_ffn_size(self, layer: int) -> int:
        """Intermediate features one token goes through in ``layer``'s feed-forward
        (``k x moe_intermediate_size`` in a sparse layer): what its FLOPs scale with."""
        if layer in self.moe_layers:
            return self.num_experts_per_tok * self.moe_intermediate_size
        return self.intermediate_size

    def to_hf_config(self) -> dict:
        """A ``config.json`` dict that transformers (4.x and 5.x) loads into the same model."""
        if self.model_type not in DEFAULT_ARCHITECTURES:
            raise ValueError(f"cannot write an HF config for model_type {self.model_type!r}")
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        # 5.x reads `rope_parameters`; 4.x reads `rope_theta` + `rope_scaling`. Both agree.
        cfg["rope_theta"] = self.rope_theta
        cfg["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        cfg["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        cfg.update(self._family_options())
        cfg.update(self._moe_options())
        return cfg

    def _moe_options(self) -> dict:
        if self.model_type == "mixtral":
            if self.moe_layers != tuple(range(self.num_layers)) or self.moe_intermediate_size != self.intermediate_size \
                    or not self.norm_topk_prob:
                raise ValueError("mixtral has sparse layers only, experts of intermediate_size and normalised routing")
            return {"num_local_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                    "router_jitter_noise": 0.0, "output_router_logits": False}
        if self.model_type == "qwen3_moe":
            return {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                    "moe_intermediate_size": self.moe_intermediate_size, "norm_topk_prob": self.norm_topk_prob,
                    "decoder_sparse_step": 1,
                    "mlp_only_layers": [i for i in range(self.num_layers) if i not in self.moe_layers],
                    "output_router_logits": False}
        if self.is_moe:
            raise ValueError(f"model_type {self.model_type!r} has no mixture-of-experts layers")
        return {}

    def _family_options(self) -> dict:
        """Config keys whose spelling differs between the four families."""
        if self.model_type == "qwen2":
            if not self.attention_bias or self.o_proj_bias:
                raise ValueError("qwen2 requires attention_bias=True and o_proj_bias=False")
            return {"use_sliding_window": False, "sliding_window": None}
        if self.attention_bias != self.o_proj_bias and self.model_type != "mistral":
            raise ValueError(f"{self.model_type} ties the q/k/v and o_proj biases to one attention_bias flag")
        if self.model_type in ("mistral", "mixtral"):
            if self.attention_bias or self.o_proj_bias or self.qk_norm:
                raise ValueError(f"{self.model_type} has no attention bias and no qk_norm")
            return {"sliding_window": self.sliding_window}
        if self.qk_norm != (self.model_type in ("qwen3", "qwen3_moe")):
            raise ValueError(f"qk_norm={self.qk_norm} does not match model_type {self.model_type!r}")
        options: dict[str, Any] = {"attention_bias": self.attention_bias}
        if self.model_type == "llama":
            options["mlp_bias"] = False
        else:
            options.update(use_sliding_window=False, sliding_window=None)
        return options

    def replace(self, **changes: Any) -> ModelArgs:
        """A copy with some fields changed (e.g. a smaller ``num_layers`` for tests)."""
        return dataclasses.replace(self, **changes)


def _read_moe(cfg: dict, model_type: str) -> dict:
    """The mixture-of-experts fields of a Mixtral / Qwen3-MoE config (empty for dense families)."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    # Absent keys take transformers' defaults (MixtralConfig: 8 experts, top-2; Qwen3MoeConfig:
    # 128 experts, top-8, 768 features, unnormalised routing, every layer sparse).
    num_layers = int(cfg["num_hidden_layers"])
    if model_type == "mixtral":
        return dict(num_experts=int(cfg.get("num_local_experts") or 8),
                    num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 2),
                    moe_intermediate_size=int(cfg["intermediate_size"]), norm_topk_prob=True,
                    moe_layers=tuple(range(num_layers)))
    # an explicit num_experts: 0 means dense MLPs (as transformers builds it), not the default 128
    named = cfg.get("num_experts", cfg.get("num_local_experts"))
    experts = 128 if named is None else int(named)
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    sparse = tuple(i for i in range(num_layers) if experts > 0 and i not in dense and (i + 1) % step == 0)
    return dict(num_experts=experts if sparse else 0, num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 8),
                moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 768),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=sparse)


def _check_unsupported_options(cfg: dict, model_type: str) -> None:
    """UserError for HF options that change the math in ways the native decoder does not implement."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"hidden_act {act!r} is not supported by the native decoder (only 'silu'); use GenericCausalLM")
    if cfg.get("mlp_bias"):
        raise UserError("mlp_bias=true is not supported by the native decoder; use GenericCausalLM")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and cfg.get("use_sliding_window"):
        raise UserError(
            f"{model_type} with use_sliding_window=true is not supported by the native decoder; use GenericCausalLM"
        )


def _read_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the 5.x `rope_parameters` or the 4.x keys."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    theta = float(theta or cfg.get("rope_theta") or 10000.0)
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1.0):
        raise UserError(f"partial_rotary_factor={factor} is not supported by the native decoder; use GenericCausalLM")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    scaling["rope_type"] = params.get("rope_type", params.get("type", "default"))
    # ModelArgs.__post_init__ validates the scaling and fills its defaults.
    return theta, None if scaling["rope_type"] == "default" else scaling


def normalize_rope_scaling(scaling: dict, max_position_embeddings: int) -> dict | None:
    """Check the rope type and fill the defaults HF fills, so the RoPE math needs no config."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))  # 4.x files say "type"
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"rope_type {rope_type!r} is not supported by the native decoder "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}); use GenericCausalLM"
        )
    if "factor" not in scaling:
        raise UserError(f"rope scaling {rope_type!r} needs a 'factor' in config.json")
    if rope_type in ("llama3", "yarn"):
        # HF falls back to max_position_embeddings when the pretraining length is absent.
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    if rope_type == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in scaling]
        if missing:
            raise UserError(f"rope scaling 'llama3' needs {missing} in config.json")
    return scaling
