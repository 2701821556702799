"""`upop compress | evaluate | demo | export | structures | keys`.

Every failure is answered with one line, `upop: error: <message>`, on stderr and an exit code
(`--debug` shows the full traceback instead):

    0    done
    1    the work ran and failed: non-finite loss or weights, a full disk, an export that does not
         match PyTorch, or an unexpected error (its type is named)
    2    the command cannot run as asked: a bad argument, config key, file, checkpoint, plan, data
         or model (nothing long has started; argparse's own usage errors use 2 as well)
    130  interrupted (Ctrl-C)

torch and transformers are imported inside the commands, so `upop --help` and `upop --version`
answer at once.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from . import __version__

DEMO_CONFIG = "demo.yaml"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# (module, class name) of the errors that mean "the work failed" (1) and "cannot run as asked" (2),
# looked up among the modules already imported: an error of a module never imported cannot occur.
_FAILED = [("upop.search", "NonFiniteError"), ("upop.files", "NonFiniteWeightsError"), ("upop.files", "DiskFullError")]
_USAGE = [("upop.runconfig", "ConfigError"), ("upop.checkpoint", "CheckpointError"), ("upop.plan", "PlanError"),
          ("upop.data", "DataError"), ("upop.adapters", "UnsupportedModelError"), ("upop.export", "ExportError")]


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as the one line every other failure gets (exit code 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        print(f"upop: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="upop", description="Unified and progressive pruning (UPop) of vision-language transformers.",
        epilog="exit codes: 0 done, 1 the work failed, 2 bad arguments or input (nothing started), "
               "130 interrupted. Errors are one line; --debug shows the traceback.")
    parser.add_argument("--version", action="version", version=f"upop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # --debug is accepted after the command too; SUPPRESS keeps the sub-parser from resetting it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress = sub.add_parser("compress", parents=[common], help="search -> compress -> retrain -> evaluate")
    compress.add_argument("--config", required=True, help="run configuration (YAML)")
    compress.add_argument("--seed", type=int, help="overrides the config's seed")
    compress.add_argument("--output-dir", help="overrides the config's output_dir")
    compress.add_argument("--overwrite", action="store_true",
                          help="start afresh in an output folder that holds another run")
    compress.add_argument("--dry-run", action="store_true",
                          help="prove the config at its real size offline (random weights, synthetic data in its "
                               "format): 2 search steps, compression, 1 retraining step; memory and time (upop.dryrun)")
    compress.add_argument("--dry-run-scale", choices=["full", "tiny"], default="full",
                          help="tiny: every width, depth and image size shrunk (a quick check of the path)")
    compress.add_argument("overrides", nargs="*", help="key.sub=value, e.g. upop.target=0.75 train.lr=1e-4")

    evaluate = sub.add_parser("evaluate", parents=[common],
                              help="evaluate a model folder (compressed by upop, or a dense Hugging Face one)")
    evaluate.add_argument("--model", required=True,
                          help="folder written by upop.save_pretrained, or a Hugging Face folder "
                               "(config.json + safetensors)")
    evaluate.add_argument("--config", required=True, help="run configuration naming the task and data")
    evaluate.add_argument("--split", default="test", choices=["val", "test"], help="data split (default: test)")
    evaluate.add_argument("--output", help="where the results go (default: <model>/evaluate.json)")
    evaluate.add_argument("overrides", nargs="*")

    demo = sub.add_parser("demo", parents=[common],
                          help="the embedded default: OpenMoji retrieval, MiniLM + ViT, 2x")
    demo.add_argument("--output-dir", default=None)
    demo.add_argument("--overwrite", action="store_true", help="start afresh in an output folder that holds "
                                                               "another run")
    demo.add_argument("overrides", nargs="*")

    export = sub.add_parser("export", parents=[common],
                            help="export a model saved by upop to ONNX or torch.export and check it")
    export.add_argument("--model", required=True, help="folder written by upop.save_pretrained")
    export.add_argument("--format", default="onnx", choices=["onnx", "torch"],
                        help="onnx (checked in onnxruntime) or torch (a torch.export .pt2 program)")
    export.add_argument("--output", default=None,
                        help="file to write, outside the model folder (default: <model>.onnx or <model>.pt2)")
    export.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size")
    export.add_argument("--batch", type=int, default=2, help="batch of the sample inputs used for the check")
    export.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |exported - torch|")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")

    show = sub.add_parser("structures", parents=[common], help="list the prunable structures of a run config's model")
    show.add_argument("--config", required=True)
    show.add_argument("overrides", nargs="*")

    keys = sub.add_parser("keys", parents=[common], help="every run-config key with its default and meaning")
    keys.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. train or upop")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("upop: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the one place where errors become a line and an exit code
        if args.debug:
            raise
        code, message = _describe(exc)
        print(f"upop: error: {_printable(message)}", file=sys.stderr)
        return code


def _printable(text: str) -> str:
    """A file name that is not valid UTF-8 reaches Python as surrogate escapes; show the bytes
    they stand for ("\\xff"), as the run's log does."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(exc: Exception) -> tuple[int, str]:
    text = str(exc).strip()
    # one line: DataLoader workers append their traceback to the message
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:  # without "[Errno N]"; a path is named
        first = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    if _is(exc, _FAILED):
        return EXIT_FAILED, first
    if _is(exc, _USAGE) or isinstance(exc, (OSError, ValueError)):
        return EXIT_USAGE, first
    return EXIT_FAILED, f"{type(exc).__name__}: {first} (run again with --debug for the traceback)"


def _is(exc: Exception, names: list[tuple[str, str]]) -> bool:
    for module, name in names:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def _run(args: argparse.Namespace) -> int:
    if args.command == "keys":
        return _keys(args.prefix)
    if args.command == "export":
        return _export(args)

    from .runconfig import load_run_config

    overrides = list(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    if args.command == "demo":
        with resources.as_file(resources.files("upop.configs") / DEMO_CONFIG) as path:
            cfg = load_run_config(Path(path), overrides)
        _compress(cfg, args.overwrite)
        return 0
    if args.command == "compress" and args.dry_run:  # the config's own output_dir is never touched
        from .dryrun import main as dry_run

        dry_run(args.config, overrides, scale=args.dry_run_scale)
        return 0
    cfg = load_run_config(args.config, overrides)
    if args.command == "compress":
        _compress(cfg, args.overwrite)
    elif args.command == "evaluate":
        from .evaluate import print_table, run_evaluate
        from .runconfig import ConfigError

        if args.output and Path(args.output).expanduser().resolve() == Path(args.config).expanduser().resolve():
            raise ConfigError(f"--output {args.output} is the run config itself; give another file")
        print_table(run_evaluate(cfg, args.model, split=args.split, output=args.output))
    elif args.command == "structures":
        from .adapters import discover
        from .tasks import make_task

        model = make_task(cfg).model
        for s in discover(model):
            print(f"{s.name:60s} {s.modality:8s} {s.kind:16s} layer {s.layer:3d}  units {s.num_units('head_dim'):5d}"
                  f"  params/unit {s.unit_params('head_dim'):9.0f}")
    return 0


def _compress(cfg: Any, overwrite: bool) -> None:
    from . import pipeline
    from .runconfig import ConfigError

    if not overwrite:
        pipeline.run_compress(cfg)
        return
    if "overwrite" not in inspect.signature(pipeline.run_compress).parameters:
        raise ConfigError("--overwrite is not supported by this upop's pipeline (run_compress has no "
                          "overwrite= yet); remove the output folder or choose another --output-dir")
    pipeline.run_compress(cfg, overwrite=True)


# ---- export ---------------------------------------------------------------------------------------
def _export(args: argparse.Namespace) -> int:
    from .export import check_numbers, check_output_path, default_output

    # every argument is checked before the model is loaded
    check_numbers(args.batch, args.tolerance, args.opset, args.format, args.dynamic_batch)
    output = check_output_path(args.output or default_output(args.model, args.format), args.model)

    from .checkpoint import from_pretrained
    from .export import check_onnx, check_torch, export_onnx, export_torch, sample_inputs

    model = from_pretrained(args.model)
    inputs = sample_inputs(model, batch=args.batch)
    if args.format == "onnx":
        export_onnx(model, output, inputs, dynamic_batch=args.dynamic_batch, opset=args.opset)
        check, runtime, label = check_onnx, "onnxruntime_ms", "onnx"
    else:
        export_torch(model, output, inputs, dynamic_batch=args.dynamic_batch)
        check, runtime, label = check_torch, "exported_ms", "exported"
    result = check(model, output, inputs)
    if args.dynamic_batch:  # the same file at another batch size
        other = check(model, output, sample_inputs(model, batch=args.batch + 3, seed=1))
        result["max_abs_diff"] = max(result["max_abs_diff"], other["max_abs_diff"])
    print(f"wrote {output}: {result['outputs']} outputs ({', '.join(result['names'])}), "
          f"max |{label} - torch| = {result['max_abs_diff']:.2e}; latency at batch {result['batch']}: "
          f"{label} {result[runtime]:.2f} ms, PyTorch {result['torch_ms']:.2f} ms")
    if not result["max_abs_diff"] <= args.tolerance:  # also catches NaN
        print(f"upop: error: {label} outputs differ from PyTorch by {result['max_abs_diff']:.2e} "
              f"(> --tolerance {args.tolerance})", file=sys.stderr)
        return EXIT_FAILED
    return 0


# ---- keys -----------------------------------------------------------------------------------------
def _keys(prefix: str) -> int:
    rows = [row for row in config_keys() if row[0].startswith(prefix)]
    if not rows:
        from .runconfig import ConfigError

        raise ConfigError(f"no config key starts with {prefix!r}; run `upop keys` for all of them")
    width = max(len(key) for key, _, _ in rows) + 2
    value_width = min(24, max(len(value) for _, value, _ in rows)) + 2
    for key, value, meaning in rows:
        print(f"{key:{width}s}{value:{value_width}s}{meaning}".rstrip())
    return 0


def config_keys() -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every run-config key, found by walking the RunConfig dataclasses
    and the `Options` of every registered task (YAML section: the task's name). The meaning is a
    field's `metadata={"help": ...}`, else its trailing comment, else the comment lines above
    it, else its `name: meaning` entry in the docstring of its class (or of a dataclass that
    docstring names, e.g. UPopConfig for the `upop:` section)."""
    import dataclasses

    from .runconfig import RunConfig
    from .tasks import TASKS

    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        meanings = _meanings(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if default is None and f.type in (Any, "Any"):  # a placeholder filled by the task registry
                continue
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{key}.")
            else:
                rows.append((key, _yaml_value(default), f.metadata.get("help") or meanings.get(f.name, "")))

    walk(RunConfig, "")
    for name, task in sorted(TASKS.items()):
        options = getattr(task, "Options", None)
        if dataclasses.is_dataclass(options):
            walk(options, f"{name}.")
    return rows


def _meanings(cls: type) -> dict[str, str]:
    """Field name -> the comment that documents it in the class source or docstring."""
    import dataclasses
    import io
    import re
    import tokenize

    found: dict[str, str] = {}
    doc = inspect.getdoc(cls) or ""
    namespace = vars(sys.modules.get(cls.__module__, sys))
    for word in sorted(set(re.findall(r"\b[A-Z]\w+", doc))):  # a dataclass the docstring refers to
        other = namespace.get(word)
        if isinstance(other, type) and other is not cls and dataclasses.is_dataclass(other):
            found.update(_meanings(other))
    for match in re.finditer(r"^(\w+(?: / \w+)*): (.+(?:\n    .+)*)", doc, re.M):
        for name in match.group(1).split(" / "):
            found[name] = " ".join(match.group(2).split())
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (frozen app): docstring meanings only
        return found
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    lines = source.splitlines()
    for number, line in enumerate(lines, 1):
        field = re.match(r"\s+(\w+)\s*:", line)
        if not field or line.lstrip().startswith("#"):
            continue
        above, previous = [], number - 1
        while previous in comments and previous not in code_lines:  # a comment block right above
            above.insert(0, comments[previous])
            previous -= 1
        text = comments.get(number) or " ".join(above)
        if text:
            found[field.group(1)] = text
    return found


def _yaml_value(value: Any) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value != value.strip() or ":" in value else value
    return json.dumps(value)


if __name__ == "__main__":
    sys.exit(main())
