"""Greedy agreement of odegpt's GGUF exports in llama.cpp with `odegpt generate` on the folder, per storage type.

    python benchmarks/gguf_agreement.py --model runs/smollm2 --output runs/gguf-agreement \\
        [--dtypes f32,q8_0,q4_0] [--new-tokens 32] [--threads 1] [--step-size A] [--kv-type f16|f32]

For each type the folder is exported by `odegpt export --format gguf --dtype TYPE` (its printed line: the tensors of
each type and the file size). The same prompts are then decoded greedily

- by odegpt: the token ids of `odegpt generate` at batch 1 (its own functions: the flags parsed by its parser, its
  settings, `model.generate`), checked against the completion text `odegpt generate --json` prints for each prompt;
- by llama.cpp (llama-cpp-python, a test-time tool: `pip install --no-deps llama_cpp_python-*.whl numpy diskcache`):
  the same prompt ids in, the argmax of the last logits at every step (temperature 0), stopping at the end-of-sequence
  token as `odegpt generate` does. The prompt is also tokenized by llama.cpp from its text and compared.

It prints, per type: the tokens identical to odegpt's at the same position (over the longer of the two continuations
of each prompt), the tokens before the first difference, the prompts whose continuation is identical, the file size and
llama.cpp's decode speed (the greedy loop's wall time over the tokens after the first, one token per evaluation, median
of the prompts), and two comparisons that separate what quantization changes from what the export or llama.cpp
might: float32 greedy decoding of the file's own weights (dequantized by transformers' GGUF loader, as `odegpt import`
reads a GGUF file) against odegpt, and llama.cpp against that. results-kv{f16,f32}.json in --output has every
continuation.

llama.cpp keeps its KV cache in f16 by default (--kv-type f16, as users run it); --kv-type f32 removes that rounding
from the comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """',
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
    "import numpy as np\n\nx = np.linspace(0, 1, 100)\n",
]
EXPORT_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0", "q4_0": "q4_0"}


def odegpt_command() -> list[str]:
    return [str(Path(sys.executable).with_name("odegpt"))]


def export(model: str, output: Path, dtype: str, step_size: float) -> tuple[Path, str]:
    """`odegpt export --format gguf` of ``model`` in ``dtype`` (reused when already written): the file and the line
    the command printed."""
    folder = output / f"gguf-{dtype}"
    line_file = folder.with_name(folder.name + ".line")
    if not line_file.is_file():
        done = subprocess.run([*odegpt_command(), "export", "--model", model, "--output", str(folder), "--format",
                               "gguf", "--dtype", EXPORT_DTYPES[dtype], "--step-size", f"{step_size:g}",
                               "--overwrite"], capture_output=True, text=True, check=True)
        line_file.write_text(done.stdout.strip().splitlines()[-1])
    return next(folder.glob("*.gguf")), line_file.read_text()


def odegpt_greedy(model_dir: str, prompts: list[str], new_tokens: int, threads: int,
                  step_size: float | None) -> tuple[list[list[int]], list[list[int]]]:
    """The prompt ids and greedy continuation ids `odegpt generate` makes at batch 1, through its own functions."""
    import torch

    from odegpt.commands.cli import build_parser
    from odegpt.commands.generate import generation_settings
    from odegpt.folders.model_folder import load_config, load_model, load_tokenizer

    torch.set_num_threads(threads)
    argv = ["generate", "--model", model_dir, "--max-new-tokens", str(new_tokens), "--threads", str(threads)]
    native = load_config(model_dir).model_type == "odegpt"
    args = build_parser().parse_args(argv + (["--step-size", f"{step_size:g}"] if native and step_size else []))
    config = load_config(model_dir)
    settings = generation_settings(args, config)
    tokenizer = load_tokenizer(model_dir, config.vocab_size, padding_side="left")
    model = load_model(model_dir, config)
    prompt_ids, continuations = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        with torch.inference_mode():
            output = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    **settings)
        sequence = (output.sequences if settings.get("return_dict_in_generate") else output)[0, len(ids):].tolist()
        if tokenizer.eos_token_id in sequence:
            sequence = sequence[: sequence.index(tokenizer.eos_token_id) + 1]
        prompt_ids.append(ids)
        continuations.append(sequence)
    return prompt_ids, continuations


def check_against_the_command(model_dir: str, prompts: list[str], continuations: list[list[int]], new_tokens: int,
                              threads: int, step_size: float | None) -> list[bool]:
    """Whether `odegpt generate --json` prints, for each prompt, the completion of ``continuations``."""
    from odegpt.commands.generate import completion
    from odegpt.folders.model_folder import load_config, load_tokenizer

    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config.vocab_size)
    native = config.model_type == "odegpt"
    same = []
    for prompt, continuation in zip(prompts, continuations):
        argv = [*odegpt_command(), "generate", "--model", model_dir, "--prompt", prompt, "--max-new-tokens",
                str(new_tokens), "--threads", str(threads), "--json"]
        if native and step_size:
            argv += ["--step-size", f"{step_size:g}"]
        printed = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        same.append(printed["completion"] == completion(tokenizer, ids, continuation)["completion"]
                    and printed["completion_tokens"] == len(continuation))
    return same


def llama_cpp_greedy(path: Path, prompts: list[str], prompt_ids: list[list[int]], new_tokens: int, eos: int | None,
                     threads: int, kv_type: str) -> dict:
    """Greedy continuations of ``prompt_ids`` in llama.cpp, the seconds of each decode step after the first, and
    whether llama.cpp tokenizes each prompt's text to the same ids."""
    import llama_cpp
    import numpy as np

    kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv_type]
    context = max(len(ids) for ids in prompt_ids) + new_tokens + 8
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                          n_threads_batch=threads, type_k=kv, type_v=kv, verbose=False)
    vocabulary = llm.n_vocab()
    continuations, tokenized, speeds = [], [], []
    for prompt, ids in zip(prompts, prompt_ids):
        tokenized.append(llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids)
        llm.reset()
        llm.eval(ids)
        sequence, seconds = [], []
        while len(sequence) < new_tokens:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocabulary,))
            sequence.append(int(logits.argmax()))
            if sequence[-1] == eos or len(sequence) == new_tokens:
                break
            began = time.perf_counter()
            llm.eval([sequence[-1]])
            seconds.append(time.perf_counter() - began)
        continuations.append(sequence)
        if seconds:
            speeds.append(len(seconds) / sum(seconds))
    llm.close()
    return {"continuations": continuations, "tokenized_alike": tokenized,
            "decode_tokens_per_s": statistics.median(speeds) if speeds else None}


def dequantized_greedy(path: Path, prompt_ids: list[list[int]], new_tokens: int, eos: int | None,
                       threads: int) -> list[list[int]]:
    """Greedy continuations in float32 of the weights the GGUF file holds: dequantized by transformers' GGUF loader
    (``odegpt import``'s reader of a GGUF source), the same ids in, stopping at ``eos``. Against odegpt this is what
    the quantization itself changes; against llama.cpp, what llama.cpp's arithmetic changes (its f16 KV cache, its
    8-bit activations in quantized products)."""
    import torch

    from odegpt.folders.gguf_source import load_gguf_source

    torch.set_num_threads(threads)
    model = load_gguf_source(path)
    continuations = []
    for ids in prompt_ids:
        with torch.inference_mode():
            output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                                    do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
        sequence = output[0, len(ids):].tolist()
        continuations.append(sequence[: sequence.index(eos) + 1] if eos in sequence else sequence)
    del model
    return continuations


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    identical = total = prefix = whole = 0
    for a, b in zip(reference, candidate):
        total += max(len(a), len(b))
        identical += sum(x == y for x, y in zip(a, b))
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += first
        whole += a == b
    return {"identical": identical, "total": total, "before_first_difference": prefix, "identical_prompts": whole}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="odegpt model folder with its tokenizer")
    parser.add_argument("--output", required=True, help="folder for the exports and results.json")
    parser.add_argument("--dtypes", default="f32,q8_0,q4_0", help="GGUF types (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-size", type=float, default=None, help="default: the model's")
    parser.add_argument("--kv-type", choices=["f16", "f32"], default="f16", help="llama.cpp's KV cache type")
    parser.add_argument("--prompts-file", default=None, help="a JSON list of prompts (default: five built in)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from odegpt.folders.model_folder import load_config

    prompts = json.loads(Path(args.prompts_file).read_text()) if args.prompts_file else PROMPTS
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    config = load_config(args.model)
    step_size = args.step_size if args.step_size is not None else getattr(config, "step_size", 1.0)
    prompt_ids, reference = odegpt_greedy(args.model, prompts, args.new_tokens, args.threads, step_size)
    command_agrees = check_against_the_command(args.model, prompts, reference, args.new_tokens, args.threads,
                                               step_size)
    print(f"{args.model}: step size {step_size:g}, {len(prompts)} prompts x up to {args.new_tokens} greedy tokens, "
          f"{args.threads} thread(s), llama.cpp KV cache {args.kv_type}; odegpt generate --json prints the same "
          f"completions: {sum(command_agrees)}/{len(prompts)}")
    results = {"model": args.model, "step_size": step_size, "threads": args.threads, "kv_type": args.kv_type,
               "prompts": prompts, "odegpt": reference, "odegpt_command_agrees": command_agrees, "types": {}}
    rows = []
    for dtype in args.dtypes.split(","):
        path, line = export(args.model, output, dtype, step_size)
        print(f"  odegpt export --dtype {EXPORT_DTYPES[dtype]}: {line}")
        run = llama_cpp_greedy(path, prompts, prompt_ids, args.new_tokens, config.eos_token_id, args.threads,
                               args.kv_type)
        dequantized = dequantized_greedy(path, prompt_ids, args.new_tokens, config.eos_token_id, args.threads)
        scores = {"llama.cpp vs odegpt": agreement(reference, run["continuations"]),
                  "dequantized vs odegpt": agreement(reference, dequantized),
                  "llama.cpp vs dequantized": agreement(dequantized, run["continuations"])}
        results["types"][dtype] = {"file": str(path), "bytes": path.stat().st_size, "export": line, **run,
                                   "dequantized": dequantized, "agreement": scores}
        rows.append((dtype, path.stat().st_size, scores, run))
    print("\nidentical tokens at the same position (tokens before the first difference; prompts identical "
          "throughout)\n")
    print("| type | file size | llama.cpp vs odegpt generate | float32 on the file's dequantized weights vs odegpt | "
          "llama.cpp vs that float32 | llama.cpp tokenizes alike | llama.cpp decode tokens/s |\n"
          "|---|---|---|---|---|---|---|")
    for dtype, size, scores, run in rows:
        speed = run["decode_tokens_per_s"]
        cells = [f"{s['identical']}/{s['total']} = {s['identical'] / s['total']:.1%} ({s['before_first_difference']}; "
                 f"{s['identical_prompts']}/{len(prompts)})" for s in scores.values()]
        print(f"| {dtype} | {size / 1e6:.1f} MB | {' | '.join(cells)} | {sum(run['tokenized_alike'])}/{len(prompts)} "
              f"| {'-' if speed is None else f'{speed:.0f}'} |")
    (output / f"results-kv{args.kv_type}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
