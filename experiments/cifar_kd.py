"""Train a teacher, a baseline student and distilled students on CIFAR; print the table.

    python experiments/cifar_kd.py                       # CIFAR-10, resnet56 -> resnet20, KD
    python experiments/cifar_kd.py --preset smoke --data-dir ../shared/tfds
    python experiments/cifar_kd.py --method none,kd,dkd,dist --seeds 3

The command line of :func:`kd_jax.experiment.run` (which does everything: phases, resume,
outputs): flags derived from :class:`kd_jax.experiment.ExperimentConfig`, ``--config``, exit
statuses (0 done, 1 data/non-finite/full disk, 2 a mistake, 130 interrupted), one-line errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import signal
import sys
import textwrap

# Runs from a checkout without installation too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kd_jax import experiment  # noqa: E402
from kd_jax.experiment import (LEAVES, PRESETS, ConfigError, ExperimentConfig,  # noqa: E402,F401
                               configure, flat, load_config_file, student_objective,
                               students_key)

UsageError = ConfigError  # a mistake in the command line or the environment: one line, exit 2
acquire_workdir_lock = experiment.acquire_lock
_flag = experiment.flag
PROG = "cifar_kd.py"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's lines; wraps help on spaces only (flags and names stay whole)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, exit 2; an unknown flag gets the closest ones suggested."""
        hint = ""
        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = []
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    name = word.split("=")[0]
                    initials = "--" + "".join(p[0] for p in name[2:].split("-") if p)
                    close += [initials] if initials in known and initials != name else []
                    close += difflib.get_close_matches(name, known, n=2, cutoff=0.6)
            if close:
                hint = f"; did you mean {' or '.join(dict.fromkeys(close))}? (--help lists all)"
            else:
                hint = "; --help lists the options"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def _type_of(f):
    """The argparse type of a setting (from its annotation)."""
    text = str(f.type)
    if "tuple" in text:
        return str  # comma lists, coerced by configure
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


def _dataset(value: str) -> str:
    from kd_jax import data
    if value in data.DATASETS or (value.startswith(data.FOLDER) and len(value) > 7):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from "
                                     f"{', '.join(data.DATASETS)} or folder:PATH)")


def _shown(name, default) -> str:
    if name == "seeds_per_method":
        return ",".join(f"{m}={n}" for m, n in default) or "none"
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or "none"
    return "none" if default in (None, "") else str(default)


def build_parser() -> argparse.ArgumentParser:
    from kd_jax import models, objectives
    presets = "\n".join(f"  {n:<13} {experiment.PRESET_HELP[n]}" for n in PRESETS)
    p = _Parser(prog=PROG, formatter_class=_Formatter,
                description=__doc__.split("\n\n")[0] + "\n\npresets (--preset):\n" + presets)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="a named configuration (listed above); --config and flags override "
                        "its values (default: default)")
    p.add_argument("--config", default=None,
                   help="a configuration file: .json (like a workdir's config.json, or flat "
                        "settings) or .py defining `config`; flags override it")
    p.add_argument("--workdir", default=None,
                   help="where checkpoints and results go (default: runs/<dataset>_<teacher>_"
                        "<student>)")
    defaults = flat(ExperimentConfig())
    archs = ", ".join(models.available())
    for name, (_, f) in LEAVES.items():
        help = f.metadata["help"]
        if name in ("teacher", "student"):
            help += f"; one of {archs}"
        if name == "methods":
            help += f"; one of {', '.join(objectives.METHODS)}"
        if "default" not in help:
            help += f" (default: {_shown(name, defaults[name])})"
        kwargs = dict(default=None, dest=name, help=help)
        kind = _dataset if name == "dataset" else _type_of(f)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        p.add_argument(_flag(name), **kwargs)
    p.add_argument("--coordinator-address", default=None,
                   help="multi-host: host:port of process 0 (default: detected from the "
                        "cluster environment)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: process count")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the one-line epoch summaries stay)")
    return p


@dataclasses.dataclass(frozen=True)
class Options:
    """What the command line sets beside the configuration."""

    workdir: str | None = None
    progress: bool = True
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    hooks: tuple = ()  # run with every record (the Ctrl-C check)


def parse_args(argv=None) -> tuple[ExperimentConfig, Options]:
    """The configuration (``--preset``, then ``--config``, then flags) and the options."""
    p = build_parser()
    args = p.parse_args(argv)
    config = PRESETS[args.preset]  # a ConfigError below is main()'s one line, exit 2
    if args.config:
        config = configure(config, **load_config_file(args.config))
    given = {name: getattr(args, name) for name in LEAVES if getattr(args, name) is not None}
    if "seeds" in given and "seeds_per_method" not in given:
        given["seeds_per_method"] = ()  # an explicit --seeds applies to every method
    config = configure(config, **given)
    return config, Options(workdir=args.workdir, progress=not args.no_progress,
                           coordinator_address=args.coordinator_address,
                           num_processes=args.num_processes, process_id=args.process_id)


class _Interrupt:
    """Ctrl-C: Python raises KeyboardInterrupt wherever the main thread is; inside a callback
    that swallows exceptions (JAX's gc callback prints "Exception ignored in ...") it is lost.
    The flag is not: :meth:`check` runs as a hook at every log interval and at the end."""

    def __init__(self):
        self.caught = False

    def handler(self, signum, frame):
        self.caught = True
        raise KeyboardInterrupt

    def check(self, record=None):
        if self.caught:
            raise KeyboardInterrupt

    def quiet(self, hook):
        def unraisable(u):  # the swallowed Ctrl-C is flagged: no traceback for it
            if not (self.caught and isinstance(u.exc_value, KeyboardInterrupt)):
                hook(u)
        return unraisable


def main(argv=None) -> int:
    try:
        config, options = parse_args(argv)
    except ConfigError as err:
        return _fail(err, 2)
    interrupt = _Interrupt()
    options = dataclasses.replace(options, hooks=(*options.hooks, interrupt.check))
    previous_handler, previous_hook = None, sys.unraisablehook
    try:
        previous_handler = signal.signal(signal.SIGINT, interrupt.handler)
        sys.unraisablehook = interrupt.quiet(previous_hook)
    except ValueError:
        pass  # not the main thread (main() called from a thread): Python's default handling
    try:
        try:
            status = _main(config, options)
            interrupt.check()
            return status
        except ConfigError as err:
            return _fail(err, 2)
        except KeyboardInterrupt:
            where = options.workdir or experiment.default_workdir(config)
            print(f"{PROG}: interrupted; rerun the same command to resume from the last "
                  f"checkpoint in {where}.", file=sys.stderr)
            return 130
        except Exception as err:
            from kd_jax import data, loop
            if isinstance(err, (data.DataNotFoundError, loop.NonFiniteLossError,
                                experiment.DiskFullError)):
                return _fail(err, 1)
            raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        sys.unraisablehook = previous_hook


def _fail(err: BaseException, status: int) -> int:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return status


def _main(config: ExperimentConfig, options: Options) -> int:
    workdir = experiment.preflight(config, options.workdir)  # before any device or write
    from kd_jax import parallel
    try:
        parallel.maybe_initialize_distributed(options.coordinator_address,
                                              options.num_processes, options.process_id)
    except (ValueError, RuntimeError, TimeoutError) as err:
        raise ConfigError(f"multi-host start-up failed: {err}") from err
    import jax
    results = experiment.run(config, workdir, progress=options.progress, hooks=options.hooks)
    if jax.process_index() == 0:
        if results.reused:
            print(f"Finished run in {workdir}; stored results:\n")
            print(results.table())
        else:
            print("\n" + results.table())
            print(f"Outputs: {workdir}/results.json, results.md, metrics.jsonl, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
