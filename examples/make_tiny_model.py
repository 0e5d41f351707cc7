"""Write the config.json of a small random-init Llama-family (or Qwen3-MoE) model next to a tokenizer.

    python examples/make_tiny_model.py --tokenizer runs/demo/init --out runs/demo/init
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spmd_rl.data.tokenizer import load_tokenizer
from spmd_rl.models import ModelArgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=0,
                        help="> 0: a Qwen3-MoE model with this many experts in every layer (default: dense Qwen2)")
    parser.add_argument("--experts-per-token", type=int, default=2)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    model_args = ModelArgs(
        architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=len(tokenizer),
        hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden_size // args.heads,
        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True, attention_bias=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if args.experts:  # each expert a quarter of the dense MLP's width
        model_args = model_args.replace(
            architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", attention_bias=False, qk_norm=True,
            num_experts=args.experts, num_experts_per_tok=args.experts_per_token,
            moe_intermediate_size=args.hidden_size, moe_layers=tuple(range(args.layers)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model_args.to_hf_config(), indent=2))
    experts = f", {model_args.num_experts} experts" if model_args.is_moe else ""
    print(f"wrote {out / 'config.json'} ({model_args.num_layers} layers, hidden {model_args.hidden_size}, "
          f"vocab {model_args.vocab_size}{experts})")


if __name__ == "__main__":
    main()
