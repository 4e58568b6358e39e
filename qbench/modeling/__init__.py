"""qbench's model family, registered with transformers' Auto classes on import."""
from transformers import AutoConfig, AutoModelForCausalLM

from qbench.modeling.attention import ATTENTION_ARMS, AttentionArm
from qbench.modeling.config import QBenchConfig
from qbench.modeling.model import QBenchForCausalLM, QBenchModel

AutoConfig.register("qbench", QBenchConfig, exist_ok=True)
AutoModelForCausalLM.register(QBenchConfig, QBenchForCausalLM, exist_ok=True)

__all__ = ["ATTENTION_ARMS", "AttentionArm", "QBenchConfig", "QBenchForCausalLM", "QBenchModel"]
