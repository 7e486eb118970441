"""Generation at real size (issue 29): every way to decode the same weights, side by side, and where a step's time goes.

    python benchmarks/generation_real.py --model runs/smollm2 --model runs/shared --output runs/generation-real \\
        [--threads 1,2] [--batch-sizes 1,8] [--new-tokens 32] [--rounds 3] [--draft-step-size 2]

Per model folder, thread count and batch size, in one process and interleaved round after round (the machine is
shared and noisy: only ratios measured side by side mean anything), greedy decoding of ``--new-tokens`` tokens (the
end-of-sequence token ignored, so every run decodes as many) after a prose prompt (batch 1) or a left-padded batch of
prose and code prompts (batch > 1):

- odegpt eager (``model.generate``, the reference) and compiled (``compile=True``: static KV caches, a
  torch.compile'd step per token; its graphs are built in the warm-up round and not timed);
- transformers' ``LlamaForCausalLM`` on the unrolled export of the same weights (its own eager ``generate``);
- llama.cpp through llama-cpp-python on odegpt's own GGUF exports (``odegpt export --format gguf --dtype float32``
  and ``q8_0``), batch 1 only (its high-level API decodes one sequence), KV cache f16 as users run it;
- each speculative mode of odegpt (step-size drafts at ``--draft-step-size`` where that solve is shorter, prompt
  lookup, both; draft length ``auto``), at batch 1 also on a code prompt, whose repeats prompt lookup can copy.

Tokens/s is decoding's: batch x positions decoded after the first new token over the time from it to the last (a
streamer's clock; llama.cpp's loop timed alike), so a prompt's prefill, which engines batch differently, is left out;
ratios are paired per round (the reference's time over the variant's in the same round), then the median. Every
odegpt decoder's tokens are checked against eager plain decoding's (``same``); transformers' and
llama.cpp's are compared too (other arithmetic may flip a near tie).

The second table is the batch-1 decode step of each model taken apart (1 thread, eager, timed per solver step by a
solve hook): per segment the block evaluations, the bytes of weights they read (distinct, and per token), the FLOPs,
the milliseconds, and the bandwidth and FLOP rate that implies. A step that reads its bytes at the machine's memory
bandwidth is bound by them; a shared block read again from cache should run faster per evaluation than distinct
layers streamed from memory. Each model after the first is also timed against the first, per token (eager and
compiled plain decoding of both interleaved round after round, the ratio paired per round): a shared model against
its source.

Exports (unrolled Llama, GGUF files) are written once under ``--output`` and reused; results.json holds every figure.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROSE = ["The history of the city begins in the early middle ages, when a small settlement grew around the river "
         "crossing and its market.",
         "Photosynthesis is the process by which green plants turn light into chemical energy. In the first stage,",
         "She opened the letter slowly, unsure whether the news inside would change everything she had planned.",
         "The committee met on Tuesday to discuss the budget for the coming year, and the first question was"]
CODE = ["def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
        "    return total / len(values)\n\n\ndef variance(values):\n    m = mean(values)\n    total = 0\n"
        "    for value in values:\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def __add__(self, "
        "other):\n        return Point(self.x + other.x, self.y + other.y)\n\n    def __sub__(self, other):\n",
        "for i in range(10):\n    print(i)\nfor j in range(20):\n    print(j)\nfor k in range(30):\n",
        "import os\nimport sys\nimport json\nimport time\nimport math\nimport random\nimport re\nimport"]
GGUF_TYPES = {"llama.cpp f32": "float32", "llama.cpp q8_0": "q8_0"}


def batch_texts(batch: int) -> list[str]:
    """The prompts of a batch: the first prose prompt alone at batch 1, else prose and code prompts in turn."""
    return PROSE[:1] if batch == 1 else [(PROSE + CODE)[i % 8] for i in range(batch)]


def odegpt_command() -> list[str]:
    return [str(Path(sys.executable).with_name("odegpt"))]


def gguf_export(model_dir: str, folder: Path, dtype: str) -> Path:
    """`odegpt export --format gguf --dtype dtype` of the folder (kept and reused): the file."""
    if not any(folder.glob("*.gguf")):
        subprocess.run([*odegpt_command(), "export", "--model", model_dir, "--output", str(folder), "--format", "gguf",
                        "--dtype", dtype, "--overwrite"], check=True, capture_output=True, text=True)
    return next(folder.glob("*.gguf"))


class DecodeClock:
    """A streamer that times decoding: from the first new token (the prompt's prefill and first step behind it) to
    the last, over the positions in between. ``generate`` puts the prompt, then each new token or, when
    speculating, each round's tokens."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []  # (time, positions put)

    def put(self, value) -> None:
        self.calls.append((time.perf_counter(), value.shape[-1] if value.ndim == 2 else 1))

    def end(self) -> None:
        pass

    def decode_seconds(self, batch: int) -> float:
        """Seconds per decoded position after the first new one (a batch decodes ``batch`` tokens per position)."""
        first, *rest = self.calls[1:]
        positions = sum(count for _, count in rest) + first[1] - 1  # the first put's tokens but its first
        return (self.calls[-1][0] - first[0]) / positions if positions else float("nan")


class Runs:
    """The decoders of one model, each run giving (tokens (batch, new), seconds per decoded position)."""

    def __init__(self, model_dir: str, work: Path, new_tokens: int) -> None:
        import torch
        from transformers import LlamaForCausalLM

        from odegpt.folders.export import save_unrolled
        from odegpt.folders.model_folder import load_config, load_model, load_tokenizer

        self.config = load_config(model_dir)
        self.tokenizer = load_tokenizer(model_dir, self.config.vocab_size, padding_side="left")
        self.model = load_model(model_dir, self.config).float().eval()
        # compile=True lays weight matrices out for batch-1 products, in place (compiled.lay_out_for_rows):
        # the compiled decoder gets its own copy, so that eager decoding stays the reference.
        self.compiled_model = load_model(model_dir, self.config).float().eval()
        unrolled = work / "unrolled"
        if not (unrolled / "config.json").is_file():
            save_unrolled(self.model, unrolled, self.config.step_size)
        self.llama = LlamaForCausalLM.from_pretrained(unrolled, dtype=torch.float32).eval()
        for model in (self.model, self.compiled_model, self.llama):  # every run decodes new_tokens tokens
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = 0
        self.ggufs = {}  # llama.cpp's rows need llama-cpp-python (pip install -e '.[real-model]'): left out without it
        if importlib.util.find_spec("llama_cpp") is not None:
            self.ggufs = {name: gguf_export(model_dir, work / f"gguf-{dtype}", dtype)
                          for name, dtype in GGUF_TYPES.items()}
        else:
            print("llama-cpp-python is not installed: no llama.cpp rows (pip install -e '.[real-model]')", flush=True)
        self.llama_cpp: dict[tuple[str, int], object] = {}
        self.new_tokens = new_tokens

    def prompt(self, texts: list[str]):
        ids = [self.tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def generate(self, model, input_ids, mask, **settings):
        import torch

        clock = DecodeClock()
        with torch.inference_mode():
            output = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=self.new_tokens,
                                    streamer=clock, **settings)
        sequences = output.sequences if hasattr(output, "sequences") else output
        return sequences[:, input_ids.shape[1]:], clock.decode_seconds(input_ids.shape[0])

    def llama_cpp_run(self, name: str, threads: int, input_ids, mask):
        """Greedy decoding in llama.cpp of the one prompt (the argmax of the last logits, one token per eval)."""
        import llama_cpp
        import numpy as np
        import torch

        key = name, threads
        if key not in self.llama_cpp:
            self.llama_cpp[key] = llama_cpp.Llama(model_path=str(self.ggufs[name]), n_ctx=512, n_batch=512,
                                                  n_threads=threads, n_threads_batch=threads, verbose=False)
        llm = self.llama_cpp[key]
        ids = input_ids[0, mask[0].bool()].tolist()
        llm.reset()
        llm.eval(ids)
        tokens, began = [], None
        for index in range(self.new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            tokens.append(int(logits.argmax()))
            began = began or time.perf_counter()  # the first new token: what the other decoders' clocks start at
            if index + 1 < self.new_tokens:
                llm.eval([tokens[-1]])
        return torch.tensor([tokens]), (time.perf_counter() - began) / (self.new_tokens - 1)

    def variants(self, batch: int, threads: int, draft_step_size: float) -> dict:
        """Name -> (run(), reference name or None): the decoders measured at this batch size."""
        prompts = {"prose": self.prompt(batch_texts(batch))}
        if batch == 1:
            prompts["code"] = self.prompt(CODE[:1])
        drafts = {}
        if self.config.solver_steps(draft_step_size) < self.config.solver_steps(self.config.step_size):
            drafts["step-size drafts"] = dict(draft_step_size=draft_step_size)
        drafts["prompt lookup"] = dict(prompt_lookup_num_tokens=4)
        if "step-size drafts" in drafts:
            drafts["both"] = dict(draft_step_size=draft_step_size, prompt_lookup_num_tokens=4)
        found = {}
        for prompt_name, (ids, mask) in prompts.items():
            plain = f"odegpt eager ({prompt_name})"
            found[plain] = (lambda i=ids, m=mask: self.generate(self.model, i, m), None)
            if prompt_name == "prose":
                found["odegpt compiled"] = (
                    lambda i=ids, m=mask: self.generate(self.compiled_model, i, m, compile=True), plain)
                found["transformers"] = (lambda i=ids, m=mask: self.generate(self.llama, i, m), plain)
                if batch == 1:
                    for name in self.ggufs:
                        found[name] = (lambda n=name, i=ids, m=mask: self.llama_cpp_run(n, threads, i, m), plain)
            for mode, settings in drafts.items():
                found[f"{mode} ({prompt_name})"] = (
                    lambda i=ids, m=mask, s=settings: self.generate(self.model, i, m, **s), plain)
        return found


def measure(runs: Runs, batch: int, threads: int, rounds: int, draft_step_size: float) -> list[dict]:
    """Every variant once to warm up (compiling), then ``rounds`` interleaved rounds: median decode tokens/s, the
    ratio to its reference measured in the same rounds, and whether its tokens are the reference's."""
    import torch

    torch.set_num_threads(threads)
    variants = runs.variants(batch, threads, draft_step_size)
    tokens, seconds, warm = {}, {name: [] for name in variants}, {}
    for name, (run, _) in variants.items():
        began = time.perf_counter()
        tokens[name] = run()[0]
        warm[name] = time.perf_counter() - began
    for index in range(rounds):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in order:
            seconds[name].append(variants[name][0]()[1])
    rows = []
    for name, (_, reference) in variants.items():
        rate = batch / statistics.median(seconds[name])
        row = {"variant": name, "batch": batch, "threads": threads, "tokens_per_s": rate,
               "warmup_s": warm[name], "seconds": seconds[name]}
        if reference is not None:
            paired = [r / s for r, s in zip(seconds[reference], seconds[name])]  # per round: the noise hits both
            row.update(ratio_to_eager=statistics.median(paired), reference=reference,
                       same_tokens=bool(torch.equal(tokens[name], tokens[reference])))
        rows.append(row)
    return rows


def against_first(first: Runs, other: Runs, batch: int, threads: int, rounds: int) -> list[dict]:
    """Per token, ``other`` against ``first`` (a shared model against its source): eager and compiled plain decoding
    of the same prompts, the two models' runs interleaved round after round after one untimed run each (a compiled
    decoder lays its weights out for the batch size), the ratio paired per round."""
    import torch

    torch.set_num_threads(threads)
    prompts = {id(runs): runs.prompt(batch_texts(batch)) for runs in (first, other)}  # each model's own tokenizer
    rows = []
    for decoder, settings in (("eager", {}), ("compiled", {"compile": True})):
        seconds = {id(first): [], id(other): []}
        for runs in (first, other):
            runs.generate(runs.compiled_model if settings else runs.model, *prompts[id(runs)], **settings)
        for index in range(rounds):
            for runs in (first, other) if index % 2 == 0 else (other, first):
                model = runs.compiled_model if settings else runs.model
                seconds[id(runs)].append(runs.generate(model, *prompts[id(runs)], **settings)[1])
        paired = [f / o for f, o in zip(seconds[id(first)], seconds[id(other)])]
        rows.append({"decoder": decoder, "batch": batch, "threads": threads, "ratio": statistics.median(paired),
                     "first_tokens_per_s": batch / statistics.median(seconds[id(first)]),
                     "tokens_per_s": batch / statistics.median(seconds[id(other)])})
    return rows


class SegmentClock:
    """A solve hook that times each solver step (``integrate`` calls ``evaluate`` before a step, ``advance`` after)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.began = 0.0

    def evaluate(self, step, h) -> bool:
        self.began = time.perf_counter()
        return True

    def advance(self, step, h, stepped):
        self.seconds[step.block] = self.seconds.get(step.block, 0.0) + time.perf_counter() - self.began
        return stepped


def where_time_goes(runs: Runs, context: int = 64, tokens: int = 24) -> list[dict]:
    """Per segment of the model (and the read-out): evaluations, weight bytes (distinct and read per token),
    FLOPs and eager milliseconds per token of a batch-1 decode step after ``context`` positions, 1 thread."""
    import torch

    from odegpt.model.solver import relaxation_knots

    torch.set_num_threads(1)
    model, config = runs.model, runs.config
    plan = model.plan(config.step_size)
    blocks = list(model.model.blocks)
    segment_of, index = {}, 0
    for number, segment in enumerate(config.segments):
        for block in range(1 if segment["shared"] else segment["depth"]):
            segment_of[index + block] = f"{number}: {segment['depth']}{'s' if segment['shared'] else 'u'}"
        index += 1 if segment["shared"] else segment["depth"]
    evaluations: dict[int, int] = {}
    knots_read: dict[int, int] = {}  # knot corrections read, over the block's evaluations (1 at a knot's time, else 2)
    for step in plan.steps:
        evaluations[step.block] = evaluations.get(step.block, 0) + plan.method.evaluations
        knots = getattr(blocks[step.block].mlp.down_proj, "knots", 0)
        used = len(relaxation_knots(step.start - blocks[step.block].segment_start, knots)) if knots else 0
        knots_read[step.block] = knots_read.get(step.block, 0) + plan.method.evaluations * used
    cache = model.new_cache()
    cache.bind(plan.step_size, plan.num_slots, plan.method.name)
    clock = SegmentClock()
    ids = torch.randint(0, config.vocab_size, (1, context))
    with torch.inference_mode():
        h = model.embed(ids)
        model.solve(h, plan, model.attention_inputs(h), cache)
        clock.seconds.clear()
        began, readout = time.perf_counter(), 0.0
        token = ids[:, -1:]
        for _ in range(tokens):
            h = model.embed(token)
            h = model.solve(h, plan, model.attention_inputs(h, None, cache.get_seq_length()), cache, hook=clock)
            start = time.perf_counter()
            token = model.read_out(h).argmax(-1)
            readout += time.perf_counter() - start
        total = (time.perf_counter() - began) / tokens
    rows: dict[str, dict] = {}
    context_mean = context + tokens // 2  # attention: scores and weighted values over the cached positions
    for block, count in evaluations.items():
        row = rows.setdefault(segment_of[block], dict(segment=segment_of[block], evaluations=0, distinct_bytes=0,
                                                      read_bytes=0, flops=0, seconds=0.0))
        params = dict(blocks[block].named_parameters())
        base = sum(p.numel() for name, p in params.items() if "relax" not in name)
        relax = [p for name, p in params.items() if "relax" in name]  # (knots, ...) each
        per_knot = sum(p[0].numel() for p in relax)
        read = count * base + knots_read[block] * per_knot
        row["evaluations"] += count
        row["distinct_bytes"] += 4 * (base + sum(p.numel() for p in relax))
        row["read_bytes"] += 4 * read
        row["flops"] += 2 * read + count * 4 * config.num_attention_heads * config.head_dim * context_mean
        row["seconds"] += clock.seconds.get(block, 0.0) / tokens
    head = model.lm_head.weight.numel()
    rows["read-out"] = dict(segment="read-out", evaluations=1, distinct_bytes=4 * head, read_bytes=4 * head,
                            flops=2 * head, seconds=readout / tokens)
    for row in rows.values():
        row["bandwidth_gb_s"] = row["read_bytes"] / row["seconds"] / 1e9 if row["seconds"] else None
        row["gflop_s"] = row["flops"] / row["seconds"] / 1e9 if row["seconds"] else None
    rows["total"] = dict(segment="total", evaluations=sum(r["evaluations"] for r in rows.values()),
                         **{key: sum(r[key] for r in rows.values())
                            for key in ("distinct_bytes", "read_bytes", "flops")}, seconds=total)
    rows["total"].update(bandwidth_gb_s=rows["total"]["read_bytes"] / total / 1e9,
                         gflop_s=rows["total"]["flops"] / total / 1e9)
    return list(rows.values())


def print_comparison(name: str, rows: list[dict]) -> None:
    print(f"\n{name}\n")
    print("| threads | batch | decoder | tokens/s | / eager (paired) | same tokens as eager |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['ratio_to_eager']:.2f}" if "ratio_to_eager" in row else "1"
        same = {True: "yes", False: "no"}.get(row.get("same_tokens"), "-")
        print(f"| {row['threads']} | {row['batch']} | {row['variant']} | {row['tokens_per_s']:.1f} | {ratio} | "
              f"{same} |")


def print_against_first(first: str, name: str, rows: list[dict]) -> None:
    print(f"\n{name} against {first}, per token (paired per round)\n")
    print("| threads | batch | decoder | first tokens/s | tokens/s | ratio |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['threads']} | {row['batch']} | {row['decoder']} | {row['first_tokens_per_s']:.1f} | "
              f"{row['tokens_per_s']:.1f} | {row['ratio']:.2f}x |")


def print_segments(name: str, rows: list[dict]) -> None:
    print(f"\n{name}: batch-1 decode step, eager, 1 thread, per segment\n")
    print("| segment | evaluations | distinct MB | MB read/token | MFLOP/token | ms/token | GB/s | GFLOP/s |\n"
          "|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['segment']} | {row['evaluations']} | {row['distinct_bytes'] / 1e6:.1f} | "
              f"{row['read_bytes'] / 1e6:.1f} | {row['flops'] / 1e6:.0f} | {1e3 * row['seconds']:.2f} | "
              f"{row['bandwidth_gb_s']:.1f} | {row['gflop_s']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="an odegpt model folder (repeatable)")
    parser.add_argument("--output", required=True, help="folder for the exports and results.json")
    parser.add_argument("--threads", default="1,2", help="thread counts (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,8", help="(default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, median (default: %(default)s)")
    parser.add_argument("--draft-step-size", type=float, default=2.0, help="(default: %(default)s)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(threads)))
    import torch
    import transformers

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = {"torch": torch.__version__, "transformers": transformers.__version__, "new_tokens": args.new_tokens,
               "rounds": args.rounds, "models": {}}
    began = time.perf_counter()
    first = None
    for model_dir in args.model:
        name = Path(model_dir).name
        runs = Runs(model_dir, output / name, args.new_tokens)
        first = first or runs
        segments = ", ".join(f"{s['depth']}{'s' if s['shared'] else 'u'}" for s in runs.config.segments)
        title = f"{model_dir} (segments {segments}, step size {runs.config.step_size:g})"
        results["models"][model_dir] = {"comparison": [], "segments": where_time_goes(runs)}
        print_segments(title, results["models"][model_dir]["segments"])
        for t in threads:  # each group printed and saved as it ends: a long run interrupted keeps what it measured
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                rows = measure(runs, batch, t, args.rounds, args.draft_step_size)
                results["models"][model_dir]["comparison"] += rows
                (output / "results.json").write_text(json.dumps(results, indent=1))
                print_comparison(f"{title}, {t} thread(s), batch {batch}", rows)
                print(f"\n({time.perf_counter() - began:.0f} s so far)", flush=True)
                if runs is not first:
                    rows = against_first(first, runs, batch, t, args.rounds)
                    results["models"][model_dir].setdefault("against_first", []).extend(rows)
                    (output / "results.json").write_text(json.dumps(results, indent=1))
                    print_against_first(args.model[0], model_dir, rows)
    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}; {args.new_tokens} new tokens per "
          f"run, median of {args.rounds} interleaved rounds; ratios paired per round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
