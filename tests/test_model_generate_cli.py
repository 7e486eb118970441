"""`odegpt export` and `odegpt generate` on a model folder that carries a real tokenizer."""
import pytest
import torch

from data_pipeline.tokenizer import train_tokenizer
from odegpt import OdeGPTForCausalLM
from odegpt.cli import main as odegpt_main
from odegpt.export import save_native
from tests.conftest import PARTIALLY_SHARED, tiny_config

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    (root / "corpus.txt").write_text(TEXT)
    info = train_tokenizer([str(root / "corpus.txt")], root / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    model = OdeGPTForCausalLM(tiny_config(PARTIALLY_SHARED, vocab_size=info.vocab_size, pad_token_id=info.pad_id,
                                          eos_token_id=info.eos_id, bos_token_id=info.bos_id))
    return save_native(model, root / "model", tokenizer_dir=root / "tokenizer")


def test_generate_from_native_and_unrolled_folders_agree(model_folder, tmp_path, capsys):
    assert (model_folder / "tokenizer.json").is_file() and (model_folder / "odegpt_tokenizer.json").is_file()
    common = ["--prompt", "def add(", "--max-new-tokens", "12"]
    assert odegpt_main(["generate", "--model", str(model_folder), "--step-size", "2", *common]) == 0
    native = capsys.readouterr().out
    assert odegpt_main(["export", "--model", str(model_folder), "--output", str(tmp_path / "llama"),
                        "--unroll", "--step-size", "2"]) == 0
    assert (tmp_path / "llama" / "tokenizer.model").is_file()
    capsys.readouterr()
    assert odegpt_main(["generate", "--model", str(tmp_path / "llama"), *common]) == 0
    unrolled = capsys.readouterr().out
    text = native.rsplit("\n-- ", 1)[0]
    assert text.startswith("def add(") and len(text) > len("def add(")
    assert text == unrolled.rsplit("\n-- ", 1)[0]  # same weights, same step size, same greedy text
    assert "12 tokens in" in native and "step size 2, KV cache" in native


def test_generate_refuses_a_step_size_for_an_unrolled_llama(model_folder, tmp_path, capsys):
    assert odegpt_main(["export", "--model", str(model_folder), "--output", str(tmp_path / "llama"),
                        "--unroll", "--step-size", "1"]) == 0
    assert odegpt_main(["generate", "--model", str(tmp_path / "llama"), "--step-size", "2"]) == 2
    assert "baked in" in capsys.readouterr().out
