"""spmd-rl: RL post-training for LLMs as one SPMD torchrun program."""

__version__ = "0.1.0"
