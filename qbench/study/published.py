"""Published numbers the study compares with (for direction, not equality at our scale)."""
from __future__ import annotations

PUBLISHED = """| source | model | arm | FP ppl | W8A8 ppl | max inf-norm | avg kurtosis |
|---|---|---|---:|---:|---:|---:|
| Bondarenko T2 | OPT-125m | vanilla | 15.84 | 21.18 | 340 | 1778 |
| Bondarenko T2 | OPT-125m | gated (pi_init 0.25) | 15.55 | 16.02 | 8.7 | 18.9 |
| Bondarenko T2 | OPT-125m | clipped softmax | 16.29 | 37.20 | 63.2 | 19728 |
| VGA T2 | OPT-125m | vanilla | 15.95 | 43.78 | 658 (int8) | 6548 (int8) |
| VGA T2 | OPT-125m | IGA | 15.65 | 16.77 | 102 (int8) | 95 (int8) |
| VGA T2 | OPT-125m | VGA | 15.49 | 16.42 | 100 (int8) | 18.3 (int8) |"""


# Guo et al. (2024), Fig. 2/3: the 1-layer softmax model at their recipe (10,000 steps x 512)
# ends with nearly all non-trigger attention on BOS and a BOS value norm near zero (read off
# their curves: approximate values, for direction).
GUO_PUBLISHED = {"arm": "softmax (Guo et al., published)", "seeds": "-", "step": 10000, "attn_s": "~1",
                 "val_s": "-", "val_s_ratio": "~0", "val_s_eff_ratio": "-", "delta_logit_s": "large (> 0)",
                 "gate_bos": "-", "gate_others": "-"}

# Bondarenko et al. 2023, Table 2: vanilla OPT-125m, the outliers W8A8 cannot span.
OPT_VANILLA_INF_NORM = 340
