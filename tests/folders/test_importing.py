"""Importing Llama-family checkpoints: exact unshared imports, retrofitting into shared segments, and the
time-continuous relaxation (odegpt.folders.importing)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from odegpt.commands.cli import main as odegpt_main
from odegpt.decoding.generate import with_decoders
from odegpt.folders.export import unroll_to_llama
from odegpt.folders.importing import load_source, retrofit
from odegpt.folders.model_folder import load_model
from tests.conftest import left_padded

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
FAMILIES = {
    "llama-llama3-rope-biases-untied": (LlamaConfig, LlamaForCausalLM, dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-yarn-tied-head-dim": (LlamaConfig, LlamaForCausalLM, dict(
        tie_word_embeddings=True, head_dim=32,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "qwen2-qkv-biases": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "mistral-no-window": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    # Scalings whose frequencies change with the longest position of a call: short tables, so tests cross them.
    "llama-dynamic-ntk": (LlamaConfig, LlamaForCausalLM, dict(
        max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-longrope": (LlamaConfig, LlamaForCausalLM, dict(
        max_position_embeddings=64, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.5 * i for i in range(8)]})),
}


def save_source(root, family: str):
    """A random-weight source folder of ``family`` (biases and norm gains random too, so that they matter)."""
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**{**SHAPE, **extra})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
            elif "norm" in name:
                parameter.uniform_(0.5, 1.5)
    folder = root / family
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {family: save_source(root, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unshared_import_gives_the_sources_logits(sources, family):
    source = load_source(sources[family])
    model, report = retrofit(source)
    tokens = torch.randint(0, 101, (2, 40))
    torch.testing.assert_close(model(tokens, use_cache=False).logits, source(tokens).logits, rtol=0, atol=1e-5)
    assert report.parameters == report.source_parameters and report.relaxation_parameters == 0


@pytest.mark.parametrize("family", ["llama-dynamic-ntk", "llama-longrope"])
def test_a_length_dependent_rotary_scaling_is_exact_past_its_switch_and_while_decoding_across_it(sources, family):
    source = load_source(sources[family])
    model, _ = retrofit(source)
    for length in (12, 40):  # below and above the length where the frequencies change
        tokens = torch.randint(0, 101, (2, length))
        torch.testing.assert_close(model(tokens, use_cache=False).logits, source(tokens).logits, rtol=0, atol=1e-5)
    prompt = torch.randint(0, 101, (1, 10))
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = source.generate(prompt, **settings)
    assert torch.equal(with_decoders(model).generate(prompt, **settings), expected)


@pytest.mark.parametrize("family", ["llama-llama3-rope-biases-untied", "qwen2-qkv-biases"])
def test_full_rank_relaxation_is_the_source_at_step_size_1_and_lower_ranks_are_not(sources, family):
    source = load_source(sources[family])
    tokens = torch.randint(0, 101, (2, 40))
    expected = source(tokens).logits
    full, _ = retrofit(source, "1u,4s,1u", "average", "full")
    torch.testing.assert_close(full(tokens, use_cache=False, step_size=1).logits, expected, rtol=0, atol=1e-5)
    low, report = retrofit(source, "1u,4s,1u", "average", 4)
    assert (low(tokens, use_cache=False, step_size=1).logits - expected).abs().max() > 1e-2
    assert 0 < report.relaxation_parameters < report.parameters < report.source_parameters


@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_each_init_rule_builds_the_shared_block_from_its_layers(sources, init):
    source = load_source(sources["mistral-no-window"])
    model, _ = retrofit(source, "1u,4s,1u", init)
    layers = source.model.layers[1:5]
    chosen = {"stepwise": [2], "lower": [0], "average": [0, 1, 2, 3]}[init]
    gain = [layers[i].input_layernorm.weight for i in chosen]
    folded = torch.stack([layers[i].self_attn.q_proj.weight * g[None] for i, g in zip(chosen, gain)]).mean(0)
    torch.testing.assert_close(model.model.blocks[1].self_attn.q_proj.weight, folded)
    assert bool((model.model.blocks[1].input_layernorm.weight == 1).all())  # folded into the maps
    torch.testing.assert_close(model.model.blocks[0].self_attn.q_proj.weight,
                               source.model.layers[0].self_attn.q_proj.weight)


def test_the_relaxed_model_at_step_size_2_equals_its_unrolled_export_and_decodes_as_it_scores(sources):
    source = load_source(sources["llama-llama3-rope-biases-untied"])
    model, _ = retrofit(source, "1u,4s,1u", "average", 4)
    tokens = torch.randint(0, 101, (2, 30))
    for a in (2.0, 0.75):  # steps between the knots, where two of them are interpolated
        llama = unroll_to_llama(model, a)
        torch.testing.assert_close(llama(tokens).logits, model(tokens, step_size=a, use_cache=False).logits,
                                   rtol=0, atol=1e-4)
    model = with_decoders(model)
    prompt, mask = left_padded([torch.randint(1, 101, (n,)) for n in (7, 4)])
    settings = dict(max_new_tokens=8, do_sample=False, step_size=1.0, pad_token_id=0, attention_mask=mask)
    cached = model.generate(prompt, **settings)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **settings))
    assert torch.equal(cached, model.generate(prompt, draft_step_size=2.0, draft_tokens=3, **settings))
    assert torch.equal(cached, model.generate(prompt, exit_entropy=0.0, kv_fill="copy", **settings))


def test_the_import_command_writes_a_native_folder_and_prints_perplexity_and_parameters(sources, tmp_path, capsys):
    from tests.conftest import tokenized_tiny_model

    _, info = tokenized_tiny_model(tmp_path, "def add(a, b):\n    return a + b\n" * 60)
    torch.manual_seed(0)
    source = tmp_path / "source"
    MistralForCausalLM(MistralConfig(**{**SHAPE, "vocab_size": info.vocab_size},
                                     sliding_window=None)).save_pretrained(source)
    for path in (tmp_path / "tokenizer").iterdir():
        shutil.copy(path, source / path.name)
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    code = odegpt_main(["import", "--model", str(source), "--output", str(tmp_path / "out"), "--segments", "1u,4s,1u",
                        "--relax-rank", "full", "--data", str(tmp_path / "text.txt"), "--seq-len", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "as segments 1u,4s,1u, init stepwise" in out and "parameters without the relaxation" in out
    perplexity = next(line for line in out.splitlines() if line.startswith("perplexity"))
    assert "(+0.0%)" in perplexity or "(-0.0%)" in perplexity, perplexity  # full rank at a = 1 is the source
    model = load_model(tmp_path / "out")
    assert model.config.relax_rank == "full" and model.config.segments[1] == {"depth": 4, "shared": True}
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "custom_generate" / "generate.py").is_file()


@pytest.mark.parametrize("change, named", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64), "sliding_window=64"),
    (dict(num_local_experts=8), "num_local_experts"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]), "model_type 'qwen3'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_an_unsupported_architecture_is_refused_from_its_config_before_any_weight(sources, tmp_path, capsys,
                                                                                   change, named):
    folder = tmp_path / "source"
    shutil.copytree(sources["llama-yarn-tied-head-dim"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not weights")  # never read: the refusal comes first
    code = odegpt_main(["import", "--model", str(folder), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--segments", "1u,3s"], "add up to 6"),
    (["--segments", "1x,5s"], "each comma-separated part"),
    (["--relax-rank", "-1"], "--relax-rank"),
])
def test_bad_import_options_are_one_line_errors(sources, tmp_path, capsys, argv, message):
    code = odegpt_main(["import", "--model", str(sources["qwen2-qkv-biases"]), "--output", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ---- hostile sources: refused in one line before any weight is allocated, never a silent wrong number ------------

def _edited_source(sources, tmp_path, family: str, **changes):
    folder = tmp_path / f"{family}-edited"
    shutil.copytree(sources[family], folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        elif isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("family, changes, message", [
    ("llama-yarn-tied-head-dim", dict(hidden_size=65536, intermediate_size=65536),
     "describes a model of"),
    # A huge head_dim alone (the size is counted from it, not from hidden_size: this one allocated 2.8 GB at 2**17).
    ("llama-yarn-tied-head-dim", dict(head_dim=2**24), "describes a model of"),
    ("llama-yarn-tied-head-dim", dict(num_hidden_layers=20000), "asks for 20,000 layers"),
    ("mistral-no-window", dict(num_hidden_layers=60), "describes 60 layers but its weights hold"),
    ("llama-llama3-rope-biases-untied", dict(rope_parameters={"rope_type": "bogus"}), "rope_type 'bogus'"),
    ("mistral-no-window", dict(num_key_value_heads=3), "num_key_value_heads 3 does not divide"),
    ("llama-yarn-tied-head-dim", dict(head_dim=31), "head_dim 31 is odd"),
    ("llama-yarn-tied-head-dim", dict(head_dim=16), "does not describe its weights: model.layers.0.self_attn.q_proj"),
    ("llama-llama3-rope-biases-untied", dict(tie_word_embeddings=True), "tie_word_embeddings is true but"),
])
def test_a_source_whose_config_contradicts_its_weights_or_the_machine_is_one_line(sources, tmp_path, capsys,
                                                                                  family, changes, message):
    source = _edited_source(sources, tmp_path, family, **changes)
    code = odegpt_main(["import", "--model", str(source), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_pickle_only_source_is_refused_without_unpickling(sources, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(sources["mistral-no-window"] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04crm -rf\n")  # never read: odegpt loads no pickle
    code = odegpt_main(["import", "--model", str(folder), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "holds no safetensors weights" in err and err.count("\n") == 1, err


def test_a_broken_tokenizer_is_refused_before_the_import_works(sources, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(sources["mistral-no-window"], source)
    (source / "tokenizer_config.json").write_text('{"tokenizer_class": ')
    code = odegpt_main(["import", "--model", str(source), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load the tokenizer of" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_calibrated_retrofit_beats_the_weight_svd_on_a_model_with_outlier_channels(sources):
    """Real models carry a few huge activation channels: the relaxation should be closest to each layer on the inputs
    it sees, not in weights. A source whose residual stream has three channels 30x the others."""
    from odegpt.folders.calibrated_init import input_moments

    source = load_source(sources["llama-llama3-rope-biases-untied"])
    with torch.no_grad():
        source.model.embed_tokens.weight[:, :3] *= 30.0
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 101, (8, 33), generator=generator) for _ in range(4)]
    held_out = torch.randint(0, 101, (4, 40), generator=generator)
    with torch.no_grad():
        expected = source(held_out).logits

    @torch.no_grad()
    def error(model) -> float:
        return float((model(held_out, use_cache=False, step_size=1).logits - expected).pow(2).mean())

    moments = input_moments(source, calibration)
    for init in ("average", "stepwise"):
        plain, _ = retrofit(source, "1u,4s,1u", init, 4)
        calibrated, report = retrofit(source, "1u,4s,1u", init, 4, moments)
        assert error(calibrated) < 0.7 * error(plain), (init, error(calibrated), error(plain))
        assert report.shared_blocks[1][0] == init and 0 < report.shared_blocks[1][1] < 1
    auto, report = retrofit(source, "1u,4s,1u", "auto", 4, moments)
    rule, chosen_error = report.shared_blocks[1]
    assert rule in ("stepwise", "average", "lower", "fit")
    for other in ("stepwise", "average", "lower", "fit"):  # auto takes the least error on the calibration inputs
        assert chosen_error <= retrofit(source, "1u,4s,1u", other, 4, moments)[1].shared_blocks[1][1] + 1e-12


def test_import_with_calibration_text_chooses_and_reports_each_blocks_rule(sources, tmp_path, capsys):
    from tests.conftest import tokenized_tiny_model

    _, info = tokenized_tiny_model(tmp_path, "def add(a, b):\n    return a + b\n" * 60)
    torch.manual_seed(0)
    source = tmp_path / "source"
    MistralForCausalLM(MistralConfig(**{**SHAPE, "vocab_size": info.vocab_size}, sliding_window=None)).save_pretrained(
        source)
    for path in (tmp_path / "tokenizer").iterdir():
        shutil.copy(path, source / path.name)
    (tmp_path / "calibration.txt").write_text("class Point:\n    x: int = 0\n" * 30)
    code = odegpt_main(["import", "--model", str(source), "--output", str(tmp_path / "out"), "--segments", "1u,4s,1u",
                        "--relax-rank", "4", "--calibration", str(tmp_path / "calibration.txt"),
                        "--calibration-tokens", "512", "--seq-len", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "init auto (block 1: " in out and "on the calibration text)" in out, out
    assert load_model(tmp_path / "out").config.relax_rank == 4
    code = odegpt_main(["import", "--model", str(source), "--output", str(tmp_path / "o2"), "--init", "fit"])
    assert code == 2 and "--init fit fits the shared blocks on calibration text" in capsys.readouterr().err
