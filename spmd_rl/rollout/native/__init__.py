"""The native generation engine over the native decoder."""

from spmd_rl.rollout.native.engine import NativeEngine

__all__ = ["NativeEngine"]
