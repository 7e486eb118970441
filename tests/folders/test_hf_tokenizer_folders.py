"""A Hugging Face tokenizer through the model folders: exports (native, unrolled, GGUF with a byte-level BPE
vocabulary), evaluate and generate, imports that carry every tokenizer file, and GGUF files as import sources (exact,
their tokenizer carried, checked before they are read). The GGUF path checks the tokenizer as generate does."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import HUGGINGFACE, TokenizerInfo, tokenizer_fingerprint, train_tokenizer
from odegpt import OdeGPTForCausalLM
from odegpt.commands.cli import main as odegpt_main
from odegpt.folders.export import save_gguf, save_native, unroll_to_llama
from odegpt.folders.model_folder import load_model
from tests.conftest import PARTIALLY_SHARED, hf_tokenizer_folder, tiny_config

ROOT = Path(__file__).resolve().parents[2]
TEXT = "".join((ROOT / name).read_text() for name in ("odegpt/folders/export.py", "data_pipeline/prepare.py"))
PROMPT = "def check(model, "


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = odegpt_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A byte-level BPE tokenizer, a model folder with it (a head size that is not hidden_size / heads), a small
    text input and a corpus prepared with the tokenizer."""
    root = tmp_path_factory.mktemp("hf-folders")
    tokenizer = hf_tokenizer_folder(root / "tokenizer", TEXT)
    torch.manual_seed(0)
    model = OdeGPTForCausalLM(tiny_config(PARTIALLY_SHARED, vocab_size=400, head_dim=24, eos_token_id=0,
                                          pad_token_id=None)).eval()
    save_native(model, root / "model", tokenizer_dir=tokenizer)
    (root / "text").mkdir()
    for name in ("odegpt/folders/importing.py", "odegpt/folders/model_folder.py", "launcher/data.py"):
        (root / "text" / Path(name).name).write_text((ROOT / name).read_text())
    prepare(PrepareConfig([str(root / "text")], str(tokenizer), str(root / "corpus"), val_fraction=0.5,
                          progress=False))
    return {"root": root, "tokenizer": tokenizer, "model": root / "model", "text": root / "text",
            "corpus": root / "corpus"}


def test_exports_carry_the_tokenizer_and_generate_the_same_text(folders, tmp_path, capsys):
    model, tokenizer = folders["model"], folders["tokenizer"]
    assert TokenizerInfo.load(model).kind == HUGGINGFACE
    assert tokenizer_fingerprint(model) == tokenizer_fingerprint(tokenizer)
    completions = {}
    for folder in (model, tmp_path / "native", tmp_path / "unrolled"):
        if folder != model:
            fmt = folder.name
            assert _run(capsys, "export", "--model", model, "--output", folder, "--format", fmt)[0] == 0
            assert (folder / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
            assert tokenizer_fingerprint(folder) == tokenizer_fingerprint(tokenizer)
        code, out, err = _run(capsys, "generate", "--model", folder, "--prompt", PROMPT, "--max-new-tokens", 12,
                              "--json", "--threads", 1)
        assert code == 0, err
        completions[folder.name] = json.loads(out)["completion"]
    assert len(set(completions.values())) == 1 and completions["model"]


def test_evaluate_reads_corpora_and_text_with_the_folders_tokenizer_and_refuses_another(folders, tmp_path, capsys):
    model = folders["model"]
    code, out, err = _run(capsys, "evaluate", "--model", model, "--data", folders["corpus"], folders["text"],
                          "--seq-len", 32, "--step-sizes", "1,2", "--no-speed", "--json", "--threads", 1)
    assert code == 0, err
    assert all(np.isfinite(row["perplexity"]) for row in json.loads(out)["results"])
    (tmp_path / "corpus.txt").write_text(TEXT)
    train_tokenizer([str(tmp_path / "corpus.txt")], tmp_path / "odegpt-tokenizer", vocab_size=400)
    prepare(PrepareConfig([str(folders["text"])], str(tmp_path / "odegpt-tokenizer"), str(tmp_path / "other"),
                          val_fraction=0.5, progress=False))
    code, _, err = _run(capsys, "evaluate", "--model", model, "--data", tmp_path / "other", "--seq-len", 32,
                        "--no-speed")
    assert code == 2 and "was tokenized with tokenizer" in err and len(err.strip().splitlines()) == 1


def _field(reader, name):
    return reader.fields[name].contents()


def test_gguf_writes_the_byte_level_vocabulary_and_imports_back_exactly(folders, tmp_path, capsys):
    """The GGUF of a byte-level BPE model: llama.cpp's gpt2 tokenizer with its merges and GPT-2's pre-tokenizer, the
    head size written; imported back, it computes the unrolled Llama's logits, and its tokenizer (converted by
    transformers from the GGUF) prepares the same tokens as the original."""
    import gguf

    model, tokenizer = folders["model"], folders["tokenizer"]
    assert _run(capsys, "export", "--model", model, "--output", tmp_path / "gguf", "--format", "gguf",
                "--dtype", "float32", "--step-size", 1)[0] == 0
    path = tmp_path / "gguf" / "odegpt-a1-f32.gguf"
    reader = gguf.GGUFReader(str(path))
    document = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = sorted(document["model"]["vocab"].items(), key=lambda item: item[1])
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.tokens") == [token for token, _ in vocab]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                       for m in document["model"]["merges"]]
    assert _field(reader, "tokenizer.ggml.token_type")[0] == gguf.TokenType.CONTROL  # <|endoftext|>
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "llama.attention.key_length") == _field(reader, "llama.attention.value_length") == 24

    code, out, err = _run(capsys, "import", "--model", path, "--output", tmp_path / "imported")
    assert code == 0, err
    imported = load_model(tmp_path / "imported")
    llama = unroll_to_llama(load_model(model), 1.0)
    tokens = torch.randint(0, 400, (2, 24))
    torch.testing.assert_close(imported(tokens, use_cache=False).logits, llama(tokens).logits, rtol=0, atol=1e-4)
    assert (tmp_path / "imported" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "imported" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "is_local" not in config
    code, _, err = _run(capsys, "prepare", "--input", folders["text"], "--tokenizer", tmp_path / "imported",
                        "--output", tmp_path / "corpus", "--val-fraction", 0.5, "--no-progress")
    assert code == 0, err
    for name in ("train-00000.bin", "val-00000.bin"):
        assert (tmp_path / "corpus" / name).read_bytes() == (folders["corpus"] / name).read_bytes()


def test_the_gguf_path_checks_the_tokenizer_before_any_work(folders, tmp_path, capsys):
    from tests.conftest import TEXT as CODE
    from tests.conftest import tokenized_tiny_model

    # odegpt's tokenizer.model swapped for another: generate refuses the folder, and so does the GGUF export.
    native, _ = tokenized_tiny_model(tmp_path, CODE)
    save_native(native, tmp_path / "native", tokenizer_dir=tmp_path / "tokenizer")
    train_tokenizer([str(tmp_path / "corpus.txt")], tmp_path / "other", vocab_size=320)
    shutil.copy(tmp_path / "other" / "tokenizer.model", tmp_path / "native" / "tokenizer.model")
    for argv in (["generate", "--model", tmp_path / "native"],
                 ["export", "--model", tmp_path / "native", "--output", tmp_path / "o1", "--format", "gguf"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "is not the tokenizer its odegpt_tokenizer.json records" in err, err
    # A tokenizer_config.json that does not parse, in any export: one line, nothing written.
    broken = tmp_path / "broken"
    shutil.copytree(folders["model"], broken)
    (broken / "tokenizer_config.json").write_text('{"eos_token": ')
    for fmt in ("gguf", "native"):
        code, _, err = _run(capsys, "export", "--model", broken, "--output", tmp_path / "o2", "--format", fmt)
        assert code == 2 and f"{broken / 'tokenizer_config.json'} is not a readable JSON file" in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()
    # A pre-tokenizer llama.cpp has no exact twin of (a space before every text): refused, saying why.
    prefixed = tmp_path / "prefixed"
    save_native(load_model(folders["model"]), prefixed,
                tokenizer_dir=hf_tokenizer_folder(tmp_path / "prefixed-tokenizer", TEXT, add_prefix_space=True))
    code, _, err = _run(capsys, "export", "--model", prefixed, "--output", tmp_path / "o3", "--format", "gguf")
    assert code == 2 and "cannot write the tokenizer of" in err and "for llama.cpp exactly" in err, err
    assert "none of those llama.cpp knows exactly" in err and not (tmp_path / "o3").exists()


def test_a_gguf_source_is_checked_from_its_metadata_before_it_is_read(folders, tmp_path, capsys, monkeypatch):
    import odegpt.folders.gguf_source as gguf_source

    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(100))
    code, _, err = _run(capsys, "import", "--model", tmp_path / "junk.gguf", "--output", tmp_path / "out")
    assert code == 2 and "is not a readable GGUF file" in err and not (tmp_path / "out").exists()
    path = save_gguf(load_model(folders["model"]), tmp_path / "gguf", 1.0, folders["model"], "f32")

    class Small:
        total = 100_000  # bytes: less than the model's float32 weights

    monkeypatch.setattr(gguf_source.psutil, "virtual_memory", lambda: Small())
    code, _, err = _run(capsys, "import", "--model", path, "--output", tmp_path / "out")
    assert code == 2 and "GiB once dequantized to float32), more than this machine's" in err, err
    assert not (tmp_path / "out").exists()


def test_an_import_carries_every_tokenizer_file_so_prepare_reads_the_model_folder(folders, tmp_path, capsys):
    from tokenizers import Tokenizer

    source = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(folders["tokenizer"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(source)
    Tokenizer.from_file(str(folders["tokenizer"] / "tokenizer.json")).model.save(str(source))  # vocab.json, merges.txt
    (source / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    files = sorted(p.name for p in source.iterdir() if p.name not in ("config.json", "model.safetensors",
                                                                      "generation_config.json"))
    assert {"vocab.json", "merges.txt", "chat_template.jinja", "special_tokens_map.json"} <= set(files)

    code, _, err = _run(capsys, "import", "--model", source, "--output", tmp_path / "imported")
    assert code == 0, err
    for name in files:
        if name != "tokenizer_config.json":  # made readable by older clients, the encoding the same
            assert (tmp_path / "imported" / name).read_bytes() == (source / name).read_bytes(), name
    assert tokenizer_fingerprint(tmp_path / "imported") == tokenizer_fingerprint(source)
    code, out, err = _run(capsys, "prepare", "--input", folders["text"], "--tokenizer", tmp_path / "imported",
                          "--output", tmp_path / "corpus", "--no-progress")
    assert code == 0 and "prepared" in out, err

    (source / "tokenizer_config.json").write_text("[1, 2]")  # a bad tokenizer config: one line, before any work
    code, _, err = _run(capsys, "import", "--model", source, "--output", tmp_path / "again")
    assert code == 2 and "tokenizer_config.json is not a tokenizer file" in err and not (tmp_path / "again").exists()
