"""`odegpt train | launch | convert | plan`: the argument parsers, registered with the `odegpt` command.

Registering imports only this module and `launcher.config` (yaml); each handler imports the module that does its
work (and that module torch, DeepSpeed or the data pipeline) when it runs, so `odegpt --help` stays fast.
"""
from __future__ import annotations

import argparse

from odegpt.commands import options

from .config import add_config_arguments


def register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="pretrain in this process (a world of one, or one rank under deepspeed/torchrun)",
        description="Pretrain an odegpt model with DeepSpeed ZeRO. Run it directly for one process, or let "
                    "`odegpt launch`, `deepspeed` or `torchrun` start one per rank. Same as "
                    "`python -m launcher.train`.")
    add_train_arguments(parser)
    parser.set_defaults(func=_train)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `odegpt train` and `python -m launcher.train` (whose module `odegpt --help` does not import)."""
    add_config_arguments(parser)
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest complete checkpoint in run.output_dir that can be read, else start "
                             "fresh), 'none', a checkpoints directory or one checkpoint (default: %(default)s)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _train(args) -> int:
    from .train import run  # the trainer's module: not for odegpt --help

    return run(args)


def register_launch(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch", help="start training on one or many nodes through the deepspeed launcher",
        description="Build and run the `deepspeed` launcher command for `launcher.train`. The config is "
                    "validated against the resulting world size before any node starts.")
    add_config_arguments(parser)
    parser.add_argument("--resume", default="auto", help="passed to every rank (default: %(default)s)")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile: one 'hostname slots=N' per line")
    parser.add_argument("--num-nodes", type=int, help="use the first N hosts")
    parser.add_argument("--num-gpus", type=int, help="ranks per node (CPU: processes per node)")
    parser.add_argument("--launcher", default="pdsh",
                        choices=["pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm"],
                        help="multi-node backend (default: %(default)s)")
    parser.add_argument("--launcher-args", help="extra arguments for the backend, quoted")
    parser.add_argument("--no-ssh", action="store_true",
                        help="start only this node's ranks (run the same command on every node with its "
                             "--node-rank); needs --master-addr")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank with --no-ssh")
    parser.add_argument("--master-addr", help="address of node rank 0")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable for every rank (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    parser.add_argument("--quiet", action="store_true", help="deepspeed launcher logs errors only")
    parser.set_defaults(func=_launch)


def _launch(args) -> int:
    from .launch import LaunchSpec, run  # the launcher's module: not for odegpt --help

    spec = LaunchSpec(configs=args.config, overrides=args.overrides, resume=args.resume, hostfile=args.hostfile,
                      num_nodes=args.num_nodes, num_gpus=args.num_gpus, launcher=args.launcher,
                      launcher_args=args.launcher_args, no_ssh=args.no_ssh, node_rank=args.node_rank,
                      master_addr=args.master_addr, master_port=args.master_port, env=args.env,
                      quiet=args.quiet)
    return run(spec, dry_run=args.dry_run)


def register_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="turn a DeepSpeed checkpoint (any ZeRO stage) into a native odegpt model folder",
        description="Consolidate a training checkpoint into a self-contained odegpt folder (weights, config, "
                    "modeling code, tokenizer), ready for `odegpt export`, `generate` and `evaluate`.")
    parser.add_argument("--checkpoint", required=True,
                        help="a run's checkpoints/ directory (newest complete tag) or one tag directory")
    options.add_output(parser)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: data.tokenizer of the run's config)")
    parser.set_defaults(func=_convert)


def _convert(args) -> int:
    from .convert import convert  # torch and DeepSpeed: not for odegpt --help

    print(f"wrote {convert(args.checkpoint, args.output, tokenizer_dir=args.tokenizer, overwrite=args.overwrite)}")
    return 0


def register_plan(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="parameters, FLOPs, memory per GPU and days of a run, before paying for a cluster",
        description="Print what a config costs: parameters, FLOPs per token at each step size, model-state "
                    "memory per GPU under ZeRO 0-3 (DeepSpeed's estimators), activation and KV-cache memory, "
                    "and tokens/s and days for the token budget at an assumed MFU.")
    add_config_arguments(parser)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--num-gpus", type=int, default=8, help="GPUs per node (default: %(default)s)")
    parser.add_argument("--gpu", default="A100",
                        help="GPU model whose dense bf16 peak to assume, e.g. A100, H100, H200, L40S "
                             "(odegpt.model.accounting.PEAK_TFLOPS; default: %(default)s)")
    parser.add_argument("--gpu-tflops", type=float, default=None,
                        help="peak dense TFLOP/s per GPU, overriding --gpu")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default: %(default)s)")
    parser.add_argument("--all-models", action="store_true",
                        help="one table row per model preset in configs/model (125M to 13B), each merged with --config")
    parser.set_defaults(func=_plan)


def _plan(args) -> int:
    from .plan import main  # torch and odegpt's cost model: not for odegpt --help

    return main(args)
