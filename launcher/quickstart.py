"""The quickstart, end to end: ``python -m launcher.quickstart``.

tokenizer on the stdlib corpus -> prepare -> pretrain a small fully shared model with randomized
step sizes on 2 CPU ranks, ZeRO-2, through the deepspeed launcher -> convert -> perplexity at
a = 0.5, 1, 2, 4 -> native and unrolled exports -> a sample generated with the KV cache -> a
summary of where everything is. Each stage runs the public command a user would type, and a stage
whose output already exists is skipped, so a re-run resumes rather than repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import add_config_arguments, load_config
from .launch import free_port
from .stages import Stages

STEP_SIZES = (0.5, 1.0, 2.0, 4.0)
# The sample: a model of 463K parameters at perplexity ~45 has learned the surface of the standard library, much of
# which is its test suite, not programs. So the prompt opens what it has seen most (a unittest class and a test
# method's name; a prompt ending in a space would end on a lone-space token the tokenizer never produces before a
# word) and sampling is sharpened (temperature 0.5, top-k 40; greedy decoding loops on one line), at a=1, seed 0.
PROMPT = "class TestPath(unittest.TestCase):\n\n    def test_"
SAMPLING = {"temperature": 0.5, "top_k": 40, "seed": 0, "max_new_tokens": 96}


def build_parser() -> argparse.ArgumentParser:
    """The quickstart's options (docs/commands.md documents them through the ``odegpt.programs`` entry point)."""
    parser = argparse.ArgumentParser(
        prog="python -m launcher.quickstart",
        description="The whole path on CPU ranks, end to end: a tokenizer and a corpus from the Python standard "
                    "library, pretraining through the deepspeed launcher, conversion, perplexity at each step size, "
                    "native and unrolled exports and a sample; a rerun resumes rather than repeats.")
    parser.add_argument("--output-dir", default="runs/quickstart", help="everything goes here (default: %(default)s)")
    add_config_arguments(parser, default=["quickstart"])
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (default: %(default)s)")
    parser.add_argument("--prompt", default=PROMPT, help="generation prompt (default: %(default)r)")
    parser.add_argument("--max-files", type=int, default=None, metavar="N",
                        help="tokenizer and corpus from the first N standard-library files only (a quick look; "
                             "default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    tokenizer_dir, data_dir, model_dir = out / "tokenizer", out / "data", out / "model"
    native_dir, unrolled_dir = out / "export" / "native", out / "export" / "unrolled-a2"
    overrides = [f"data.corpora=[{data_dir}]", f"data.tokenizer={tokenizer_dir}", f"run.output_dir={out}",
                 *args.overrides]
    config = load_config(args.config, overrides, world_size=args.ranks)
    odegpt = [sys.executable, "-m", "odegpt"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}
    stages = Stages("quickstart", 7)

    _prepare_data(stages, odegpt, config, tokenizer_dir, data_dir, args.max_files)
    t = config.train
    stages.begin(f"pretrain: {config.model.segments} at a ~ {t.step_size_distribution}, {t.train_steps} steps x "
                 f"{t.global_batch_size} x {t.seq_len} tokens, {args.ranks} CPU ranks, "
                 f"ZeRO-{config.deepspeed.zero_stage}, deepspeed launcher")
    stages.run(odegpt + ["launch", "--num-gpus", str(args.ranks), "--master-port", str(free_port()), "--quiet",
                         "--config", *args.config, *[f"--set={o}" for o in overrides]], env=env)

    stages.begin("convert the final DeepSpeed checkpoint to a native odegpt folder")
    stages.run(odegpt + ["convert", "--checkpoint", str(config.checkpoint_dir), "--output", str(model_dir),
                         "--overwrite"])
    report, table = _evaluate(stages, odegpt, env, model_dir, data_dir, t.seq_len)

    stages.begin("export: native folder and a Llama unrolled at a=2")
    stages.run(odegpt + ["export", "--model", str(model_dir), "--output", str(native_dir), "--overwrite"])
    stages.run(odegpt + ["export", "--model", str(model_dir), "--output", str(unrolled_dir), "--format", "unrolled",
                         "--step-size", "2", "--overwrite"])

    stages.begin(f"generate with the KV cache at a=1 (temperature {SAMPLING['temperature']}, "
                 f"top-k {SAMPLING['top_k']}, seed {SAMPLING['seed']})")
    sample = stages.run(odegpt + ["generate", "--model", str(native_dir), "--prompt", args.prompt, "--step-size", "1",
                                  *[f"--{key.replace('_', '-')}={value}" for key, value in SAMPLING.items()]],
                        capture=True, env=env)
    print(sample.rstrip())

    elapsed = time.perf_counter() - stages.start
    print(f"\n=== quickstart done in {elapsed / 60:.1f} min")
    print(f"  logs        {out / 'metrics.jsonl'}  (tensorboard --logdir {out / 'tensorboard'})")
    print(f"  checkpoints {config.checkpoint_dir}")
    print(f"  model       {model_dir}")
    print(f"  exports     {native_dir}  {unrolled_dir}")
    print(f"  validation perplexity ({report['num_tokens']:,} tokens, windows of {report['seq_len']}): "
          + "  ".join(f"a={a}: {ppl:.2f}" for a, ppl in table.items()))
    return 0


def _prepare_data(stages: Stages, odegpt: list[str], config, tokenizer_dir: Path, data_dir: Path,
                  max_files: int | None) -> None:
    """Stages 1 and 2: the tokenizer and the corpus, each skipped when its output exists."""
    limit = [] if max_files is None else ["--max-files", str(max_files)]
    stages.begin("tokenizer on the Python standard library")
    if (tokenizer_dir / "tokenizer.json").is_file():
        print(f"exists: {tokenizer_dir}")
    else:
        stages.run(odegpt + ["tokenizer", "--input", "stdlib", "--vocab-size", str(config.model.vocab_size),
                             "--output", str(tokenizer_dir), *limit])

    stages.begin("prepare: tokenize and shard the corpus, 1% validation")
    if (data_dir / "manifest.json").is_file():
        print(f"exists: {data_dir}")
    else:
        stages.run(odegpt + ["prepare", "--input", "stdlib", "--tokenizer", str(tokenizer_dir), "--output",
                             str(data_dir), "--val-fraction", "0.01", "--workers", "2", *limit])


def _evaluate(stages: Stages, odegpt: list[str], env: dict, model_dir: Path, data_dir: Path,
              seq_len: int) -> tuple[dict, dict[str, float]]:
    """Stage 5: validation perplexity at each step size; the report and its perplexity by step size."""
    stages.begin("validation perplexity at each step size")
    report = json.loads(stages.run(odegpt + ["evaluate", "--model", str(model_dir), "--data", str(data_dir),
                                             "--step-sizes", ",".join(f"{a:g}" for a in STEP_SIZES),
                                             "--seq-len", str(seq_len), "--num-samples", "256", "--no-speed",
                                             "--json"], capture=True, env=env))
    table = {f"{row['step_size']:g}": row["perplexity"] for row in report["results"]}
    scored = (f"odegpt evaluate: {report['num_tokens']:,} tokens in windows of {report['seq_len']} of {data_dir}'s "
              f"validation split; training's own validation uses fewer samples, so its figures differ a little")
    print(f"  {scored}")
    for a, ppl in table.items():
        print(f"  a={a:<4} perplexity {ppl:.2f}")
    return report, table


if __name__ == "__main__":
    sys.exit(main())
