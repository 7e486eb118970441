"""Inputs that used to pass silently: binary files named .txt, truncated tokenizer records, edited manifests,
checkpoints with non-finite weights."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from odegpt.commands.cli import main as odegpt_main


def _odegpt(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = odegpt_main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ---- 6, 7. a binary file named .txt; a truncated tokenizer record; an edited manifest -----------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    (root / "corpus.txt").write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40)
    train_tokenizer([str(root / "corpus.txt")], root / "tokenizer", vocab_size=300)
    return root / "tokenizer"


def _prepare(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = odegpt_main(["prepare", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_binary_file_named_txt_is_skipped_named_and_counted(tokenizer_dir, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "code.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    (inputs / "latin1.txt").write_bytes("the caf\xe9 on the corner opens at nine every morning\n".encode("latin-1") * 20)
    (inputs / "blob.txt").write_bytes(os.urandom(100_000))
    code, out, err = _prepare(capsys, "--input", inputs, "--tokenizer", tokenizer_dir, "--output", tmp_path / "c")
    assert code == 0, err
    assert f"skipped a document of {inputs / 'blob.txt'}" in err and "not UTF-8 text" in err
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["skipped"]["undecodable_documents"] == 1
    assert manifest["skipped"]["undecodable_files"] == [str(inputs / "blob.txt")]
    assert manifest["totals"]["documents"] == 2  # the Latin-1 text (a few bad bytes) is kept, repaired
    assert manifest["repaired"]["documents_with_undecodable_bytes"] == 1
    assert "1 not text (binary)" in out


def test_a_truncated_tokenizer_record_and_an_edited_manifest_are_named(tokenizer_dir, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    code, _, err = _prepare(capsys, "--input", tmp_path / "text.txt", "--tokenizer", tokenizer_dir,
                            "--output", tmp_path / "c")
    assert code == 0, err
    manifest_file = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["tokenizer"]["vocab_size"] = 100
    manifest_file.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert odegpt_main(["inspect", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "does not match its tokenizer" in err and "vocab_size 100 (tokenizer: 300)" in err, err

    truncated = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, truncated)
    record = truncated / "odegpt_tokenizer.json"
    record.write_text(record.read_text()[:40])
    code, _, err = _prepare(capsys, "--input", tmp_path / "text.txt", "--tokenizer", truncated,
                            "--output", tmp_path / "d")
    assert code == 1 and f"{record} is not valid JSON" in err and err.count("\n") == 1, err


def test_convert_refuses_a_checkpoint_with_nonfinite_weights(tmp_path, capsys, monkeypatch):
    """Consolidated weights are checked before the model folder is written (the checkpoint itself verified)."""
    import torch

    from launcher import checkpointing, convert

    checkpoint = checkpointing.Checkpoint(tmp_path / "checkpoints", "step_00000002", {"config": {}})
    weights = {"model.embed_tokens.weight": torch.zeros(4, 2),
               "model.norm.weight": torch.tensor([1.0, float("inf")])}
    monkeypatch.setattr(convert, "_locate", lambda path: checkpoint)
    monkeypatch.setattr(convert, "_load_weights", lambda located: weights)
    code, err = _odegpt(capsys, "convert", "--checkpoint", tmp_path / "checkpoints", "--output", tmp_path / "model")
    assert code == 2 and err.count("\n") == 1, err
    assert f"checkpoint {checkpoint.path} has non-finite weights (NaN or infinity): model.norm.weight (1 of 2)" in err
    assert not (tmp_path / "model").exists()
