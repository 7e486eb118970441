"""GGUF export (odegpt export --format gguf): read back with the gguf package's own reader, the tensors are the
unrolled Llama's (q/k rows in llama.cpp's rotary order) and the metadata describe the model and tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.tokenizer import load_sentencepiece
from odegpt.commands.cli import main as odegpt_main
from odegpt.folders.export import _rotary_halves_to_pairs, save_native, unroll_to_llama
from tests.conftest import PARTIALLY_SHARED, tokenized_tiny_model

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model, _ = tokenized_tiny_model(root, TEXT, segments=PARTIALLY_SHARED)
    return model, save_native(model, root / "model", tokenizer_dir=root / "tokenizer")


def _field(reader, name):
    return reader.fields[name].contents()


@pytest.mark.parametrize("dtype, gguf_dtype, tolerance", [("float32", "f32", 0.0), (None, "f16", 2e-3),
                                                          ("bfloat16", "bf16", 1e-2)])
def test_gguf_round_trips_through_the_gguf_reader(model_folder, tmp_path, capsys, dtype, gguf_dtype, tolerance):
    import gguf

    model, folder = model_folder
    argv = ["export", "--model", str(folder), "--output", str(tmp_path / "out"), "--format", "gguf",
            "--step-size", "2"] + ([] if dtype is None else ["--dtype", dtype])
    assert odegpt_main(argv) == 0
    path = tmp_path / "out" / f"odegpt-a2-{gguf_dtype}.gguf"
    assert f"-> {path}" in capsys.readouterr().out and sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        [path.name]
    reader = gguf.GGUFReader(str(path))
    llama = unroll_to_llama(model, 2.0)
    config = model.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == llama.config.num_hidden_layers == 5
    assert _field(reader, "llama.embedding_length") == config.hidden_size
    assert _field(reader, "llama.feed_forward_length") == config.intermediate_size
    assert _field(reader, "llama.attention.head_count") == config.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_theta)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    # The tokenizer: SentencePiece's pieces and scores, its special ids, and no BOS or dummy prefix added.
    processor = load_sentencepiece(folder)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.tokens")[:processor.get_piece_size()] == \
        [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    assert _field(reader, "tokenizer.ggml.scores")[10] == pytest.approx(processor.get_score(10))
    assert _field(reader, "tokenizer.ggml.bos_token_id") == config.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == config.eos_token_id
    for flag in ("add_bos_token", "add_eos_token", "add_space_prefix", "remove_extra_whitespaces"):
        assert _field(reader, f"tokenizer.ggml.{flag}") is False, flag
    # The tensors: every one of the unrolled Llama's, in GGUF's names, equal up to the storage dtype.
    tensors = {t.name: t for t in reader.tensors}
    state = llama.state_dict()
    expected = {"token_embd.weight": state["model.embed_tokens.weight"],
                "output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    for layer in range(5):
        for source, target in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                               ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                               ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                               ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            weight = state[f"model.layers.{layer}.{source}.weight"]
            if source == "self_attn.q_proj":
                weight = _rotary_halves_to_pairs(weight, config.num_attention_heads)
            elif source == "self_attn.k_proj":
                weight = _rotary_halves_to_pairs(weight, config.num_key_value_heads)
            expected[f"blk.{layer}.{target}.weight"] = weight
    assert set(tensors) == set(expected)
    for name, weight in expected.items():
        tensor = tensors[name]
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        assert (tensor.tensor_type == gguf.GGMLQuantizationType.F32) == (weight.ndim == 1 or gguf_dtype == "f32")
        np.testing.assert_allclose(data, weight.float().numpy(), rtol=tolerance, atol=tolerance, err_msg=name)


def test_the_rotary_reorder_pairs_each_heads_halves():
    """llama.cpp rotates adjacent rows (2i, 2i+1); Hugging Face rotates row i with row i + head_dim/2."""
    rows = torch.arange(2 * 8, dtype=torch.float32)[:, None]  # 2 heads of head_dim 8
    assert _rotary_halves_to_pairs(rows, 2)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_gguf_needs_the_sentencepiece_model_and_an_unrollable_solver(model_folder, tmp_path, capsys):
    model, folder = model_folder
    bare = tmp_path / "bare"
    save_native(model, bare)
    assert odegpt_main(["export", "--model", str(bare), "--output", str(tmp_path / "o"), "--format", "gguf"]) == 2
    assert "--format gguf needs the model's tokenizer in" in capsys.readouterr().err
    assert odegpt_main(["export", "--model", str(folder), "--output", str(tmp_path / "o"), "--format", "native",
                        "--unroll"]) == 2
    assert "--unroll is now --format unrolled" in capsys.readouterr().err  # the old flag, refused, names the new


def test_tokenizer_config_tells_llama_cpp_not_to_add_bos_or_a_space_prefix(model_folder):
    _, folder = model_folder
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_prefix_space"] is False
