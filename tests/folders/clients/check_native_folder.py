"""Run by a client's Python (any transformers odegpt folders claim to support, odegpt NOT installed): load a
native odegpt folder with trust_remote_code and check that what it computes equals what odegpt computed.

    python check_native_folder.py FOLDER EXPECTED.pt

EXPECTED.pt (written by tests/folders/test_clients.py) holds prompts, logits and greedy continuations computed by
odegpt itself without a KV cache and without transformers' generate, so a client that mishandles the cache
cannot agree with it by making the same mistake twice. Prints one line per check and exits non-zero on the
first mismatch.
"""
from __future__ import annotations

import importlib.abc
import sys


class _RefuseOdegpt(importlib.abc.MetaPathFinder):
    """The folder must run where odegpt is not installed: importing it (or the repository) here is an error."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("odegpt", "launcher", "data_pipeline", "tests"):
            raise ImportError(f"odegpt is not installed here: {name}")


sys.meta_path.insert(0, _RefuseOdegpt())

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def check(name: str, ok: bool, detail: object = "") -> None:
    print(f"{'ok' if ok else 'MISMATCH'} {name} {detail if not ok else ''}".rstrip(), flush=True)
    if not ok:
        raise SystemExit(1)


def main(folder: str, expected_path: str) -> None:
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    expected = torch.load(expected_path)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    check("loaded from the folder's own code", type(model).__module__.startswith("transformers_modules"),
          type(model).__module__)
    greedy = dict(do_sample=False, pad_token_id=expected["pad_token_id"])
    for case in expected["cases"]:
        a, prompt, mask = case["step_size"], case["prompt"], case["attention_mask"]
        tag = f"a={a:g} batch={prompt.shape[0]}{' left-padded' if mask is not None else ''}"
        logits = model(prompt, attention_mask=mask, step_size=a).logits
        error = (logits - case["logits"]).abs().max().item()
        check(f"logits {tag}", error < 1e-4, f"max error {error:.3g}")
        for use_cache in (True, False):
            out = model.generate(prompt, attention_mask=mask, max_new_tokens=case["new_tokens"], step_size=a,
                                 use_cache=use_cache, **greedy)
            check(f"greedy use_cache={use_cache} {tag}", torch.equal(out, case["greedy"]),
                  f"\n got      {out.tolist()}\n expected {case['greedy'].tolist()}")
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=case["new_tokens"], step_size=a,
                             draft_step_size=expected["draft_step_size"], draft_tokens=3,
                             return_dict_in_generate=True, **greedy)
        check(f"self-speculative {tag}", torch.equal(out.sequences, case["greedy"]) and out.drafted_tokens > 0,
              f"\n got      {out.sequences.tolist()}\n expected {case['greedy'].tolist()}")
    learned = expected.get("learned_exit")
    if learned is not None:  # the folder's learned exit head, through its own decoders
        never = model.generate(learned["prompt"], exit_learned=-float("inf"), max_new_tokens=10, **greedy)
        check("learned exit that never fires", torch.equal(never, expected["cases"][0]["greedy"]),
              f"\n got      {never.tolist()}\n expected {expected['cases'][0]['greedy'].tolist()}")
        out = model.generate(learned["prompt"], exit_learned=learned["threshold"], kv_fill="copy", max_new_tokens=10,
                             **greedy)
        check("learned exit", torch.equal(out, learned["tokens"]),
              f"\n got      {out.tolist()}\n expected {learned['tokens'].tolist()}")
        out = model.generate(learned["prompt"], exit_learned=learned["threshold"], kv_fill="copy",
                             check_times=learned["check_times"], max_new_tokens=10, return_dict_in_generate=True,
                             **greedy)
        check("learned exit at its check times", torch.equal(out.sequences, learned["checked_tokens"]) and
              out.executed_steps_per_token == learned["checked_steps"],
              f"\n got      {out.sequences.tolist()}, {out.executed_steps_per_token} steps\n expected "
              f"{learned['checked_tokens'].tolist()}, {learned['checked_steps']} steps")
    if expected.get("texts"):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        ids = [tokenizer(text)["input_ids"] for text in expected["texts"]]
        check("tokenizer ids", ids == expected["text_ids"], f"\n got      {ids}\n expected {expected['text_ids']}")
    print("all checks passed", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
