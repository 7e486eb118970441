"""GGUF export (odegpt export --format gguf): read back with the gguf package's own reader, the tensors are the
unrolled Llama's (q/k rows in llama.cpp's rotary order) and the metadata describe the model and tokenizer; quantized
files (q8_0, q4_0) hold them within each block type's error and keep llama.cpp's higher-precision tensors."""
from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
import torch

from data_pipeline.tokenizer import load_sentencepiece
from odegpt import OdeGPTForCausalLM
from odegpt.commands.cli import main as odegpt_main
from odegpt.folders.export import _rotary_halves_to_pairs, save_gguf, save_native, unroll_to_llama
from tests.conftest import PARTIALLY_SHARED, tiny_config, tokenized_tiny_model

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model, _ = tokenized_tiny_model(root, TEXT, segments=PARTIALLY_SHARED)
    return model, save_native(model, root / "model", tokenizer_dir=root / "tokenizer")


def _field(reader, name):
    return reader.fields[name].contents()


def _expected_tensors(model, step_size: float) -> dict[str, torch.Tensor]:
    """The unrolled Llama's tensors under their GGUF names, q/k rows in llama.cpp's rotary order."""
    llama = unroll_to_llama(model, step_size)
    config, state = model.config, llama.state_dict()
    expected = {"token_embd.weight": state["model.embed_tokens.weight"],
                "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        expected["output.weight"] = state["lm_head.weight"]
    for layer in range(llama.config.num_hidden_layers):
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
    return expected


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
    expected = _expected_tensors(model, 2.0)
    assert "output.weight" in expected and len(expected) == 3 + 5 * 9
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


# ---- quantized GGUF ------------------------------------------------------------------------------------------------

def _block_error_bound(weight: np.ndarray, kind) -> np.ndarray:
    """Per weight, the largest error the block quantization ``kind`` may make on ``weight`` (rows last), from each
    32-weight block's float scale d and the float16 d16 the file stores:

    - Q8_0: d = max|x| / 127, x -> round(x / d) * d16: half a step, plus 127 |d - d16| from the scale's rounding;
    - Q4_0: d = -x_max / 8 (x_max the block's weight of largest magnitude), x -> (clip(round(x / d), -8, 7)) * d16:
      half a step, except a weight of the sign opposite x_max near |x_max|, clipped at 7 steps (up to one step),
      plus 8 |d - d16|.

    A relative 1e-5 of a step allows for the float32 arithmetic of the quantizer."""
    import gguf

    blocks = weight.astype(np.float64).reshape(-1, 32)
    if kind == gguf.GGMLQuantizationType.Q8_0:
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        steps, largest_code = np.full_like(blocks, 0.5), 127
    else:
        assert kind == gguf.GGMLQuantizationType.Q4_0
        d = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1) / -8
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(d == 0, 0.0, blocks / d)
        steps, largest_code = np.maximum(0.5, ratio - 7), 8
    d16 = d.astype(np.float16).astype(np.float64)
    bound = np.abs(d) * (steps + 1e-5) + largest_code * np.abs(d - d16)
    return bound.reshape(weight.shape)


def _check_tensors_within_their_error(path, expected: dict[str, torch.Tensor], types: dict[str, str]) -> None:
    """Every tensor of the file at ``path`` is stored in ``types[name]`` and dequantizes (gguf.quants.dequantize) to
    its float weight within that type's error: exact for F32, float16 rounding for F16, the block bound for Q8_0 and
    Q4_0 (which must also be above float16 rounding: the weights were quantized, not stored in float16)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert set(tensors) == set(expected) == set(types)
    for name, weight in expected.items():
        tensor, weight = tensors[name], weight.detach().float().numpy()
        assert tensor.tensor_type.name == types[name], name
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        error = np.abs(data.astype(np.float64) - weight)
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            assert error.max() == 0, name
        elif tensor.tensor_type == gguf.GGMLQuantizationType.F16:
            np.testing.assert_allclose(data, weight, rtol=1e-3, atol=1e-6, err_msg=name)
        else:
            bound = _block_error_bound(weight, tensor.tensor_type)
            assert (error <= bound).all(), (name, float((error - bound).max()))
            assert error.max() > 1e-3 * np.abs(weight).max(), name  # quantized: coarser than float16


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_gguf_reads_back_within_the_block_types_error(model_folder, tmp_path, capsys, dtype):
    """Every matrix of the tiny model (rows of 64 and 96: whole blocks) quantized to ``dtype``, except, for q4_0,
    the output matrix in Q8_0 (llama.cpp's quantizer keeps it in 6 or 8 bits); norms f32. The command prints the
    type, the tensors of each type and the file's size."""
    model, folder = model_folder
    argv = ["export", "--model", str(folder), "--output", str(tmp_path / "out"), "--format", "gguf",
            "--step-size", "2", "--dtype", dtype]
    assert odegpt_main(argv) == 0
    path = tmp_path / "out" / f"odegpt-a2-{dtype}.gguf"
    printed = capsys.readouterr().out
    expected = _expected_tensors(model, 2.0)
    matrix = dtype.upper()
    types = {name: "F32" if weight.ndim == 1 else matrix for name, weight in expected.items()}
    if dtype == "q4_0":
        types["output.weight"] = "Q8_0"
    listed = re.search(rf"^GGUF \(llama, {dtype}: (.*) tensors; ", printed)
    assert listed and f"-> {path}" in printed, printed
    counts = {kind: int(count) for count, kind in (item.split() for item in listed[1].split(", "))}
    assert counts == collections.Counter(types.values()), printed
    size = path.stat().st_size
    assert 1e5 < size < 1e6 and f"; {size / 1e3:.1f} kB)" in printed, printed
    import gguf

    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "general.file_type") == {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                                                   "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    _check_tensors_within_their_error(path, expected, types)


def test_quantization_keeps_partial_blocks_in_f16_and_a_tied_output_in_q8_0(model_folder, tmp_path):
    """A matrix whose rows are not whole 32-weight blocks (ffn_down's 80) stays f16, as llama.cpp's converter keeps
    it; with tied embeddings the token embedding is the output matrix: Q8_0 under q4_0, and no output.weight."""
    model, folder = model_folder
    torch.manual_seed(1)
    tied = OdeGPTForCausalLM(tiny_config(PARTIALLY_SHARED, vocab_size=model.config.vocab_size, intermediate_size=80,
                                         tie_word_embeddings=True, pad_token_id=model.config.pad_token_id,
                                         eos_token_id=model.config.eos_token_id,
                                         bos_token_id=model.config.bos_token_id)).eval()
    for dtype, matrix in (("q4_0", "Q4_0"), ("q8_0", "Q8_0")):
        path = save_gguf(tied, tmp_path / dtype, 1.0, folder, dtype)
        expected = _expected_tensors(tied, 1.0)
        types = {name: "F32" if weight.ndim == 1 else "F16" if name.endswith("ffn_down.weight") else matrix
                 for name, weight in expected.items()}
        types["token_embd.weight"] = "Q8_0"
        _check_tensors_within_their_error(path, expected, types)


@pytest.mark.parametrize("argv", [["--format", "native", "--dtype", "q8_0"],
                                  ["--format", "unrolled", "--dtype", "q4_0"], ["--dtype", "q8_0"]])
def test_a_quantized_dtype_needs_the_gguf_format(model_folder, tmp_path, capsys, argv):
    _, folder = model_folder
    assert odegpt_main(["export", "--model", str(folder), "--output", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--dtype {argv[-1]} quantizes a GGUF file (--format gguf)" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["bench"], ["evaluate", "--data", "missing-corpus"]])
def test_commands_that_compute_refuse_a_quantized_dtype_in_one_line(model_folder, capsys, command):
    _, folder = model_folder
    assert odegpt_main([command[0], "--model", str(folder), "--dtype", "q4_0", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err == f"odegpt {command[0]}: --dtype q4_0: {command[0]} computes in float32 or bfloat16\n", err
