"""Decoder LM: parameters, the one transformer layer (`block`) and the training forward.

    params = model.init_params(cfg.model, jax.random.key(0))
    logits_BTV = model.forward(cfg.model, params, tokens_BT)
"""
from effjax.model.layers import (apply_rope, model_rope_tables, rms_norm, rope_tables,
                                 yarn_attention_scale, yarn_inv_freq)
from effjax.model.linear import LINEARS, Linear, make_linear
from effjax.model.transformer import (CausalSelfAttention, block, embed, final_hidden, forward,
                                      init_params, layer_params, logits, run_layers,
                                      train_flops_per_token)

__all__ = ["CausalSelfAttention", "LINEARS", "Linear", "apply_rope", "block", "embed",
           "final_hidden", "forward", "init_params", "layer_params", "logits", "make_linear",
           "model_rope_tables", "rms_norm", "rope_tables", "run_layers", "train_flops_per_token",
           "yarn_attention_scale", "yarn_inv_freq"]
