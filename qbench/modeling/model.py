"""The qbench causal LM: GPT-2/OPT-like pre-LN decoder whose attention arm is a config field.

Read top to bottom: embeddings -> n_layer x (x + attn(norm(x)); x + mlp(norm(x))) ->
final norm -> LM head.  Shapes in comments: B batch, T tokens, d model width, H heads,
D head width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from qbench.modeling.attention import ATTENTION_ARMS
from qbench.modeling.compose import Gate, compose, gate_values
from qbench.modeling.config import QBenchConfig


class GateLinear(nn.Linear):
    """A gate's Linear layer; a type of its own so init (bias = logit(gate_init)) and
    quantizers (gates stay full precision unless asked) can tell it apart."""


class HeadwiseGate(nn.Module):
    """IGA's per-head Linear(d_head -> 1 or d_head) gate on the head's slice of the input."""

    def __init__(self, n_head: int, head_dim: int, out_per_head: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_head, head_dim, out_per_head))
        self.bias = nn.Parameter(torch.zeros(n_head, out_per_head))

    def forward(self, x_heads: torch.Tensor) -> torch.Tensor:
        # x_heads (B, H, T, D) -> logits (B, H, T, out_per_head)
        return torch.einsum("bhtd,hdo->bhto", x_heads, self.weight) + self.bias[None, :, None, :]


class QBenchAttention(nn.Module):
    """One attention layer; what it computes is `config.attention`'s arm (normaliser and
    gate, qbench.modeling.attention).  Quantizers, kernels and probes attach through
    `qbench_hooks` / `qbench_kernel` (qbench.modeling.hooks)."""

    def __init__(self, config: QBenchConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.arm = ATTENTION_ARMS[config.attention]
        self.clip_alpha = config.clip_alpha  # read by the clipped-softmax normaliser only
        # sigmoid attention's bias b = -log(n), n the context length (a constant, not a weight)
        self.sigmoid_bias = -math.log(config.max_position_embeddings)
        for parameter in self.arm.parameters:  # what the normaliser reads (sink_logit's per-head logit)
            setattr(self, parameter.name, parameter.create(config, parameter.init))
        d = config.d_model
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        per_head = 1 if config.gate_granularity == "head" else self.head_dim
        if self.arm.gate_source in ("value", "input"):
            self.gate_proj = GateLinear(d, self.n_head * per_head)
        elif self.arm.gate_source == "input_head":
            self.gate_proj = HeadwiseGate(self.n_head, self.head_dim, per_head)
        self.qbench_hooks = None  # AttentionHooks: quantizers / probes; None = fused path
        self.qbench_kernel = None  # AttentionKernel: replaces the float attention when set
        self.qbench_kv = None  # KV cache quantizer: keys and values as the cache holds them

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, d) -> (B, H, T, D)
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)

    def gate_of(self, x: torch.Tensor) -> Gate | None:
        """The arm's sigmoid gate for input x (B, T, d), computed by the composition from
        the value projection (as the cache or kernel holds it) or from x; None if ungated."""
        return None if self.arm.gate_source is None else Gate(self.gate_proj, self.layer_idx, x=x)

    def gate(self, x: torch.Tensor, v_full: torch.Tensor, notify: bool = True) -> torch.Tensor | None:
        """The gate (B, H, T, 1 | D) from x and the value projection `v_full` (B, T, d)."""
        gate = self.gate_of(x)
        return None if gate is None else gate_values(self.arm, gate, v_full, self.n_head, hooks=self.qbench_hooks,
                                                     notify=notify)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # x: the normed attention input (B, T, d)
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        context = compose(self.arm, q, k, v, gate=self.gate_of(x), module=self, hooks=self.qbench_hooks,
                          kernel=self.qbench_kernel, kv=self.qbench_kv)
        return self.o_proj(context.transpose(1, 2).reshape(b, t, d))  # context (B, H, T, D)


class QBenchMLP(nn.Module):
    def __init__(self, config: QBenchConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class QBenchBlock(nn.Module):
    def __init__(self, config: QBenchConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = QBenchAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = QBenchMLP(config)
        # Identity unless a quantizer (Bondarenko's protocol quantizes residual sums) or a
        # probe replaces them; they hold no weights.
        self.attn_residual = nn.Identity()
        self.mlp_residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_residual(x + self.attn(self.attn_norm(x)))
        return self.mlp_residual(x + self.mlp(self.mlp_norm(x)))


class QBenchPreTrainedModel(PreTrainedModel):
    config_class = QBenchConfig
    base_model_prefix = "model"
    _no_split_modules = ["QBenchBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (GateLinear, HeadwiseGate)):
            # The gate opens to gate_init at step 0.
            module.weight.normal_(0.0, std)
            module.bias.fill_(self.config.gate_bias_init)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, QBenchAttention):
            for parameter in module.arm.parameters:
                getattr(module, parameter.name).fill_(parameter.init)


class QBenchModel(QBenchPreTrainedModel):
    def __init__(self, config: QBenchConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList(QBenchBlock(config, i) for i in range(config.n_layer))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.embed_sum = nn.Identity()  # the first residual sum (tokens + positions)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {t} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; evaluate in windows of at most that length"
            )
        positions = torch.arange(t, device=input_ids.device)
        x = self.embed_sum(self.embed_tokens(input_ids) + self.embed_positions(positions))  # (B, T, d)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


class QBenchForCausalLM(QBenchPreTrainedModel):
    def __init__(self, config: QBenchConfig):
        super().__init__(config)
        self.model = QBenchModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        if attention_mask is not None and not bool((attention_mask.cummin(dim=-1).values == attention_mask).all()):
            # Causal attention already hides right padding from real tokens; left padding
            # would shift positions and needs a mask this model does not implement.
            raise ValueError("qbench models support right padding only (attention_mask must be 1...1 0...0)")
        logits = self.lm_head(self.model(input_ids))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutput(loss=loss, logits=logits)

