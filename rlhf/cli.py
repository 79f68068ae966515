"""The `rlhf` command: one sub-command per stage plus data tools.

User mistakes (bad config, bad data, missing paths) print one line and exit 2, no traceback.
This is the one module under rlhf/ that knows the stage registry (stages/__init__.py); it hands
the registry's entries to the pipeline and the Ray launcher.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from rlhf.errors import UserError

def _stage_parser(sub: argparse._SubParsersAction, name: str) -> None:
    from rlhf.config import describe
    from stages import STAGES

    stage = STAGES[name]
    epilog = "config keys (override any with key=value):\n" + "\n".join(describe(stage.config))
    description = stage.summary
    if name == "rm":
        description += ("\n\nAlso: rlhf rm score --model DIR --data FILE --out FILE (see rlhf rm score --help), and "
                        "rlhf rm eval --model DIR --data FILE (see rlhf rm eval --help).")
    parser = sub.add_parser(
        name,
        help=stage.summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config; repeat to layer several (later files win)")
    if name != "eval":  # one process, never on Ray
        parser.add_argument("--address", metavar="ADDRESS",
                            help="run on Ray and join this cluster: auto, HOST:PORT or ray://HOST:PORT "
                            "(same as ray.enabled=true ray.address=ADDRESS)")
    if name not in ("pipeline", "eval"):
        parser.add_argument("--overwrite", action="store_true",
                            help="train again into an output_dir that holds a finished run (same as overwrite=true)")
    if name == "pipeline":
        parser.add_argument("--from", dest="start_from", choices=("sft", "rm", "ppo"),
                            help="re-run from this stage on, even where the lineage says it is up to date")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Align language models with human feedback.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    from stages import STAGES

    for name in STAGES:
        _stage_parser(sub, name)

    data = sub.add_parser("data", help="Inspect data files; write the quickstart tasks; fetch HH-RLHF.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="action")
    inspect = data_sub.add_parser("inspect", help="Counts, token-length percentiles and truncation of a data file.")
    inspect.add_argument("file", help="JSONL/JSON/Parquet/CSV file, saved datasets dir, or hub id")
    inspect.add_argument("--kind", required=True, choices=("sft", "rank", "prompt", "pretrain"))
    inspect.add_argument("--tokenizer", help="tokenizer (model dir or hub id) to count tokens with; "
                         "without it, lengths are whitespace-separated words")
    inspect.add_argument("--max-length", type=int, default=512)
    inspect.add_argument("--split", default="train")
    inspect.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                         help="read canonical FIELD from COLUMN, e.g. prompt=question")
    inspect.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    synth = data_sub.add_parser("synth", help="Write a built-in task: the quickstart (SFT, ranked, prompt, pretraining "
                                "sets) or arithmetic (SFT and prompts with exact answers, for rewards from code).")
    synth.add_argument("--out", required=True, help="directory to write the .jsonl files into")
    synth.add_argument("--task", choices=("quickstart", "arithmetic"), default="quickstart")
    synth.add_argument("--seed", type=int, default=0)
    fetch = data_sub.add_parser("fetch", help="Download a public preference dataset and split it by prompt into the "
                                "files each stage reads (SFT, ranked, prompts, pretraining, held-out sets).")
    fetch.add_argument("dataset", choices=("hh-rlhf",), help="hh-rlhf: Anthropic/hh-rlhf from the Hugging Face hub")
    fetch.add_argument("--out", default="data/hh_rlhf", help="directory to write the .jsonl files and manifest.json")
    fetch.add_argument("--from", dest="source", metavar="FILE",
                       help="read a local copy (JSONL of {chosen, rejected} HH dialogues) instead of the hub")
    fetch.add_argument("--subset", default="harmless-base", help="the hub dataset's data_dir (default harmless-base)")
    fetch.add_argument("--split", default="train", help="the hub split to read (default train)")
    fetch.add_argument("--rows", type=int, help="read at most this many rows")
    fetch.add_argument("--seed", type=int, default=0, help="seed of the prompt shuffle that assigns files")

    generate = sub.add_parser("generate", help="Answer prompts with a trained model.")
    generate.add_argument("--model", required=True, help="model directory or hub id")
    generate.add_argument("--prompt", action="append", default=[], help="a user message; repeatable")
    generate.add_argument("--prompts", help="prompt-set file (any accepted prompt format)")
    generate.add_argument("--out", help="write JSONL rows {prompt, response} here instead of printing")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--seed", type=int, default=0)

    export = sub.add_parser("export", help="Copy a finished run's model with a model card; optionally push it to the hub.",
                            description="Copy the model of a finished run (weights, config and tokenizer files, byte "
                            "for byte) into DIR with a README.md model card: the stage and its hyper-parameters, the "
                            "chain of runs back to the base model, each data file's sha256 and rows from the lineage "
                            "(hashed at export for a run started without rlhf pipeline), the config without "
                            "secrets, the eval table and how to load it. DIR is written whole or "
                            "not at all.")
    export.add_argument("run_dir", metavar="RUN_DIR",
                        help="a stage's run directory (e.g. runs/quickstart/ppo, or the output_dir of `rlhf sft` run "
                        "directly), or a pipeline's output directory (e.g. runs/quickstart: its last stage is taken)")
    export.add_argument("--to", required=True, metavar="DIR", help="the directory to write (new or empty)")
    export.add_argument("--force", action="store_true", help="replace DIR when it holds something")
    export.add_argument("--push-to-hub", metavar="REPO",
                        help="then upload DIR to this hub model repository (owner/name), created if missing; the "
                        "token is huggingface_hub's usual one (HF_TOKEN or `hf auth login`)")
    export.add_argument("--private", action="store_true", help="create the hub repository private")

    from rlhf.plan import add_plan_parser

    add_plan_parser(sub)

    from rlhf.doctor import add_doctor_parser

    add_doctor_parser(sub)

    report = sub.add_parser("report", help="Plot runs' metrics (PNG) and write a Markdown summary.",
                            description="PNG plots and report.md from the metrics.jsonl of one or more runs: SFT "
                            "loss, RM accuracy, DPO loss / accuracy / margins, PPO and GRPO-style reward / KL / kl_coef "
                            "and diagnostics, group statistics, reward sources and their failures, and with several "
                            "PPO runs the reward-KL frontier. See docs/dashboards.md.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a stage's output directory, or a directory of them (e.g. runs/quickstart)")
    report.add_argument("--out", help="where to write the report (default: RUN_DIR/report for one run "
                        "directory, ./report for several)")
    return parser


def _run_stage(name: str, args: argparse.Namespace) -> None:
    from rlhf.config import load_config
    from stages import STAGES

    stage = STAGES[name]
    _prepare_process()
    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides += ["ray.enabled=true", f"ray.address={args.address}"]
    if getattr(args, "overwrite", False):
        overrides.append("overwrite=true")
    cfg = load_config(stage.config, args.config, overrides)
    if name == "pipeline":
        stage.main(cfg, start_from=args.start_from)
        return
    if name == "eval":
        stage.main(cfg)
        return
    from rlhf.distributed.env import detect_launch

    if cfg.ray.enabled and detect_launch().launcher != "none":
        raise UserError("ray.enabled=true under torchrun or the deepspeed launcher: use one of the two "
                        "(Ray starts its own workers)")
    if cfg.ray.enabled:
        from rlhf.ray.launch import run_stage_on_ray

        run_stage_on_ray(stage, cfg)
    else:
        stage.main(cfg)


def _prepare_process() -> None:
    """Process-wide settings of the `rlhf` program, made here at its start rather than as a
    side effect of importing a module: transformers imports deepspeed when it is installed,
    and telling DeepSpeed there is no GPU spares every command its warning on CPU machines."""
    from rlhf.distributed.env import prepare_deepspeed_import

    prepare_deepspeed_import()


def _columns(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--column {pair!r} must look like FIELD=COLUMN")
        field, column = pair.split("=", 1)
        out[field] = column
    return out


def _run_data(args: argparse.Namespace) -> None:
    if args.data_command == "synth":
        from rlhf.data import arithmetic, quickstart

        synthesize = {"quickstart": quickstart.synthesize, "arithmetic": arithmetic.synthesize}[args.task]
        for name, path in synthesize(args.out, seed=args.seed).items():
            print(f"{name}: {path}")
        return
    if args.data_command == "fetch":
        from rlhf.data import hh_rlhf

        written = hh_rlhf.fetch(args.out, source=args.source, subset=args.subset, split=args.split, rows=args.rows,
                                seed=args.seed)
        manifest = json.loads(open(written.pop("manifest"), encoding="utf-8").read())
        for name, path in written.items():
            print(f"{name}: {path} ({manifest['rows'][name]} rows)")
        dropped = manifest["dropped"]
        if any(dropped[key] for key in ("unreadable", "ties", "empty_chosen")):
            print(f"left out: {dropped['unreadable']} unreadable rows, {dropped['empty_chosen']} demonstrations with "
                  f"an empty answer, {dropped['ties']} ranked pairs with identical "
                  f"answers (manifest.json lists examples)")
        return
    from rlhf.config_sections import DataSourceConfig
    from rlhf.data.inspect import inspect_data

    if args.tokenizer:
        from rlhf.config_sections import ModelConfig
        from rlhf.models.loading import load_tokenizer

        tokenizer = load_tokenizer(ModelConfig(path=args.tokenizer))
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    else:
        count = lambda text: len(text.split())  # noqa: E731
    source = DataSourceConfig(path=args.file, split=args.split, columns=_columns(args.column))
    stats = inspect_data(args.kind, source, count, args.max_length, args.on_error)
    stats["length_unit"] = "tokens" if args.tokenizer else "words (pass --tokenizer for tokens)"
    if args.json:
        print(json.dumps(stats))
        return
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        print(f"{key:<{width}}  {value}")


def _run_report(args: argparse.Namespace) -> None:
    from rlhf.logging.report import make_report

    out = args.out or (f"{args.run_dirs[0]}/report" if len(args.run_dirs) == 1 else "report")
    report = make_report(args.run_dirs, out)
    print(report.text)
    print(f"\nwrote {len(report.images)} plots and {report.markdown}")


def _run_export(args: argparse.Namespace) -> int:
    from rlhf.sharing.export import export_run
    from rlhf.sharing.hub import PushError, push_to_hub
    from stages import STAGES

    if args.private and not args.push_to_hub:
        raise UserError("--private applies to --push-to-hub only")
    done = export_run(args.run_dir, args.to, force=args.force, hub_repo=args.push_to_hub, stages=STAGES)
    if done.located.picked:
        print(f"picked {done.located.picked}")
    print(f"exported {done.located.run.stage} ({done.located.run.dir}) to {done.directory}: {len(done.files)} files, "
          f"{done.bytes / 2**20:.1f} MiB, model card {done.directory / 'README.md'}")
    if args.push_to_hub:
        try:
            url = push_to_hub(done.directory, args.push_to_hub, args.private)
        except PushError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1  # the export stands; only the upload failed
        print(f"pushed to {url}")
    return 0


def _run_generate(args: argparse.Namespace) -> None:
    from rlhf.generate import generate_cli

    generate_cli(args)


def build_score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf rm score",
                                     description="Score every answer of a ranked data file with a reward model.")
    parser.add_argument("--out", required=True, help="JSONL file to write, one row per data row")
    return _add_rank_file_arguments(parser)


def _add_rank_file_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What `rlhf rm score` and `rlhf rm eval` both read: a reward model and a ranked file."""
    parser.add_argument("--model", required=True, help="reward-model directory (the model/ of an rm run)")
    parser.add_argument("--data", required=True, help="ranked data file (any accepted rank format)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    return parser


def _run_score(argv: Sequence[str]) -> None:
    from rlhf.scoring import score_file

    args = build_score_parser().parse_args(argv)
    summary = score_file(args.model, args.data, args.out, args.max_length, args.max_prompt_length,
                         args.on_error, args.batch_size)
    print(f"wrote scores of {summary['rows']} rows to {args.out}; pairwise accuracy {summary['accuracy']:.3f} "
          f"over {summary['pairs']} pairs" + (f"; {summary['skipped']} malformed rows skipped" if summary["skipped"] else ""))


def build_rm_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf rm eval",
                                     description="Held-out pairwise accuracy and mean margin of a reward model on a "
                                     "ranked data file: every pair of a row's K answers whose scores differ.")
    parser.add_argument("--out", help="also write the numbers as JSON here")
    return _add_rank_file_arguments(parser)


def _run_rm_eval(argv: Sequence[str]) -> None:
    from rlhf.files import write_text_atomic
    from rlhf.scoring import rank_accuracy

    args = build_rm_eval_parser().parse_args(argv)
    _prepare_process()
    summary = rank_accuracy(args.model, args.data, args.max_length, args.max_prompt_length, args.on_error,
                            args.batch_size)
    if args.out:
        write_text_atomic(args.out, json.dumps(summary, indent=1) + "\n")
    print(f"pairwise accuracy {summary['accuracy']:.4f} over {summary['pairs']} pairs of {summary['rows']} rows; "
          f"mean margin {summary['mean_margin']:.4f}" + (f"; {summary['skipped']} malformed rows skipped"
                                                         if summary["skipped"] else ""))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] in (["rm", "score"], ["rm", "eval"]):
        try:
            (_run_score if argv[1] == "score" else _run_rm_eval)(argv[2:])
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    parser = build_parser()
    # Overrides may follow options (`--from rm train.lr=1`), which argparse's positional
    # handling alone refuses: take every leftover key=value as an override.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from rlhf.training.stop import Interrupted, stop_on_signals

    try:
        if args.command not in ("data", "generate", "report", "plan", "doctor", "export"):
            with stop_on_signals():
                _run_stage(args.command, args)
        elif args.command == "data":
            _run_data(args)
        elif args.command == "generate":
            _run_generate(args)
        elif args.command == "report":
            _run_report(args)
        elif args.command == "export":
            return _run_export(args)
        elif args.command == "plan":
            from rlhf.config import STAGE_CONFIGS, load_config
            from rlhf.plan import run_plan

            cfg = load_config(STAGE_CONFIGS[args.stage], args.config, args.overrides)
            return run_plan(args, cfg)  # 0: fits, 3: does not fit
        elif args.command == "doctor":
            from rlhf.doctor import run_doctor
            from stages import STAGES

            _prepare_process()
            return run_doctor(args, STAGES)  # 0: nothing failed, 1: a check failed
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
