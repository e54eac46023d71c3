"""The ``fs-gmfl`` command.

Sub-commands:

* ``run --cfg FILE [--quiet] [--resume] [--overwrite] [KEY VALUE ...]``: a
  federated run on the embedded simulator;
* ``comm --cfg FILE [KEY VALUE ...]``: per-round bytes per client profile as
  JSON, from a model built on the meta device (no weights);
* ``keys [SECTION] [--markdown]``: every configuration key with default and help
  (``--markdown``: the table the docs show, see :mod:`fs_gmfl.config.doc_tables`);
* ``bench NAME [...]``: benchmarks (see ``fs-gmfl bench --help``);
* ``flower-run --cfg FILE [--quiet] [--resume] [--overwrite] [KEY VALUE ...]``: the
  same run on Flower's simulation engine (needs the ``flower`` extra);
* ``flower-app --cfg FILE --out DIR [KEY VALUE ...]``: write a Flower app folder
  for ``flwr run DIR`` (local simulation or a deployment);
* ``fs-run --cfg FILE [KEY VALUE ...]``: FederatedScope's unmodified main with
  fs_gmfl registered (needs FederatedScope installed);
* ``fs-eval NAME --cfg FILE [KEY VALUE ...]``: a FederatedScope-LLM
  evaluation script (``gsm8k``, ...) on a run's checkpoint, CPU allowed.

Options of ``run`` and ``comm`` may stand anywhere on the command line, also
after the ``KEY VALUE`` overrides (``run --cfg F federate.save_freq 5
--resume``). Configuration and input errors print one line and exit with code 2; a run
stopped because every client update was rejected for ``federate.max_rejected_rounds``
rounds in a row prints one line and exits with code 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
import typing
import warnings
from collections.abc import Sequence

from fs_gmfl import __version__
from fs_gmfl.config.environment import check_environment
from fs_gmfl.errors import FsGmflError, InputError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _cmd_run(args: argparse.Namespace) -> int:
    from fs_gmfl.config import load_config
    from fs_gmfl.hosts.sim.runner import Simulation

    cfg = load_config(args.cfg, args.opts)
    sim = Simulation(cfg, quiet=args.quiet, resume=args.resume, overwrite=args.overwrite)
    try:
        sim.run()
    except KeyboardInterrupt:
        if sim.saved_round is None:
            print("fs-gmfl: interrupted; no checkpoint was written (set federate.save_freq > 0 to allow resuming)",
                  file=sys.stderr)
        else:
            command = " ".join(["fs-gmfl run --cfg", shlex.quote(args.cfg), "--resume", *map(shlex.quote, args.opts)])
            print(f"fs-gmfl: interrupted; the checkpoint of round {sim.saved_round} in {sim.run_dir / 'checkpoint'} "
                  f"is intact; resume with: {command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _flower_host() -> typing.Any:
    """The Flower host's app module (one line and exit 2 when the ``flower`` extra is not installed)."""
    try:
        app = importlib.import_module("fs_gmfl.hosts.flower.app")
    except ImportError as err:
        raise InputError(f"the Flower host needs the flower extra (flwr[simulation]==1.42.0): bash scripts/install.sh "
                         f"--flower, or pip install 'fs_gmfl[flower]' ({err})") from None
    return app


def _cmd_flower_run(args: argparse.Namespace) -> int:
    from fs_gmfl.config import load_config

    cfg = load_config(args.cfg, args.opts)
    flower = _flower_host()
    outcome = flower.simulate(flower.RunRequest(cfg, quiet=args.quiet, resume=args.resume, overwrite=args.overwrite))
    if outcome.error is not None:
        if isinstance(outcome.error, (KeyboardInterrupt, FsGmflError)):
            raise outcome.error  # main() turns these into one line and their exit code
        raise RuntimeError(f"the Flower server app failed: {outcome.error!r}") from outcome.error
    return 0


def _cmd_flower_app(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fs_gmfl.config import load_config

    flower = _flower_host()
    folder = flower.write_app(load_config(args.cfg, args.opts), Path(args.out))
    print(f"fs-gmfl: Flower app written to {folder}; run it with: flwr run {shlex.quote(str(folder))}",
          file=sys.stderr)
    return 0


def _cmd_comm(args: argparse.Namespace) -> int:
    from fs_gmfl.comm_estimate import estimate
    from fs_gmfl.config import load_config

    cfg = load_config(args.cfg, args.opts)
    print(json.dumps(estimate(cfg), indent=2))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from fs_gmfl.config.fields import describe_range, iter_keys
    from fs_gmfl.config.schema import RunConfig

    rows = [row for row in iter_keys(RunConfig) if not args.section or row[0].startswith(args.section + ".")
            or row[0] == args.section]
    if not rows:
        sections = sorted({row[0].split(".")[0] for row in iter_keys(RunConfig)})
        print(f"fs-gmfl: error: no configuration key under '{args.section}'; sections: {', '.join(sections)}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.markdown:
        from fs_gmfl.config.doc_tables import markdown_table

        print(markdown_table(args.section or "."))
        return 0
    for key, default, type_name, meta, _ in rows:
        allowed = (" one of " + ", ".join(map(repr, meta["choices"]))) if meta.get("choices") else ""
        if any(meta.get(b) is not None for b in ("ge", "gt", "le", "lt")):
            allowed += f" in {describe_range(meta)}"
        flag = " [inferred default]" if meta.get("inferred") else ""
        print(f"{key} = {default!r}  ({type_name}{allowed}){flag}\n    {meta.get('help', '')}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fs_gmfl.bench import run_benchmark

    return run_benchmark(args.name, args.bench_args)


def _cmd_fs_run(argv: Sequence[str]) -> int:
    from fs_gmfl.hosts.fs.run import main as fs_main

    return fs_main(list(argv))


def _cmd_fs_eval(argv: Sequence[str]) -> int:
    from fs_gmfl.hosts.fs.evaluate import EVAL_SCRIPTS
    from fs_gmfl.hosts.fs.evaluate import main as eval_main

    if not argv or argv[0].startswith("-"):
        print(f"usage: fs-gmfl fs-eval {{{','.join(EVAL_SCRIPTS)}}} --cfg FILE [KEY VALUE ...] "
              "[--prompt script|training (gsm8k)]", file=sys.stderr)
        return EXIT_USAGE
    return eval_main(argv[0], list(argv[1:]))


#: sub-commands whose arguments belong to FederatedScope's own parser (passed through untouched).
PASS_THROUGH = {"fs-run": _cmd_fs_run, "fs-eval": _cmd_fs_eval}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``fs-gmfl run: error: ...``) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102 - argparse hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fs-gmfl``."""
    parser = OneLineParser(prog="fs-gmfl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"fs-gmfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment on the embedded simulator")
    run.add_argument("--cfg", required=True, help="YAML configuration file")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint "
                     "(written every federate.save_freq rounds); the configuration must match")
    run.add_argument("--overwrite", action="store_true", help="replace the outputs of a finished run in the same "
                     "<outdir>/<expname> (without it such a run is refused)")
    run.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, e.g. federate.total_round_num 5")
    run.set_defaults(func=_cmd_run)
    flower_run = sub.add_parser("flower-run", help="run a federated experiment on Flower's simulation engine "
                                "(clients in parallel; needs the flower extra)")
    flower_run.add_argument("--cfg", required=True, help="YAML configuration file (flower.* sets parallelism)")
    flower_run.add_argument("--quiet", action="store_true", help="no progress bar")
    flower_run.add_argument("--resume", action="store_true", help="continue from the run directory's latest "
                            "checkpoint")
    flower_run.add_argument("--overwrite", action="store_true", help="replace the outputs of a finished run")
    flower_run.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    flower_run.set_defaults(func=_cmd_flower_run)
    flower_app = sub.add_parser("flower-app", help="write a Flower app folder for 'flwr run' (simulation or "
                                "deployment)")
    flower_app.add_argument("--cfg", required=True, help="YAML configuration file")
    flower_app.add_argument("--out", required=True, help="the app folder to write")
    flower_app.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    flower_app.set_defaults(func=_cmd_flower_app)
    comm = sub.add_parser("comm", help="estimate per-round bytes from a meta-device model")
    comm.add_argument("--cfg", required=True, help="YAML configuration file")
    comm.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    comm.set_defaults(func=_cmd_comm)
    keys = sub.add_parser("keys", help="list configuration keys with defaults and help")
    keys.add_argument("section", nargs="?", default="", help="only keys under this section, e.g. gmfl")
    keys.add_argument("--markdown", action="store_true", help="print a markdown table (as in the docs; without "
                      "a section: the top-level keys)")
    keys.set_defaults(func=_cmd_keys)
    from fs_gmfl.bench import BENCHMARKS, describe

    bench = sub.add_parser("bench", help=f"run a benchmark ({', '.join(BENCHMARKS)})",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Run a benchmark; its options: fs-gmfl bench NAME --help.\n\nbenchmarks:\n"
                                       + describe())
    bench.add_argument("name", help="benchmark name (listed above)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's options")
    bench.set_defaults(func=_cmd_bench)
    sub.add_parser("fs-run", add_help=False, help="run FederatedScope's main with fs_gmfl registered "
                   "(arguments go to FederatedScope: --cfg FILE [KEY VALUE ...])")
    sub.add_parser("fs-eval", add_help=False, help="run a FederatedScope-LLM evaluation script on a run's "
                   "checkpoint: fs-eval {gsm8k,humaneval,humanevalx,code,mmlu} --cfg FILE; gsm8k also takes "
                   "--prompt training (the training template instead of the script's 8-shot prompt)")
    return parser


#: options that may follow the overrides, per sub-command: name -> takes a value.
HOISTED_OPTIONS = {"run": {"--cfg": True, "--quiet": False, "--resume": False, "--overwrite": False,
                           "--help": False, "-h": False},
                   "flower-run": {"--cfg": True, "--quiet": False, "--resume": False, "--overwrite": False,
                                  "--help": False, "-h": False},
                   "flower-app": {"--cfg": True, "--out": True, "--help": False, "-h": False},
                   "comm": {"--cfg": True, "--help": False, "-h": False}}


def hoist_options(args_list: list[str]) -> list[str]:
    """Move the options of ``run``/``comm`` in front of the ``KEY VALUE`` overrides, wherever they stand.

    argparse hands everything after the first override to the overrides, so a
    trailing ``--resume`` would be read as a configuration key. An unknown
    option in a key position is left where it is and reported by
    :func:`check_overrides`.
    """
    if not args_list or args_list[0] not in HOISTED_OPTIONS:
        return args_list
    known = HOISTED_OPTIONS[args_list[0]]
    options: list[str] = []
    rest: list[str] = []
    words = iter(args_list[1:])
    for word in words:
        name = word.split("=", 1)[0]
        if name in known:
            options.append(word)
            if known[name] and "=" not in word:
                value = next(words, None)
                if value is None or value in known:
                    raise InputError(f"option '{name}' of '{args_list[0]}' needs a value, e.g. {name} FILE")
                options.append(value)
        else:
            rest.append(word)
    return [args_list[0], *options, *rest]


def check_overrides(command: str, opts: Sequence[str]) -> None:
    """Refuse an option-like word where a configuration key is expected (one line, exit 2)."""
    for key in opts[::2]:
        if key.startswith("-"):
            known = ", ".join(k for k in HOISTED_OPTIONS.get(command, {}) if k not in ("-h",))
            raise InputError(f"unknown option '{key}' for '{command}' (options: {known}); configuration "
                             "overrides are KEY VALUE pairs such as federate.total_round_num 5")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in PASS_THROUGH:
        try:
            check_environment()
            return int(PASS_THROUGH[args_list[0]](args_list[1:]))
        except FsGmflError as err:
            print(f"fs-gmfl: error: {err}", file=sys.stderr)
            return EXIT_USAGE
    parser = build_parser()
    try:
        hoisted = hoist_options(args_list)
    except InputError as err:
        print(f"fs-gmfl: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(hoisted)
    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command != "keys":  # listing keys reads no FS_GMFL_* variable
            check_environment()
        if args.command in HOISTED_OPTIONS:
            check_overrides(args.command, args.opts)
        return int(args.func(args))
    except FsGmflError as err:
        print(f"fs-gmfl: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fs-gmfl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
