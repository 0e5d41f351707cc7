"""megatron-core backend: our ``ModelArgs`` as TransformerConfig/GPTModel arguments, HF <->
GPTModel state-dict conversion with tensor/pipeline sharding, and a lazily imported builder.

``config`` and ``names`` are pure and run anywhere. ``backend`` builds a rank's GPTModel stage,
``policy`` computes logprobs and the PPO update over the stages (``schedule``: 1F1B over the
pipeline group; ``grads``: dp sum, tied-embedding sync, global norm), and ``cpu`` lets all of it
run on CPU/gloo. megatron.core is only imported inside functions. Targets megatron-core
>=0.12,<0.17 (see ``backend.MEGATRON_CORE_VERSIONS``); the CPU tests ran 0.16.1.
"""

from spmd_rl.models.megatron.config import gpt_model_kwargs, padded_vocab_size, transformer_config_kwargs
from spmd_rl.models.megatron.names import (
    gather_tp_shards,
    hf_to_mcore,
    iter_hf_weights_from_mcore_shards,
    layers_for_pp_stage,
    mcore_to_hf,
    select_pp_stage,
    shard_for_tp,
)

__all__ = [
    "gather_tp_shards",
    "gpt_model_kwargs",
    "hf_to_mcore",
    "iter_hf_weights_from_mcore_shards",
    "layers_for_pp_stage",
    "mcore_to_hf",
    "padded_vocab_size",
    "select_pp_stage",
    "shard_for_tp",
    "transformer_config_kwargs",
]
