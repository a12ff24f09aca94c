"""``lookahead-ray``: one entry point, one subcommand per pipeline stage.

Every subcommand is ``load_config -> library function(cfg)``; tests call the library functions directly.
Config subcommands take ``--config FILE`` plus ``dotted.key=value`` overrides. A :class:`LookaheadError` (or a
missing file) is the user's to fix: one line on stderr, exit 2. Anything else is a bug and keeps its
traceback (its last lines on stderr, all of it in the run's log file, see ``console``); ``-v`` shows the
traceback always and Ray's and the libraries' output on the console.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from lookahead_ray import console
from lookahead_ray.config import LookaheadConfig, load_config
from lookahead_ray.errors import ConfigError, LookaheadError, fixable_os_error, os_error_line


def _add_config_args(parser: argparse.ArgumentParser, example: str = "preview.mode=virtual data.on_error=skip") -> None:
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")


def _preview_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="apply the LookAhead preview to one file (drop-in for the reference main.py)",
                       description="Flags match zjunlp/LookAheadTuning main.py; output is byte-identical to it. "
                                   "Extensions: --mode vanilla, parquet in/out, --config, --workers.")
    # Defaults are None so a --config file can supply them; the reference's defaults apply otherwise.
    p.add_argument("--input_file", required=True)
    p.add_argument("--output_file", required=True)
    p.add_argument("--input_format", choices=["json", "jsonl", "parquet"], required=True)
    p.add_argument("--output_format", choices=["json", "jsonl", "parquet"], required=True)
    p.add_argument("--input_field", help="instruction field (default: input)")
    p.add_argument("--output_field", help="answer field (default: output)")
    p.add_argument("--mode", choices=["vanilla", "real", "virtual"], help="required unless --config sets it")
    p.add_argument("--tokenizer_path", help="tokenizer directory or Hub id (real mode)")
    p.add_argument("--m", type=int, help="answer tokens previewed in real mode (default: 6)")
    p.add_argument("--P", help="virtual prefix (default: \"Let's solve this problem. \")")
    p.add_argument("--connector", help="default: \" The answer begins with: \"")
    p.add_argument("--config", help="YAML config supplying preview/records/model settings")
    p.add_argument("--workers", type=int, help="processes to spread chunks over, order kept (default: one per core "
                                                "for inputs over 16 MiB, else 1)")


def _preview_config(args: argparse.Namespace) -> LookaheadConfig:
    cfg = load_config(args.config) if args.config else LookaheadConfig()
    if args.mode is None and not args.config:
        raise ConfigError("--mode is required (real, virtual or vanilla)")
    preview = cfg.preview
    for flag, name in (("mode", "mode"), ("m", "num_answer_tokens"), ("P", "virtual_prefix"),
                       ("connector", "connector")):
        if getattr(args, flag) is not None:
            preview = replace(preview, **{name: getattr(args, flag)})
    records = cfg.records
    if args.input_field is not None:
        records = replace(records, instruction_field=args.input_field)
    if args.output_field is not None:
        records = replace(records, answer_field=args.output_field)
    model = replace(cfg.model, tokenizer=args.tokenizer_path) if args.tokenizer_path else cfg.model
    if preview.mode == "real" and not (model.tokenizer or model.name_or_path):
        raise ConfigError("--tokenizer_path is required for real mode (or model.tokenizer / model.name_or_path "
                          "in --config)")
    return replace(cfg, preview=preview, records=records, model=model)


def cmd_preview(args: argparse.Namespace) -> int:
    from lookahead_ray.data.preview_file import run_preview_file

    cfg = _preview_config(args)
    stats = run_preview_file(cfg, args.input_file, args.output_file, args.input_format, args.output_format,
                             workers=args.workers)
    print(f"Processing complete. {stats.rows} records ({cfg.preview.mode} mode) saved to '{stats.output_file}' "
          f"in {args.output_format.upper()} format.")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from lookahead_ray.data.pipeline import run_prepare

    cfg = load_config(args.config, args.overrides)
    report = run_prepare(cfg)  # starts (or joins) Ray once the config and the output are checked
    console.summary([report.summary(), f"report: {report.output_dir}/prepare_report.json"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lookahead_ray.train.execute import run_training, run_training_local

    overrides = list(args.overrides) + ([f"train.output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        return _dry_run(cfg, args.strict)
    result = run_training_local(cfg) if args.local else run_training(cfg)
    if result.already_finished:
        print(f"train: run {cfg.train.run_name!r} already finished with these settings; nothing to do")
    keys = ("step", "loss", "tokens_per_second", "export_max_abs_logit_diff")
    m = result.metrics
    adapter = f"{result.final_dir}/adapter" if cfg.train.lora is not None and cfg.train.lora.merge else result.final_dir
    lora = ([f"LoRA: {m['trainable_parameters']:,} parameters trained ({100 * m['trainable_share']:.2f}%); the adapter "
             f"alone: {adapter}"] if cfg.train.lora is not None and "trainable_share" in m else [])
    console.summary(["train: " + ", ".join(f"{k}={m[k]:.4g}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}"
                                           for k in keys),
                     f"model (Hugging Face): {result.final_dir}", *lora, f"checkpoint: {result.checkpoint_dir}"])
    return 0


def _dry_run(cfg: LookaheadConfig, strict: bool) -> int:
    import json

    from lookahead_ray.train.plan import dry_run

    report = dry_run(cfg)
    print(f"DeepSpeed config for {cfg.train.num_workers} worker(s):")
    print(json.dumps(report.deepspeed_config, indent=2))
    print("\n".join(report.lines()))
    passed = report.passed(strict)
    print(f"train --dry-run: {'passed' if passed else 'FAILED'}" + (" (--strict: warnings fail)" if strict else ""))
    return 0 if passed else 2


def cmd_export(args: argparse.Namespace) -> int:
    import yaml

    from lookahead_ray import storage
    from lookahead_ray.train.export import export_checkpoint
    from lookahead_ray.train.layout import CONFIG_FILE, FINAL_DIR

    output_dir = args.output_dir
    config_file = storage.join(storage.absolute(args.checkpoint), CONFIG_FILE)
    if not storage.is_file(config_file):
        raise FileNotFoundError(f"{args.checkpoint} is not a lookahead-ray checkpoint (no {CONFIG_FILE})")
    if output_dir is None:
        output_dir = LookaheadConfig.from_dict(yaml.safe_load(storage.read_text(config_file)), config_file).stage_dir(
            "train")
        if output_dir is None:
            raise ConfigError("export: the checkpoint's config names no train directory; use --output-dir")
    final = storage.join(storage.absolute(output_dir), FINAL_DIR)
    # A checkpoint in an object store is read from this node's cached copy.
    check = export_checkpoint(storage.local_copy(args.checkpoint, "checkpoints"), final)
    detail = (f" (logit check passed: relative difference {check['export_relative_logit_diff']:.3g}, argmax "
              f"agreement {check['export_argmax_agreement']:.3f})" if check else " (no probe logits to check)")
    print(f"export: {final}{detail}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from lookahead_ray.tune.results import best_lines
    from lookahead_ray.tune.search import run_search

    overrides = list(args.overrides) + ([f"tune.output_dir={args.output_dir}"] if args.output_dir else [])
    result = run_search(load_config(args.config, overrides), resume=args.resume)
    done = [t for t in result.trials if t.get("objective") is not None]
    console.summary([f"tune: {len(done)} of {len(result.trials)} trials finished; trials.md, trials.csv, pareto.png"
                     + (" and best.yaml" if result.best_config else "") + f" in {result.search_dir}"]
                    + [f"tune: {line}" for line in best_lines(result.trials, result.rank_by)])
    return 0 if done else 2


def cmd_eval(args: argparse.Namespace) -> int:
    from lookahead_ray.eval.report import report_table
    from lookahead_ray.eval.runner import parse_model_args, run_eval

    overrides = list(args.overrides) + ([f"eval.output_dir={args.output_dir}"] if args.output_dir else []) + (
        [f"eval.base_model={args.base}"] if args.base else [])
    cfg = load_config(args.config, overrides)
    results = run_eval(cfg, parse_model_args(args.model))
    print(report_table(results))
    console.summary([f"eval: results.json, samples.jsonl and report.md in {cfg.stage_dir('eval')}"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lookahead_ray.demo.run import demo_summary, run_demo, run_demo_seeds

    if args.search and args.lora:
        raise ConfigError("demo: --lora applies without --search; a search trains LoRA adapters with "
                          "tune.lora_ranks=[...]")
    if args.search and args.methods:
        raise ConfigError("demo: --methods applies without --search; a search compares methods with "
                          "tune.methods=[...]")
    if args.search:
        from lookahead_ray.demo.search import run_demo_search
        from lookahead_ray.tune.results import best_lines

        result = run_demo_search(args.output_dir, quick=args.quick, seed=args.seed, overrides=args.overrides,
                                 world=args.world)
        done = [t for t in result.trials if t.get("objective") is not None]
        console.summary([f"demo --search: {len(done)} of {len(result.trials)} trials finished; trials.md and "
                         f"pareto.png in {result.search_dir}"] + [f"demo --search: {line}" for line in best_lines(
                             result.trials, result.rank_by)])
        return 0 if done else 2
    from lookahead_ray.config import parse_overrides
    from lookahead_ray.demo.run import EVAL_ENGINE_KEYS

    overrides = parse_overrides(args.overrides)
    engine = {key: value for key, value in overrides.items() if key.startswith(EVAL_ENGINE_KEYS)}
    if any(not key.startswith("world.") for key in overrides.keys() - engine.keys()):
        raise ConfigError("demo: only world.<ingredient>=value and eval.engine (eval.server.*, ...) overrides apply "
                          "without --search (e.g. world.hint_records=0); other keys configure the search: add --search")
    world_overrides = {key.removeprefix("world."): value for key, value in overrides.items() if key not in engine}
    options = {"quick": args.quick, "m": args.m, "virtual_prefix": args.P, "world": args.world,
               "world_overrides": world_overrides, "engine_overrides": engine, "lora": args.lora,
               "methods": _method_list(args.methods)}
    if args.seeds:
        seeds = _seed_list(args.seeds)
        summary = run_demo_seeds(args.output_dir, seeds, **options)
        console.summary([f"report: {Path(args.output_dir).resolve() / 'report.md'} (mean [min-max] over world seeds "
                         f"{', '.join(map(str, seeds))}; each seed's own report in seed-N/)"])
        return 0 if summary["aggregate"] else 2
    results = run_demo(args.output_dir, seed=args.seed, **options)
    console.summary(demo_summary(results, Path(args.output_dir).resolve()))
    return 0


def _method_list(text: str | None) -> list[str] | None:
    """--methods: "all", or comma-separated method names (``lookahead_ray.methods``, combined with '+')."""
    from lookahead_ray.methods import METHODS, method_parts

    if not text:
        return None
    names = list(METHODS) if text.strip() == "all" else [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        method_parts(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"demo --methods: {text!r} names a method twice")
    return names


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"demo --seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"demo --seeds: expected distinct integers such as 0,1,2, got {text!r}")
    return seeds


def cmd_submit(args: argparse.Namespace) -> int:
    import importlib.metadata
    import os

    from lookahead_ray.errors import JobError
    from lookahead_ray.jobs import runtime_env as env
    from lookahead_ray.jobs.submit import SubmitRequest, connect, follow, last_lines, submit

    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    if not command or command[0] not in COMMANDS or command[0] in ("submit", "jobs"):
        raise JobError("give the command to run after --, e.g. lookahead-ray submit -- train --config configs/x.yaml")
    working_dir = Path(args.working_dir).resolve()
    env.check_config_paths(command, working_dir)
    packages = ([] if args.no_pip else env.read_requirements(args.requirements) if args.requirements
                else env.project_requirements(importlib.metadata.requires("lookahead-ray") or []))
    scan = env.check_upload(working_dir, args.exclude)
    for path, size in scan.large_files:
        print(f"submit: warning: uploading {path} ({size / 2**20:.0f} MiB); exclude it (--exclude) or move it to "
              "shared storage", file=sys.stderr)
    runtime_env = env.build_runtime_env(working_dir, packages, use_uv=args.uv, excludes=args.exclude,
                                        env_vars=env.passed_env_vars(args.env, os.environ))
    client = connect(args.address)
    job_id = submit(client, SubmitRequest(command, runtime_env, args.submission_id, args.num_cpus, args.num_gpus))
    print(f"submit: job {job_id} on {client.get_address()} ({scan.files} files, {scan.total_bytes / 2**20:.1f} MiB "
          f"uploaded); dashboard: {client.get_address()}/#/jobs/{job_id}", flush=True)
    if args.no_wait:
        print(f"submit: follow it with: lookahead-ray jobs logs {job_id} --follow")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        if args.stop_on_interrupt:
            client.stop_job(job_id)
            print(f"\nsubmit: stopping job {job_id}", file=sys.stderr)
        else:
            print(f"\nsubmit: detached; job {job_id} keeps running. Reattach: lookahead-ray jobs logs {job_id} "
                  f"--follow; stop it: lookahead-ray jobs stop {job_id}", file=sys.stderr)
        return 130
    return _job_exit(client, job_id, status, last_lines)


def _job_exit(client, job_id: str, status: str, last_lines) -> int:
    if status == "SUCCEEDED":
        print(f"job {job_id}: SUCCEEDED")
        return 0
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status}{': ' + info.message if info.message else ''}", file=sys.stderr)
    if status == "FAILED":
        print("last log lines:\n  " + "\n  ".join(last_lines(client, job_id)), file=sys.stderr)
    return 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from lookahead_ray.errors import JobError
    from lookahead_ray.jobs.submit import connect, follow, job_rows, last_lines

    if args.action != "list" and not args.job_id:
        raise JobError(f"jobs {args.action} needs a JOB_ID (see lookahead-ray jobs list)")
    client = connect(args.address)
    if args.action == "list":
        print("\n".join(job_rows(client.list_jobs())) or "no jobs")
    elif args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status.value}{': ' + info.message if info.message else ''}")
    elif args.action == "logs" and args.follow:
        return _job_exit(client, args.job_id, follow(client, args.job_id), last_lines)
    elif args.action == "logs":
        print(client.get_job_logs(args.job_id), end="")
    else:
        stopped = client.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'already ended'}")
    return 0


def _cluster_parsers(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser("submit", help="run a lookahead-ray command as a Ray job on a cluster (Ray Jobs SDK)",
                            description="lookahead-ray submit [options] -- train --config configs/x.yaml ...")
    submit.add_argument("--address", help="the dashboard, http://HEAD:8265 (default: RAY_ADDRESS, else local)")
    submit.add_argument("--working-dir", default=".", help="uploaded to the cluster; the job runs in it (default: .)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="also leave out of the upload (gitignore-style; .git, venvs, out/, weights are already)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="pass this environment variable to the job (none are passed unless named)")
    submit.add_argument("--requirements", help="pip requirements for the job instead of the project's dependencies")
    submit.add_argument("--no-pip", action="store_true", help="install nothing: the image has every dependency")
    submit.add_argument("--uv", action="store_true", help="install with uv instead of pip")
    submit.add_argument("--num-cpus", type=float, help="CPUs reserved for the job's driver")
    submit.add_argument("--num-gpus", type=float, help="GPUs reserved for the job's driver")
    submit.add_argument("--submission-id", help="the job id (default: lookahead-<command>-<time>-<random>)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--stop-on-interrupt", action="store_true", help="Ctrl-C stops the job instead of detaching")
    submit.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--address", help="the dashboard, http://HEAD:8265 (default: RAY_ADDRESS, else local)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookahead-ray", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="the full stream on the console: Ray's worker output, Ray Data's plans, library warnings "
                             "(by default they go to OUTPUT_DIR/logs/lookahead.log)")
    sub = parser.add_subparsers(dest="command", required=True)
    _preview_parser(sub)
    prepare = sub.add_parser("prepare", help="preview + tokenize on Ray Data, write Parquet shards and a row report")
    _add_config_args(prepare)
    train = sub.add_parser("train", help="fine-tune with Ray Train + DeepSpeed ZeRO; HF export in OUTPUT_DIR/final")
    _add_config_args(train)
    train.add_argument("--output-dir", help="run directory (same as train.output_dir=...)")
    train.add_argument("--local", action="store_true", help="run the same loop in this process, without Ray")
    train.add_argument("--dry-run", action="store_true",
                       help="check the recipe here in seconds (DeepSpeed engine on a stand-in model), train nothing")
    train.add_argument("--strict", action="store_true", help="with --dry-run: warnings (unreachable sources) fail")
    export = sub.add_parser("export", help="rebuild the Hugging Face export (final/) from a training checkpoint")
    export.add_argument("--checkpoint", required=True, help="a checkpoint directory written by `train`")
    export.add_argument("--output-dir", help="run directory to write final/ into (default: the checkpoint's run)")
    evaluate = sub.add_parser("eval", help="safety (RSR, JSR), utility and first-token drift of several models")
    _add_config_args(evaluate, "eval.max_new_tokens=256 eval.gpus_per_actor=1")
    evaluate.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                          help="a Hugging Face model directory or a LoRA adapter directory (repeat for several; the "
                               "first is the drift seed)")
    evaluate.add_argument("--base", metavar="DIR", help="the base model of LoRA adapters given as --model "
                          "(same as eval.base_model=...; default: the base each adapter names)")
    evaluate.add_argument("--output-dir", help="where results go (same as eval.output_dir=...)")
    search = sub.add_parser("tune", help="search m and P (and training knobs) on Ray Tune: prepare -> train -> eval")
    _add_config_args(search, "tune.num_samples=8 tune.max_concurrent_trials=2")
    search.add_argument("--output-dir", help="the search directory (same as tune.output_dir=...)")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search in that directory")
    demo = sub.add_parser("demo", help="the whole workflow on a synthetic world, on one CPU machine, with a report")
    demo.add_argument("--output-dir", default="out/demo", help="where the report goes (default: out/demo)")
    demo.add_argument("--quick", action="store_true", help="a few minutes instead of about ten (used in CI)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    demo.add_argument("--seeds", help="several world seeds, e.g. 0,1,2: one demo each (OUTPUT_DIR/seed-N) and a "
                                      "report of mean [min-max] over them")
    demo.add_argument("--world", choices=["mechanism", "basic"], default="mechanism",
                      help="mechanism (default): the world with a task opener and hint-following seed in which "
                           "LookAhead's mechanism can appear; basic: without those ingredients")
    demo.add_argument("--m", type=int, default=6, help="answer tokens previewed by the real variant")
    demo.add_argument("--lora", action="store_true", help="the three variants train LoRA adapters on the seed model")
    demo.add_argument("--P", default="Let's solve this problem. ", help="virtual prefix of the virtual variant")
    demo.add_argument("--methods", help="the fine-tunes compared: 'all' or names such as vanilla,real,constrained_sft,"
                      "safety_mix,ptst,mixed_preview,adaptive_preview (default vanilla,real,virtual; combine with +)")
    demo.add_argument("--search", action="store_true",
                      help="instead: `tune` over m and P on the world's validation split (OUTPUT_DIR/search)")
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="world.<ingredient>=value (e.g. world.shallow_alignment=true); with --search: overrides "
                           "of its config")
    _cluster_parsers(sub)
    return parser


COMMANDS = {"preview": cmd_preview, "prepare": cmd_prepare, "train": cmd_train, "export": cmd_export, "eval": cmd_eval,
            "tune": cmd_tune, "demo": cmd_demo, "submit": cmd_submit, "jobs": cmd_jobs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:  # Ctrl-C: a training run says where it stopped and how to resume
        print(f"lookahead-ray {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except (LookaheadError, FileNotFoundError) as exc:
        if args.verbose:
            traceback.print_exc()
        exc = console.raised_in_ray(exc)
        config = getattr(args, "config", None)
        about_file = isinstance(exc, ConfigError) and not str(exc).startswith(("override ", "--"))
        where = f"{config}: " if about_file and config and config not in str(exc) else ""
        print(f"lookahead-ray {args.command}: error: {where}{exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or a failure inside Ray: its traceback goes to the log file and stderr
        fixable = fixable_os_error(exc)  # a full or read-only disk, a permission, a directory for a file
        if fixable is None:
            console.report_failure(args.command, exc)
            return 1
        console.log_failure(args.command, exc)
        print(f"lookahead-ray {args.command}: error: {os_error_line(fixable)}", file=sys.stderr)
        return 2
    finally:
        console.close()


if __name__ == "__main__":
    sys.exit(main())
