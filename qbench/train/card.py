"""The model card (README.md) of a trained checkpoint."""
from __future__ import annotations

import json


def model_card(name: str, info: dict) -> str:
    data = info["data"]
    hashes = "\n".join(f"  - {k}: `{v}`" for k, v in data["hashes"].items())
    return f"""# {name}

qbench checkpoint trained by `qbench train --attention {info['attention']} --preset {info['preset']} --seed {info['seed']}`.

| field | value |
|---|---|
| attention arm | `{info['attention']}` |
| preset | `{info['preset']}` |
| task | {data['task']} on `{data['corpus']}` |
| seed | {info['seed']} |
| steps | {info['steps']} |
| training tokens | {info['tokens']:,} |
| final train loss (mean of last 50 steps) | {info['final_train_loss']:.4f} |
| final validation loss (32 fixed windows) | {info['final_val_loss']:.4f} |
| final validation perplexity | {info['final_val_ppl']:.2f} |
| wall time | {info['wall_seconds']:.0f} s on {info.get('device', str(info['torch_threads']) + ' CPU threads')} |
| precision | training autocast: {info.get('amp', 'none')}; weights stored as {info.get('stored_dtype', 'float32')} |

Data hashes (sha256 of the split's documents):
{hashes}

Recipe: `{json.dumps(info['recipe'])}`

The loss curve is in `train_log.csv`.
"""
