"""The `batcher` command line: run, validate, plan, report, gateway.

Exit codes: 0 done (or nothing to do), 1 unexpected failure, 2 invalid spec or usage, 3 unusable input,
4 output not writable (or disk full mid-run; or the output is the input, or a file batcher did not write),
5 a partial run of another spec, or of a changed input without id_column, is in the way (use --fresh), 6 the
server refused the API key, 7 stopped at the cost budget (at once, with no request, when a rerun's cap is
already spent by the job), 8 another run of this job holds its lock (`--wait` waits for it), 9 finished with
more error rows than --max-errors (or limits.max_errors; default 0) allows, 130/143
interrupted by SIGINT/SIGTERM (at any moment, start-up included: one line, no traceback).
After 4, 6, 7, 9, 130 and 143 the run is resumable: run the same command again (after 4, once there is room;
after 9 it asks the error rows again);
after 8, once the other run has ended.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from .errors import BatcherError

__all__ = ["entry", "main"]

# Set by `entry()`: the process is the `batcher` executable's, so process-wide memory settings are ours to make.
# `main(argv)` called from a user's program (or the tests) leaves its process as it found it.
_OWN_PROCESS = False


def _run(args: argparse.Namespace) -> int:
    from .memory import freeze_imports
    from .prices import PriceTable
    from .runner import RunOptions, run_job
    from .spec import load_spec

    if _OWN_PROCESS:
        freeze_imports()
    spec = load_spec(args.spec)
    options = RunOptions(
        output=Path(args.output) if args.output else None,
        output_folder=bool(args.output) and args.output.endswith("/"),
        limit=args.limit,
        quiet=args.quiet,
        fresh=args.fresh,
        prices=PriceTable.from_file(args.prices) if args.prices else None,
        base_url=args.base_url,
        verbose=args.verbose,
        overwrite=args.overwrite,
        ray=args.ray,
        workers=args.workers,
        wait=args.wait,
        loop=args.loop,
        max_errors=args.max_errors,
    )
    result = run_job(spec, options)
    if result.status == "nothing_to_do":
        print(f"batcher: {result.message}", file=sys.stderr)
        return 0
    if not args.quiet or result.exit_code:
        print(f"batcher: {spec.job_name}: {result.summary()}", file=sys.stderr)
    if result.message:
        print(f"batcher: {result.message}", file=sys.stderr)
    return result.exit_code


def _max_errors(value: str) -> str:
    from .spec import parse_max_errors

    try:
        parse_max_errors(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (got {value!r})") from None
    return value


def _validate(args: argparse.Namespace) -> int:
    from . import storage
    from .runner import check_output_columns
    from .spec import load_spec

    spec = load_spec(args.spec)
    check_output_columns(spec)
    where = f"{storage.shown(spec.input.path)} -> {storage.shown(spec.output.path)}"
    print(f"{args.spec}: valid job spec {spec.job_name!r} ({where})")
    return 0


def _gateway(args: argparse.Namespace, rest: list[str]) -> int:
    from .gateway import main as gateway_main

    return gateway_main(rest)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batcher", description="Batch job runner for LLM completions.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job spec (resumes an interrupted run of the same spec)")
    run.add_argument("spec", help="job spec (.yaml or .json)")
    run.add_argument("--output", help="write here instead of the spec's output.path")
    run.add_argument("--limit", type=int, metavar="N", help="only the first N rows of the input")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    run.add_argument("--fresh", action="store_true", help="discard any partial run and start over")
    run.add_argument("--prices", metavar="FILE", help="price table overriding the shipped one")
    run.add_argument("--base-url", help="override endpoint.base_url")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing output file that batcher did not write")
    run.add_argument("--verbose", "-v", action="store_true", help="print every failed attempt and the decision")
    run.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="run on Ray: a local instance, or the cluster at ADDRESS ('auto', 'ray://host:10001'); "
                     "needs pip install 'batcher[ray]'")
    run.add_argument("--workers", type=int, metavar="N",
                     help="Ray workers (default: one per CPU of the cluster, capped by the shards)")
    run.add_argument("--wait", action="store_true",
                     help="if another run of this job is under way, wait for it to end, then resume (else: exit 8)")
    run.add_argument("--max-errors", type=_max_errors, metavar="N|P%",
                     help="error rows a finished run may have and still exit 0: a count, or a percentage of the "
                          "rows (default: limits.max_errors, else 0; over it: exit 9)")
    run.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                     help="event loop: uvloop when installed (auto, the default; $BATCHER_LOOP=asyncio turns it "
                          "off), or asyncio")
    run.set_defaults(func=_run)

    val = sub.add_parser("validate", help="check a job spec without running it")
    val.add_argument("spec")
    val.set_defaults(func=_validate)

    sub.add_parser("gateway", help="serve the simulated orq gateway (see: batcher gateway --help)", add_help=False)

    from .plan import add_parser as add_plan

    add_plan(sub)
    if command in ("report", "-h", "--help", None):
        from .report import add_parser as add_report

        add_report(sub)
    else:
        # polars (~25 MB, ~0.3 s) is only for `batcher report`: a run does not pay for it
        sub.add_parser("report", help="usage, cost, latency and errors of output files")
    return p


_PATH_ARGS = ("spec", "output", "outputs", "prices", "html")


def _expand_path_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`~` and `$VARS` in path flags: a shell leaves `--output=~/x` alone, and a scheduler has no shell."""
    from .paths import expand_path

    try:
        for name in _PATH_ARGS:
            value = getattr(args, name, None)
            if isinstance(value, str):
                # a trailing slash means something (`--output DIR/`: a folder of Parquet parts): it stays
                slash = "/" if value.endswith("/") and value.strip("/") else ""
                setattr(args, name, str(expand_path(value)) + slash)
            elif isinstance(value, list):
                setattr(args, name, [str(expand_path(v)) for v in value])
    except ValueError as exc:
        parser.error(str(exc))


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) outside the run's own signal handling, as a KeyboardInterrupt that knows its signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt as exc:
        # A signal before the run watches signals itself (start-up, preflight, waiting for the lock) or after:
        # nothing was sent yet or everything is written; one line, not a traceback.
        print("batcher: interrupted", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["gateway"]:
        return _gateway(argparse.Namespace(), argv[1:])
    parser = _parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1 if hasattr(args, "limit") else False:
        parser.error("--limit must be at least 1")
    if getattr(args, "workers", None) is not None and (args.workers < 1 or getattr(args, "ray", None) is None):
        parser.error("--workers needs --ray and must be at least 1")
    _expand_path_args(args, parser)
    try:
        code: int = args.func(args)
        return code
    except BatcherError as exc:
        print(f"batcher: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `batcher report ... | head`: the reader left; say nothing more.
        sys.stderr.close()
        return 0


def entry() -> int:
    """The `batcher` executable (console script and `python -m batcher`): the process is ours, not a library's,
    so let it hand memory back to the OS between bursts (`memory.py`), then run the command."""
    global _OWN_PROCESS
    argv = sys.argv[1:]
    if argv[:1] != ["gateway"]:
        # SIGTERM kills silently by default: from here on it stops batcher as Ctrl-C does (one line, 143).
        # The run replaces this with its own handling while it runs, and puts it back after.
        signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            from .memory import tune_process_memory

            tune_process_memory()  # imports pyarrow: the longest stretch of start-up
        except KeyboardInterrupt as exc:
            print("batcher: interrupted", file=sys.stderr)
            return 128 + int(getattr(exc, "signum", signal.SIGINT))
        _OWN_PROCESS = True
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(entry())
