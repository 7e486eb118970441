"""Any Hugging Face fast tokenizer through the data pipeline: its record (vocabulary, special ids, fingerprint), the
end-of-document token it must have, prepare (byte-identical for any --workers, long documents cut only where the
tokens stay those of the whole) and inspect."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_pipeline import prepare as prepare_module
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import PrepareConfig, exact_segments, prepare, segments
from data_pipeline.readers import stdlib_files
from data_pipeline.tokenizer import (
    HUGGINGFACE,
    ODEGPT,
    TokenizerInfo,
    fingerprint_file,
    tokenizer_fingerprint,
    tokenizer_kind,
    train_tokenizer,
)
from odegpt.commands.cli import main as odegpt_main
from tests.conftest import HF_EOS, hf_tokenizer_folder

CODE = "".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:12])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return hf_tokenizer_folder(tmp_path_factory.mktemp("hf") / "tokenizer", CODE[:60_000])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A few documents: code, text with a literal EOS, runs of spaces and line breaks, unicode, and one long one."""
    folder = tmp_path_factory.mktemp("inputs")
    for i, f in enumerate(stdlib_files()[:30]):
        (folder / f"doc{i:02d}.py").write_text(Path(f).read_text(encoding="utf-8", errors="replace"))
    (folder / "tricky.txt").write_text(f"a literal {HF_EOS} is text\n\n\n   x\t\ty  Ünïcödé 中文 🙂\r\n")
    return folder


def _encoded(tokenizer_dir: Path, text: str) -> list[int]:
    return AutoTokenizer.from_pretrained(tokenizer_dir)(text, add_special_tokens=False)["input_ids"]


def test_a_hugging_face_tokenizer_is_described_like_odegpts(hf_dir, tmp_path):
    info = TokenizerInfo.load(hf_dir)
    reference = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer_kind(hf_dir) == info.kind == HUGGINGFACE and info.model_type == "bpe"
    assert info.vocab_size == len(reference) == 400 and info.eos_id == reference.eos_token_id == 0
    assert info.bos_id is None and info.pad_id is None
    assert info.fingerprint == tokenizer_fingerprint(hf_dir)

    # The fingerprint is of what the files say, not of how they are written ...
    moved = tmp_path / "reformatted"
    shutil.copytree(hf_dir, moved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        document = json.loads((moved / name).read_text())
        if name == "tokenizer_config.json":
            document["tokenizer_class"] = "PreTrainedTokenizerFast"  # what odegpt writes for older clients
            document["model_max_length"] = 512
        (moved / name).write_text(json.dumps(document, indent=4, sort_keys=True))
    assert tokenizer_fingerprint(moved) == info.fingerprint
    # ... and another merge, or another end-of-document token, is another tokenizer.
    document = json.loads((moved / "tokenizer.json").read_text())
    document["model"]["merges"] = document["model"]["merges"][:-1]
    (moved / "tokenizer.json").write_text(json.dumps(document))
    assert tokenizer_fingerprint(moved) != info.fingerprint
    shutil.copy(hf_dir / "tokenizer.json", moved / "tokenizer.json")
    config = json.loads((moved / "tokenizer_config.json").read_text())
    (moved / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "def"}))
    assert tokenizer_fingerprint(moved) != info.fingerprint


def test_odegpts_fingerprint_is_what_it_was(tmp_path):
    """The fingerprint of an odegpt tokenizer is still the blake2b of tokenizer.model: corpora and checkpoints
    recorded before keep matching."""
    (tmp_path / "corpus.txt").write_text(CODE[:20_000])
    info = train_tokenizer([str(tmp_path / "corpus.txt")], tmp_path / "tok", vocab_size=600)
    assert tokenizer_kind(tmp_path / "tok") == ODEGPT == TokenizerInfo.load(tmp_path / "tok").kind
    assert tokenizer_fingerprint(tmp_path / "tok") == info.fingerprint == fingerprint_file(tmp_path / "tok" /
                                                                                          "tokenizer.model")
    assert "kind" not in json.loads((tmp_path / "tok" / "odegpt_tokenizer.json").read_text())


def test_prepare_is_byte_identical_for_any_worker_count_and_encodes_as_transformers(hf_dir, inputs, tmp_path, capsys):
    outputs = {}
    for workers in (1, 2):
        outputs[workers] = tmp_path / f"w{workers}"
        manifest = prepare(PrepareConfig([str(inputs)], str(hf_dir), str(outputs[workers]), workers=workers,
                                         val_fraction=0.2, shard_tokens=20_000, chunk_chars=8_000, progress=False))
    files = [{p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx")}
             for out in outputs.values()]
    assert files[0] == files[1] and len(files[0]) >= 6  # several shards, both splits
    assert manifest.tokenizer["kind"] == HUGGINGFACE and manifest.tokenizer["eos_id"] == 0
    assert manifest.tokenizer["fingerprint"] == tokenizer_fingerprint(hf_dir) and manifest.dtype == "uint16"

    # Every document's ids are transformers' ids of it (no special token added), then the EOS; the literal EOS text
    # in a document is encoded as the tokenizer encodes it.
    documents = sorted(inputs.iterdir())
    ids = {split: np.concatenate([np.fromfile(outputs[1] / f"{split}-{shard.index:05d}.bin", dtype=np.uint16)
                                  for shard in manifest.shards if split in shard.splits]) for split in ("train", "val")}
    expected = [token for doc in documents for token in _encoded(hf_dir, doc.read_bytes().decode()) + [0]]
    assert sorted(ids["train"].tolist() + ids["val"].tolist()) == sorted(expected)
    tricky = _encoded(hf_dir, (inputs / "tricky.txt").read_bytes().decode())
    as_text = {split: " ".join(map(str, ids[split].tolist())) for split in ids}
    assert any(" ".join(map(str, tricky)) in text for text in as_text.values())

    assert odegpt_main(["inspect", str(outputs[2])]) == 0
    out = capsys.readouterr().out
    assert f"(huggingface bpe, vocab 400, eos 0, fingerprint {manifest.tokenizer['fingerprint']})" in out
    assert f"tokenizer  matches {hf_dir.resolve()}" in out


def test_a_tokenizer_without_an_end_of_document_token_is_one_line(tmp_path, inputs, capsys):
    bare = hf_tokenizer_folder(tmp_path / "no-eos", CODE[:20_000], eos_token=None)
    assert odegpt_main(["prepare", "--input", str(inputs), "--tokenizer", str(bare), "--output",
                        str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"tokenizer {bare} has no end-of-document token (eos_token)" in err and "tokenizer_config.json" in err
    assert not (tmp_path / "out").exists()
    (bare / "tokenizer.json").write_text("{ truncated")
    assert odegpt_main(["prepare", "--input", str(inputs), "--tokenizer", str(bare), "--output",
                        str(tmp_path / "out")]) == 2
    assert f"{bare / 'tokenizer.json'} is not a readable JSON file" in capsys.readouterr().err


def test_a_line_break_cut_is_not_exact_for_byte_level_bpe_and_exact_segments_cut_where_it_is(hf_dir):
    encode = lambda text: _encoded(hf_dir, text)  # noqa: E731
    # SentencePiece's rule (cut after a line break) splits a line break from the indentation after it, which GPT-2's
    # pre-tokenizer keeps in one piece with it: for this tokenizer, the tokens change.
    text = "def f(x):\n        return x\n"
    cut = text.index("\n") + 1
    assert encode(text) != encode(text[:cut]) + encode(text[cut:])

    code = CODE[:40_000]
    line = " ".join(f"word{i % 97}   x{i},\n\n   y" for i in range(3000))  # spaces, blank lines, indentation
    for document in (code, line):
        for size in (500, 2000):
            pieces = list(exact_segments(document, encode, size))
            assert "".join(pieces) == document and len(pieces) > 3
            assert [token for piece in pieces for token in encode(piece)] == encode(document)
            assert max(map(len, pieces)) <= size
    naive = list(segments(code, 500))
    assert [token for piece in naive for token in encode(piece)] != encode(code)  # the SentencePiece rule is not


def test_a_tokenizer_that_changes_the_texts_it_is_given_is_cut_only_where_that_changes_nothing(tmp_path):
    """ByteLevel with add_prefix_space puts a space before a text that does not start with one: a cut after a line
    break is then never exact, a cut before a space still is. A tokenizer whose every cut changes the tokens (here
    one that counts characters) is not cut at all."""
    prefixed = hf_tokenizer_folder(tmp_path / "prefixed", CODE[:20_000], add_prefix_space=True)
    encode = lambda text: _encoded(prefixed, text)  # noqa: E731
    document = CODE[:6_000]
    pieces = list(exact_segments(document, encode, 1000))
    assert len(pieces) > 3 and all(piece.startswith(" ") for piece in pieces[1:])
    assert [token for piece in pieces for token in encode(piece)] == encode(document)
    assert list(exact_segments(document, lambda text: [len(text)], 1000)) == [document]


def test_prepare_segments_a_huge_document_with_the_tokens_of_the_whole(hf_dir, tmp_path, monkeypatch):
    document = CODE[:30_000] + " ".join(f"word{i % 97}   x{i}" for i in range(3000)) + "b64:" + "Zm9v" * 3000
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "huge.txt").write_text(document)
    monkeypatch.setattr(prepare_module, "SEGMENT_CHARS", 4096)
    manifest = prepare(PrepareConfig([str(tmp_path / "inputs")], str(hf_dir), str(tmp_path / "out"), progress=False))
    tokens = np.fromfile(tmp_path / "out" / "train-00000.bin", dtype=manifest.dtype)
    assert len(document) > 15 * 4096
    assert tokens.tolist() == _encoded(hf_dir, document) + [0]
    assert Manifest.load(tmp_path / "out").totals["documents"] == 1
