"""Decoder LM: `init_params`, `apply`, and the pluggable attention / linear layers."""
from effjax.model.attention import attention, attention_reference
from effjax.model.transformer import Transformer, apply, init_params, train_flops_per_token

__all__ = ["Transformer", "apply", "attention", "attention_reference", "init_params",
           "train_flops_per_token"]
