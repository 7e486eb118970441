"""Training with a Hugging Face tokenizer: ``data.tokenizer`` a byte-level BPE folder, its corpus, a few steps in one
process; the run records the tokenizer's fingerprint (a resume compares it), convert copies the tokenizer into the
model folder, and evaluate and generate read it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import HUGGINGFACE, TokenizerInfo, tokenizer_fingerprint
from odegpt.commands.cli import main as odegpt_main
from tests.conftest import hf_tokenizer_folder
from tests.launcher.test_train import TIMEOUT, _plain

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hf-corpus")
    tokenizer = hf_tokenizer_folder(root / "tokenizer")
    prepare(PrepareConfig(["stdlib"], str(tokenizer), str(root / "corpus"), max_files=20, val_fraction=0.2,
                          progress=False))
    return tokenizer, root / "corpus"


def test_a_run_trains_converts_and_generates_with_a_hugging_face_tokenizer(hf_corpus, tmp_path, capsys):
    tokenizer, corpus = hf_corpus
    run = tmp_path / "run"
    process = _plain(run, **{"data.corpora": f"[{corpus}]", "data.tokenizer": str(tokenizer), "model.vocab_size": 400,
                             "train.train_steps": 2, "checkpoint.interval": 2, "eval.interval": 2,
                             "deepspeed.zero_stage": 0})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step_00000002" / "odegpt_state.json").read_text())
    assert state["tokenizer"] == {"path": str(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}

    model = tmp_path / "model"
    assert odegpt_main(["convert", "--checkpoint", str(run / "checkpoints"), "--output", str(model)]) == 0
    assert TokenizerInfo.load(model).kind == HUGGINGFACE
    assert tokenizer_fingerprint(model) == tokenizer_fingerprint(tokenizer)
    config = json.loads((model / "config.json").read_text())
    assert config["eos_token_id"] == 0 and config["vocab_size"] == 400
    capsys.readouterr()
    assert odegpt_main(["evaluate", "--model", str(model), "--data", str(corpus), "--seq-len", "32", "--no-speed",
                        "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]
    assert odegpt_main(["generate", "--model", str(model), "--prompt", "def ", "--max-new-tokens", "8", "--json",
                        "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] >= 1


def test_init_from_compares_hugging_face_fingerprints_as_odegpts(hf_corpus, tmp_path):
    """``train.init_from`` a folder holding the run's Hugging Face tokenizer is accepted; one holding another
    tokenizer (odegpt's, here) is refused, naming both."""
    from data_pipeline.tokenizer import train_tokenizer
    from launcher.config import ConfigError, load_config
    from launcher.data import check_init_from_tokenizer, run_tokenizer
    from odegpt import OdeGPTConfig, OdeGPTForCausalLM
    from odegpt.folders.export import save_native

    tokenizer, corpus = hf_corpus
    (tmp_path / "code.txt").write_text((ROOT / "data_pipeline" / "prepare.py").read_text())
    train_tokenizer([str(tmp_path / "code.txt")], tmp_path / "odegpt-tokenizer", vocab_size=400)
    config = OdeGPTConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          max_position_embeddings=256, segments=[{"depth": 2, "shared": True}])
    for name, folder_tokenizer in (("same", tokenizer), ("other", tmp_path / "odegpt-tokenizer")):
        save_native(OdeGPTForCausalLM(config), tmp_path / name, tokenizer_dir=folder_tokenizer)
    real = [f"data.corpora=[{corpus}]", f"data.tokenizer={tokenizer}", "train.seq_len=64"]
    same = load_config([], [*real, f"train.init_from={tmp_path / 'same'}"])
    check_init_from_tokenizer(same, run_tokenizer(same))
    other = load_config([], [*real, f"train.init_from={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="was trained with another tokenizer"):
        check_init_from_tokenizer(other, run_tokenizer(other))
