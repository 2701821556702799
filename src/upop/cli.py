"""`upop compress | evaluate | demo | export | structures`."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from .adapters import UnsupportedModelError
from .checkpoint import CheckpointError
from .data import DataError
from .export import ExportError
from .plan import PlanError
from .runconfig import ConfigError, load_run_config
from .search import NonFiniteError

DEMO_CONFIG = "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upop", description="Unified and progressive pruning (UPop) "
                                     "of vision-language transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    compress = sub.add_parser("compress", help="search -> compress -> retrain -> evaluate")
    compress.add_argument("--config", required=True, help="run configuration (YAML)")
    compress.add_argument("--seed", type=int, help="overrides the config's seed")
    compress.add_argument("overrides", nargs="*", help="key.sub=value, e.g. upop.target=0.75 train.lr=1e-4")
    evaluate = sub.add_parser("evaluate", help="evaluate a dense or compressed model saved by upop")
    evaluate.add_argument("--model", required=True, help="folder written by upop.save_pretrained")
    evaluate.add_argument("--config", required=True, help="run configuration naming the task and data")
    evaluate.add_argument("overrides", nargs="*")
    demo = sub.add_parser("demo", help="the embedded default: OpenMoji retrieval, MiniLM + ViT, 2x")
    demo.add_argument("--output-dir", default=None)
    demo.add_argument("overrides", nargs="*")
    export = sub.add_parser("export", help="export a model saved by upop to ONNX and check it in onnxruntime")
    export.add_argument("--model", required=True, help="folder written by upop.save_pretrained")
    export.add_argument("--format", default="onnx", choices=["onnx"])
    export.add_argument("--output", default=None, help="file to write (default: <model>/model.onnx)")
    export.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size")
    export.add_argument("--batch", type=int, default=2, help="batch of the sample inputs used for the check")
    export.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |onnx - torch|")
    show = sub.add_parser("structures", help="list the prunable structures of a run config's model")
    show.add_argument("--config", required=True)
    show.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, CheckpointError, PlanError, ExportError, DataError, UnsupportedModelError) as exc:
        # one line: DataLoader workers append their traceback to the message
        print(f"upop: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"upop: error: {exc}", file=sys.stderr)
        return 1


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import from_pretrained
    from .export import check_onnx, export_onnx, sample_inputs

    model = from_pretrained(args.model)
    output = Path(args.output) if args.output else Path(args.model) / "model.onnx"
    inputs = sample_inputs(model, batch=args.batch)
    export_onnx(model, output, inputs, dynamic_batch=args.dynamic_batch)
    result = check_onnx(model, output, inputs)
    if args.dynamic_batch:  # the same file at another batch size
        other = check_onnx(model, output, sample_inputs(model, batch=args.batch + 3, seed=1))
        result["max_abs_diff"] = max(result["max_abs_diff"], other["max_abs_diff"])
    print(f"wrote {output}: {result['outputs']} outputs, max |onnx - torch| = {result['max_abs_diff']:.2e}; "
          f"latency at batch {result['batch']}: onnxruntime {result['onnxruntime_ms']:.2f} ms, "
          f"PyTorch {result['torch_ms']:.2f} ms")
    if result["max_abs_diff"] > args.tolerance:
        print(f"upop: error: ONNX outputs differ from PyTorch by {result['max_abs_diff']:.2e} "
              f"(> {args.tolerance})", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from . import pipeline

    if args.command == "export":
        return _export(args)

    if args.command == "demo":
        with resources.as_file(resources.files("upop.configs") / DEMO_CONFIG) as path:
            overrides = list(args.overrides)
            if args.output_dir:
                overrides.append(f"output_dir={args.output_dir}")
            cfg = load_run_config(Path(path), overrides)
        pipeline.run_compress(cfg)
        return 0
    overrides = list(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_run_config(args.config, overrides)
    if args.command == "compress":
        pipeline.run_compress(cfg)
    elif args.command == "evaluate":
        pipeline.run_evaluate(cfg, args.model)
    elif args.command == "structures":
        from .adapters import discover
        from .tasks import make_task

        model = make_task(cfg).model
        for s in discover(model):
            print(f"{s.name:60s} {s.modality:8s} {s.kind:16s} layer {s.layer:3d}  units {s.num_units('head_dim'):5d}"
                  f"  params/unit {s.unit_params('head_dim'):9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
