"""The configuration of qbench's decoder-only language model family."""
from __future__ import annotations

import math

from transformers import PretrainedConfig


class QBenchConfig(PretrainedConfig):
    """GPT-2/OPT-like pre-LN decoder; only `attention` (the arm) varies between zoo models."""

    model_type = "qbench"

    def __init__(
        self,
        vocab_size: int = 4096,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 256,
        d_ff: int = 1024,
        max_position_embeddings: int = 256,
        attention: str = "softmax",
        gate_init: float | None = None,
        gate_granularity: str = "head",
        clip_alpha: float = 4.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        **kwargs,
    ):
        from qbench.modeling.attention import ATTENTION_ARMS  # local: avoids an import cycle

        if attention not in ATTENTION_ARMS:
            raise ValueError(
                f"unknown attention arm {attention!r}; choose one of {sorted(ATTENTION_ARMS)}"
            )
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        if gate_granularity not in ("head", "element"):
            raise ValueError(f"gate_granularity must be 'head' or 'element', got {gate_granularity!r}")
        if gate_init is None:  # the arm's default (ungated arms keep 0.5, unused)
            gate_init = ATTENTION_ARMS[attention].gate_init or 0.5
        if not 0.0 < gate_init < 1.0:
            raise ValueError(f"gate_init is a sigmoid value and must lie in (0, 1), got {gate_init}")
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.d_ff = d_ff
        self.max_position_embeddings = max_position_embeddings
        self.attention = attention
        self.gate_init = float(gate_init)
        self.gate_granularity = gate_granularity
        self.clip_alpha = clip_alpha
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        # Names transformers' generic code (and lm-eval) look for.
        self.hidden_size = d_model
        self.num_hidden_layers = n_layer
        self.num_attention_heads = n_head
        kwargs.pop("tie_word_embeddings", None)  # the LM head is never tied
        super().__init__(
            vocab_size=vocab_size,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=False,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def gate_bias_init(self) -> float:
        """logit(gate_init): the gate bias that opens every gate to gate_init at step 0."""
        return math.log(self.gate_init / (1.0 - self.gate_init))
