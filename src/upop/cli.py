"""`upop compress | evaluate | demo | structures`."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from .checkpoint import CheckpointError
from .plan import PlanError
from .runconfig import ConfigError, load_run_config

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
    show = sub.add_parser("structures", help="list the prunable structures of a run config's model")
    show.add_argument("--config", required=True)
    show.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, CheckpointError, PlanError) as exc:
        print(f"upop: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # data errors and other bad input, one line
        if type(exc).__name__ in ("DataError", "UnsupportedModelError"):
            print(f"upop: error: {exc}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    from . import pipeline

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
