"""Native folders on every client: a folder is loaded, as its users load it, by a Python where odegpt is not
installed, and must compute what odegpt computes: logits, greedy tokens with and without the KV cache (against
a reference decoded here with neither cache nor transformers' generate), self-speculative decoding, tokenizer ids.

The client is this Python by default; ``ODEGPT_CLIENT_PYTHONS`` (space-separated interpreters, e.g. venvs with
other transformers releases, as .ci/run makes) adds more."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from odegpt.folders.export import save_native
from tests.conftest import FULLY_SHARED, PARTIALLY_SHARED, left_padded, tiny_model

CHECK_SCRIPT = Path(__file__).parent / "clients" / "check_native_folder.py"
CLIENTS = [sys.executable, *os.environ.get("ODEGPT_CLIENT_PYTHONS", "").split()]
TEXTS = ["def f(x):\n\treturn x  # tabs", "ünïcödé 12345"]
VOCAB = 400


def _client_id(python: str) -> str:
    if python == sys.executable:
        return "this-python"
    return Path(python).parent.parent.name  # the venv's folder name, e.g. .venv-transformers-4.57.6


@torch.no_grad()
def greedy_without_cache(model, prompt: torch.Tensor, mask: torch.Tensor | None, step_size: float,
                         new_tokens: int) -> torch.Tensor:
    """Greedy tokens from a full forward over the whole sequence per token: no cache, no generate()."""
    tokens = prompt
    for _ in range(new_tokens):
        logits = model(tokens, attention_mask=mask, step_size=step_size, use_cache=False).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return tokens


def imported_relaxed_model():
    """A Llama with LongRoPE and biases, retrofitted into 1u,2s,1u with a rank-2 relaxation: every field an imported
    model adds to a folder (biases, rotary parameters, the relaxation's knots), and a rotary scaling the folder
    computes with the client's own transformers. Its switch to the long frequencies lies past these tests' lengths:
    across it, decoding with a cache differs from decoding without one, in transformers' Llama as here (which
    tests/folders/test_importing.py checks against the source)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from odegpt.decoding.generate import with_decoders
    from odegpt.folders.importing import retrofit

    torch.manual_seed(3)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15, attention_bias=True,
        tie_word_embeddings=False, rope_parameters={
            "rope_type": "longrope", "rope_theta": 50000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.0 + 0.7 * i for i in range(8)]})).eval()
    with torch.no_grad():
        for name, parameter in llama.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.2)
    return with_decoders(retrofit(llama, "1u,2s,1u", "average", 2)[0])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """One tokenizer for every folder kind (training it was most of a kind's set-up time)."""
    from data_pipeline.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    train_tokenizer(["stdlib"], folder, vocab_size=VOCAB, max_files=10, max_sentences=3000)
    return folder


@pytest.fixture(scope="module", params=["partially_shared", "fully_shared_tied", "partially_shared_heun",
                                        "imported_relaxed"])
def native_folder(request, tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    """A native folder with a tokenizer, and what odegpt computes with it (the client must agree)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(request.param)
    if request.param == "imported_relaxed":
        model = imported_relaxed_model()
    elif request.param.startswith("partially_shared"):
        model = tiny_model(PARTIALLY_SHARED, vocab_size=VOCAB,
                           solver="heun" if request.param.endswith("heun") else "euler")
    else:  # with a learned exit head (a linear one), which the folder's own decoders use
        model = tiny_model(FULLY_SHARED, vocab_size=VOCAB, tie_word_embeddings=True, seed=1, exit_head=0)
    folder = save_native(model, root / "native", tokenizer_dir=tokenizer_dir)
    torch.manual_seed(2)
    single = torch.randint(4, VOCAB, (1, 7))
    batch, mask = left_padded([torch.randint(4, VOCAB, (n,)) for n in (6, 3)])
    cases = []
    for step_size, prompt, attention_mask in ((1.0, single, None), (2.0, single, None), (1.0, batch, mask),
                                              (2.0, batch, mask)):
        with torch.no_grad():
            logits = model(prompt, attention_mask=attention_mask, step_size=step_size).logits
        cases.append(dict(step_size=step_size, prompt=prompt, attention_mask=attention_mask, logits=logits,
                          new_tokens=10, greedy=greedy_without_cache(model, prompt, attention_mask, step_size, 10)))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    learned = None
    if model.exit_head is not None:  # a threshold at the median score: some tokens exit, some do not
        with torch.no_grad():
            states = model(single, use_cache=False, output_hidden_states=True).hidden_states
            threshold = float(model.exit_score(states[2], 2.0).median())
            tokens = model.generate(single, exit_learned=threshold, kv_fill="copy", max_new_tokens=10,
                                    do_sample=False, pad_token_id=0)
            at_two = model.generate(single, exit_learned=threshold, kv_fill="copy", check_times=(2.0,),
                                    max_new_tokens=10, do_sample=False, pad_token_id=0,
                                    return_dict_in_generate=True)  # checked at a calibration's check times only
        learned = dict(threshold=threshold, prompt=single, tokens=tokens, check_times=(2.0,),
                       checked_tokens=at_two.sequences, checked_steps=at_two.executed_steps_per_token)
    expected = dict(cases=cases, pad_token_id=0, draft_step_size=4.0, texts=TEXTS, learned_exit=learned,
                    text_ids=[tokenizer(text)["input_ids"] for text in TEXTS])
    torch.save(expected, root / "expected.pt")
    return folder, root / "expected.pt"


@pytest.mark.parametrize("python", CLIENTS, ids=_client_id)
def test_native_folder_computes_what_odegpt_computes_on_the_client(native_folder, python, tmp_path):
    folder, expected = native_folder
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run([python, str(CHECK_SCRIPT), str(folder), str(expected)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in result.stdout
    # cached and uncached greedy, and self-speculative, for each of the 4 cases
    assert result.stdout.count("ok greedy use_cache=True") == 4 and result.stdout.count("ok self-speculative") == 4
