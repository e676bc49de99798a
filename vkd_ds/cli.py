"""The `vkd-ds` command: demo, train, prepare-data, eval, cache-teacher, fit-valence-head, export, report."""

from __future__ import annotations

import argparse
import sys

from vkd_ds.errors import EXIT_USER_ERROR, VkdError
from vkd_ds.launch import procs_for, run_launcher, select_accelerator, start_cache_teacher, start_training


def cmd_train(overrides: list[str]) -> int:
    select_accelerator()
    if "-m" in overrides or "--multirun" in overrides:
        # A sweep: every rank runs Hydra's jobs one after another inside one launch. The sweep
        # values cannot be composed here; each job checks its own config before it trains.
        from vkd_ds.config import compose

        fixed = [o for o in overrides if not o.startswith("-") and "," not in o.split("=", 1)[-1]]
        # Hydra's parser takes its flags before the overrides only.
        ordered = [o for o in overrides if o.startswith("-")] + [o for o in overrides if not o.startswith("-")]
        return run_launcher(ordered, procs_for(compose(fixed)))
    if any(arg.startswith("-") for arg in overrides):
        # Hydra's own flags (--cfg job, --help, ...) run in this process.
        from vkd_ds.launch import main

        sys.argv = ["vkd-ds train", *overrides]
        main()
        return 0
    return start_training(overrides)


def cmd_eval(argv: list[str]) -> int:
    """`vkd-ds eval RUN_DIR [key=value ...]`: a run's latest checkpoint, with the run's own config;
    `vkd-ds eval [hydra overrides]` (no RUN_DIR): e.g. an exported model as student.path."""
    select_accelerator()
    from pathlib import Path

    from vkd_ds.config import check_global_batch, compose
    from vkd_ds.launch import CONFIG_FILE_FLAG, config_from_file

    if argv and "=" not in argv[0]:
        run_dir = Path(argv[0])
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise VkdError(f"eval: {run_dir} has no config.yaml (not a vkd-ds run directory)")
        overrides = [f"run.dir={run_dir.resolve()}", *argv[1:], "eval_only=true", "resume=auto"]
        cfg = config_from_file(str(saved), overrides)
        launch_args = [CONFIG_FILE_FLAG, str(saved.resolve()), *overrides]
    else:
        overrides = [*argv, "eval_only=true"]
        cfg = compose(overrides)
        launch_args = overrides
    from vkd_ds.settings import Settings

    Settings.from_config(cfg)  # every check, before any process starts
    num_procs = procs_for(cfg)
    check_global_batch(cfg, num_procs)
    return run_launcher(launch_args, num_procs)


def cmd_prepare_data(overrides: list[str]) -> int:
    """`vkd-ds prepare-data [hydra overrides]`: tokenize data.train_path (and data.valid_path) into
    token stores under data.store_dir, or find them there; prints where each store is."""
    from vkd_ds.config import compose
    from vkd_ds.models import load_tokenizer
    from vkd_ds.settings import DataSettings, build_section
    from vkd_ds.token_store import open_splits

    cfg = compose(overrides)
    data = build_section(DataSettings, cfg, "data")
    if not data.tokenizer_path:
        raise VkdError(
            "config key `data.tokenizer_path` is required (set it, or teacher.path, whose tokenizer it defaults to)"
        )
    tokenizer = load_tokenizer(data.tokenizer_path)
    for split, (_, rows) in open_splits(data, tokenizer).items():
        print(rows.summary(split), flush=True)
        for note in rows.notes():
            print(f"note: {note}", flush=True)
    return 0


def cmd_fit_valence_head(overrides: list[str]) -> int:
    from vkd_ds.config import compose
    from vkd_ds.fit_head import fit_valence_head

    fit_valence_head(compose(overrides))
    return 0


def cmd_export(args) -> int:
    from vkd_ds.export import export

    out = export(args.run_dir, args.out_dir, args.checkpoint)
    print(f"exported {out}")
    return 0


def cmd_report(args) -> int:
    from vkd_ds.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0


def cmd_demo(args) -> int:
    select_accelerator()
    from vkd_ds.demo import run_demo

    run_demo(args.out, quick=args.quick, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vkd-ds", description="Valence-weighted knowledge distillation on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the embedded default job: build assets offline, distill, compare")
    demo.add_argument("--out", default="vkd-demo", help="output directory (default: ./vkd-demo)")
    demo.add_argument("--quick", action="store_true", help="smaller models and fewer steps (about 3 minutes)")
    demo.add_argument(
        "overrides",
        nargs="*",
        help="hydra overrides for the distillation run, e.g. loss.seq=0 (the CE-only baseline keeps its own)",
    )
    train = sub.add_parser(
        "train", help="distill with the deepspeed launcher: vkd-ds train [hydra overrides]", add_help=False
    )
    train.add_argument("overrides", nargs=argparse.REMAINDER)
    sub.add_parser(
        "cache-teacher",
        help="store the teacher's top-k log-probs, entropy and valence for training with teacher.cache=DIR: "
        "vkd-ds cache-teacher cache.dir=DIR [hydra overrides]",
        add_help=False,
    )
    sub.add_parser(
        "prepare-data",
        help="tokenize data.train_path/valid_path once into token stores (train does it when needed): "
        "vkd-ds prepare-data data.tokenizer_path=DIR data.train_path=... [data.store_dir=DIR]",
        add_help=False,
    )
    fit = sub.add_parser(
        "fit-valence-head",
        help="fit the teacher's valence head (teacher frozen): vkd-ds fit-valence-head [hydra overrides]",
        add_help=False,
    )
    fit.add_argument("overrides", nargs=argparse.REMAINDER)
    evaluate = sub.add_parser(
        "eval",
        help="held-out perplexity, KL to the teacher, valence MSE, top-1 agreement: "
        "vkd-ds eval RUN_DIR [key=value ...] | vkd-ds eval [hydra overrides]",
        add_help=False,
    )
    evaluate.add_argument("overrides", nargs=argparse.REMAINDER)
    export = sub.add_parser("export", help="write a run's latest checkpoint as a Hugging Face directory")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the latest complete)")
    report = sub.add_parser("report", help="a Markdown report with PNG plots of a run's metrics")
    report.add_argument("run_dir")
    report.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train"]:
            # Everything after `train` belongs to Hydra, flags such as --cfg job included.
            return cmd_train(argv[1:])
        if argv[:1] == ["eval"]:
            return cmd_eval(argv[1:])
        if argv[:1] == ["cache-teacher"]:
            return start_cache_teacher(argv[1:])
        if argv[:1] == ["prepare-data"]:
            return cmd_prepare_data(argv[1:])
        if argv[:1] == ["fit-valence-head"]:
            return cmd_fit_valence_head(argv[1:])
        args = build_parser().parse_args(argv)
        commands = {"export": cmd_export, "report": cmd_report, "demo": cmd_demo}
        return commands[args.command](args)
    except VkdError as err:
        print(f"vkd-ds: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
