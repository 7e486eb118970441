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
    (inputs / "latin1.txt").write_bytes(
        "the caf\xe9 on the corner opens at nine every morning\n".encode("latin-1") * 20)
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
    assert code == 2 and f"{record} is not valid JSON" in err and err.count("\n") == 1, err


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


# ---- the second list: corpora that read wrong numbers silently ---------------------------------------------

@pytest.fixture()
def small_corpus(tokenizer_dir, tmp_path, capsys):
    """A small prepared corpus (training and validation splits), in its own folder per test."""
    text = tmp_path / "text"
    text.mkdir()
    for i in range(6):
        (text / f"{i}.txt").write_text(
            f"def add_{i}(a, b):\n    return a + b * {i}\n\nclass Point{i}:\n    x = {i}\n" * 30)
    code, _, err = _prepare(capsys, "--input", text, "--tokenizer", tokenizer_dir, "--output", tmp_path / "corpus",
                            "--shard-tokens", "1500", "--val-fraction", "0.2")
    assert code == 0, err
    return tmp_path / "corpus"


def _edit_manifest(corpus, edit) -> None:
    path = corpus / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, named", [
    (lambda m: m.update(dtype="float16"), "dtype 'float16' is not a token dtype"),
    (lambda m: m["shards"].append(m["shards"][0]), "is listed twice"),
    (lambda m: m["shards"][0].update(index="../.."), "its index must be an integer"),
    (lambda m: m["shards"][0].update(directory="../elsewhere"), "must be a folder inside the corpus"),
    (lambda m: m["shards"][0]["splits"]["train"].update(tokens="many"), "needs integer tokens"),
    (lambda m: m["tokenizer"].update(vocab_size=70000), "holds ids below 65536"),
    (lambda m: m["shards"][0].pop("splits"), "is not a manifest odegpt wrote"),
])
def test_a_manifest_that_would_misread_the_tokens_is_refused_in_one_line(small_corpus, capsys, edit, named):
    _edit_manifest(small_corpus, edit)
    code, err = _odegpt(capsys, "inspect", small_corpus)
    assert code == 1 and named in err and len(err.strip().splitlines()) == 1, err


def test_out_of_vocabulary_ids_are_found_when_the_corpus_is_first_verified(small_corpus):
    import numpy as np

    from data_pipeline.datasets import build_datasets
    from data_pipeline.shards import ShardError, file_checksum

    shard = small_corpus / "train-00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[5] = 299 + 7  # past the vocabulary of 300, with the checksum rewritten to match (an edit, not rot)
    tokens.tofile(shard)
    _edit_manifest(small_corpus, lambda m: m["shards"][0]["splits"]["train"].update(bin_checksum=file_checksum(shard)))
    with pytest.raises(ShardError, match="holds token id 306, outside the tokenizer's vocabulary of 300"):
        build_datasets([str(small_corpus)], None, 16, 0, 10)


def test_a_damaged_shuffle_index_is_rebuilt_not_read(small_corpus, capsys):
    from data_pipeline.datasets import build_datasets

    first, _ = build_datasets([str(small_corpus)], None, 16, 0, 50)
    expected = [first[i].tolist() for i in range(len(first))]
    (index,) = (small_corpus / "index_cache").glob("shuffle-*.npy")
    for damage in (lambda raw: bytes(len(raw)),  # zeroed, header and all
                   lambda raw: raw[:128] + bytes(len(raw) - 128)):  # the header kept, every sample id 0
        index.write_bytes(damage(index.read_bytes()))
        capsys.readouterr()
        again, _ = build_datasets([str(small_corpus)], None, 16, 0, 50)
        assert [again[i].tolist() for i in range(len(again))] == expected
        assert f"index cache {index} is damaged" in capsys.readouterr().err


def test_nul_bytes_are_binary_and_utf16_with_a_byte_order_mark_is_text(tokenizer_dir, tmp_path, capsys):
    from data_pipeline.tokenizer import load_tokenizer

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "nul.txt").write_bytes(bytes(1_000_000))
    text = "def add(a, b):\n    return a + b\n" * 20
    (inputs / "utf16.txt").write_bytes(text.encode("utf-16"))  # with its byte-order mark
    (inputs / "utf16-no-bom.txt").write_bytes(text.encode("utf-16-le"))
    code, out, err = _prepare(capsys, "--input", inputs, "--tokenizer", tokenizer_dir, "--output", tmp_path / "c",
                              "--val-fraction", "0")
    assert code == 0, err
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert sorted(manifest["skipped"]["undecodable_files"]) == [str(inputs / "nul.txt"),
                                                                 str(inputs / "utf16-no-bom.txt")]
    import numpy as np

    ids = np.fromfile(tmp_path / "c" / "train-00000.bin", dtype=np.uint16).tolist()
    assert load_tokenizer(tokenizer_dir).decode([i for i in ids if i > 3]) == text  # no "d\x00e\x00"


def test_a_symbolic_link_out_of_the_input_folder_is_named(tokenizer_dir, tmp_path, capsys):
    inputs, elsewhere = tmp_path / "inputs", tmp_path / "elsewhere.txt"
    inputs.mkdir()
    (inputs / "code.txt").write_text("def add(a, b):\n    return a + b\n" * 30)
    elsewhere.write_text("class Point:\n    x = 0\n" * 30)
    (inputs / "link.txt").symlink_to(elsewhere)
    code, _, err = _prepare(capsys, "--input", inputs, "--tokenizer", tokenizer_dir, "--output", tmp_path / "c")
    assert code == 0, err
    assert f"input {inputs / 'link.txt'} is a symbolic link to {elsewhere}, outside {inputs}" in err
    assert "code.txt is a symbolic" not in err


def test_a_finished_shard_replaced_by_garbage_is_redone_on_rerun(small_corpus, tokenizer_dir, capsys):
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    (small_corpus / "manifest.json").unlink()  # as if killed after its shards were finished
    shard = small_corpus / "train-00000.bin"
    shard.write_bytes(os.urandom(shard.stat().st_size))
    code, _, err = _prepare(capsys, "--input", small_corpus.parent / "text", "--tokenizer", tokenizer_dir,
                            "--output", small_corpus, "--shard-tokens", "1500", "--val-fraction", "0.2")
    assert code == 0, err
    rerun = json.loads((small_corpus / "manifest.json").read_text())
    assert [s["splits"] for s in rerun["shards"]] == [s["splits"] for s in manifest["shards"]]
    from data_pipeline.shards import verify_corpus

    verify_corpus(small_corpus)


def test_json_nested_too_deeply_is_one_line(tokenizer_dir, tmp_path, capsys):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    code, _, err = _prepare(capsys, "--input", tmp_path / "deep.jsonl", "--tokenizer", tokenizer_dir,
                            "--output", tmp_path / "c")
    assert code == 2 and "nested too deeply" in err and len(err.strip().splitlines()) == 1, err


# ---- outputs: a corpus is written only where no other command's files are ----------------------------------

@pytest.mark.parametrize("holds", ["shards", "model", "run"])
def test_prepare_writes_no_corpus_files_over_another_folder(tokenizer_dir, tmp_path, capsys, holds):
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    output = tmp_path / "out"
    output.mkdir()
    files = {"shards": {"train-00000.bin": "old tokens", "train-00000.idx": "old offsets"},
             "model": {"config.json": json.dumps({"model_type": "odegpt"}), "model.safetensors": "weights"},
             "run": {"config.json": json.dumps({"model": {}, "train": {}, "data": {}, "run": {}}),
                     "metrics.jsonl": "{}"}}[holds]
    for name, text in files.items():
        (output / name).write_text(text)
    code, _, err = _prepare(capsys, "--input", tmp_path / "text.txt", "--tokenizer", tokenizer_dir, "--output", output)
    assert code == 2 and err.count("\n") == 1 and "prepare writes a corpus only into a new or empty folder" in err, err
    assert sorted(p.name for p in output.iterdir()) == sorted(files)  # nothing written, nothing replaced
    assert all((output / name).read_text() == text for name, text in files.items())


def test_tokenizer_is_never_written_into_a_model_folder(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "odegpt"}))
    (model / "tokenizer.json").write_text("the model's own")
    code = odegpt_main(["tokenizer", "--input", str(tmp_path / "text.txt"), "--vocab-size", "300", "--output",
                        str(model), "--no-progress"])
    assert code == 2 and "a tokenizer is written only into a new or empty folder" in capsys.readouterr().err
    assert (model / "tokenizer.json").read_text() == "the model's own"


def test_a_merge_killed_while_writing_its_manifest_leaves_nothing_the_next_merge_trips_on(tokenizer_dir, tmp_path,
                                                                                        capsys):
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    job = tmp_path / "job"
    code, _, err = _prepare(capsys, "--input", tmp_path / "text.txt", "--tokenizer", tokenizer_dir, "--output", job,
                            "--num-tasks", "1", "--task-index", "0")
    assert code == 0, err
    (job / ".manifest.json.tmp4242").write_text('{"half": ')  # what write_atomic leaves when killed mid-write
    code, _, err = _prepare(capsys, "--merge", "--output", job)
    assert code == 0, err
    assert sorted(p.name for p in job.iterdir() if p.name != ".odegpt.lock") == ["manifest.json", "part-00000-of-00001"]
