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
    from qbench.cli_parser import build_parser as parser_for

    return parser_for({
        "bench": _cmd_bench,
        "compare": _cmd_compare,
        "list": _cmd_list,
        "migrate": _cmd_migrate,
        "recheck": _cmd_recheck,
        "report": _cmd_report,
        "retrofit": _cmd_retrofit,
        "sensitivity": _cmd_sensitivity,
        "study": _cmd_study,
        "sweep": _cmd_sweep,
        "train": _cmd_train,
        "zoo": _cmd_zoo,
    }, __doc__)


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
