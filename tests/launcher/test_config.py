"""Single-process launcher tests: config composition and validation, the generated DeepSpeed
config, launch command building, the planner, schedule and checkpoint bookkeeping."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from launcher.config import CONFIG_DIR, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_presets_compose_and_overrides_are_typed():
    config = load_config(["quickstart"], ["train.lr=3e-4", "deepspeed.zero_stage=3", "eval.step_sizes=[1, 2]"])
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)  # YAML reads 3e-4 as a string
    assert config.deepspeed.zero_stage == 3
    assert config.model.segments == [{"depth": 4, "shared": True}]  # from model/tiny.yaml via defaults
    assert config.model.hidden_size == 128  # quickstart.yaml overrides its defaults
    later = load_config(["quickstart", "deepspeed/zero1"])  # files merge left to right
    assert later.deepspeed.zero_stage == 1
    for preset in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        if preset.stem != "tiny":
            load_config([preset, "train/pretrain", "deepspeed/zero3-offload"], world_size=32)


@pytest.mark.parametrize("overrides, world_size, message", [
    (["train.lrr=1"], None, "unknown key(s) 'train.lrr'"),
    (["optimizer.lr=1"], None, "unknown key(s) 'optimizer'"),
    (["train.lr=fast"], None, "train.lr must be float"),
    (["train.micro_batch_size=true"], None, "train.micro_batch_size must be int"),
    (["train.global_batch_size=16"], 3, "multiple of train.micro_batch_size (8) x world size (3)"),
    (["train.seq_len=4096"], None, "train.seq_len (4096) exceeds model.max_position_embeddings (256)"),
    (["model.hidden_size=130"], None, "model: num_attention_heads (4) must divide hidden_size (130)"),
    (["model.segments=[{depth: 0}]"], None, "segments[0].depth"),
    (["train.step_size_distribution={low: 2, high: 1}"], None, "train.step_size_distribution"),
    (["deepspeed.offload_param=true"], None, "deepspeed.offload_param needs deepspeed.zero_stage: 3"),
    (["deepspeed.zero_stage=4"], None, "deepspeed.zero_stage must be 0, 1, 2 or 3"),
    (["eval.step_sizes=[1, 0]"], None, "eval.step_sizes[1]"),
    (["train.min_lr=1.0"], None, "train.min_lr"),
    (["data.weights=[1, 2]"], None, "data.weights has 2 entries"),
    (["model.exit_head=0", "model.exit_to_tail=true"], None, "model: exit_to_tail needs unshared layers after"),
    (["model.segments=[{depth: 1, shared: false}, {depth: 2, shared: true}, {depth: 1, shared: false}]",
      "model.exit_head=0", "model.exit_to_tail=true", "train.exit_head_weight=0.1"], None,
     "set train.exit_head_weight to 0 and fit it with `odegpt calibrate --exit-to tail`"),
])
def test_invalid_configs_name_the_key(overrides, world_size, message):
    with pytest.raises(ConfigError) as error:
        load_config(["quickstart"], overrides, world_size=world_size)
    assert message in str(error.value)


def test_deepspeed_config_is_derived():
    config = load_config(["quickstart"], ["train.global_batch_size=64", "deepspeed.zero_stage=3",
                                          "deepspeed.offload_optimizer=true"])
    ds = config.to_deepspeed_config(world_size=2, device_type="cpu")
    assert ds["train_batch_size"] == 64 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == config.train.lr
    gpu = load_config(["model/125m-shared", "train/pretrain"]).to_deepspeed_config(world_size=8, device_type="cuda")
    assert gpu["bf16"]["enabled"] is True and gpu["optimizer"]["params"]["fused"] is True
    with pytest.raises(ConfigError, match="world size"):
        config.to_deepspeed_config(world_size=3)


def test_schedule_and_parameter_groups():
    from launcher.optim import WarmupCosine, parameter_groups
    from odegpt import OdeGPTForCausalLM

    schedule = WarmupCosine(warmup_steps=10, decay_steps=100, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0) and schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1) and schedule(1000) == pytest.approx(0.1)

    model = OdeGPTForCausalLM(load_config(["quickstart"]).model_config())
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" not in names[id(p)] and "embed" not in names[id(p)] for p in decay["params"])
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_launch_dry_run_prints_the_deepspeed_command(capsys, tmp_path):
    from odegpt.commands.cli import main

    hostfile = REPO / "examples" / "hostfile"
    code = main(["launch", "--config", "quickstart", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "1",
                 "--master-addr", "10.0.0.1", "--num-gpus", "1", "--set", f"run.output_dir={tmp_path}",
                 "--set", "train.micro_batch_size=8", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    command = out.strip().splitlines()[-1]
    for part in ("-m deepspeed.launcher.runner", f"--hostfile {hostfile}", "--num_gpus 1", "--no_ssh",
                 "--node_rank 1", "--master_addr 10.0.0.1", "--module launcher.train", "--config quickstart",
                 "--set run.output_dir=", "--resume auto"):
        assert part in command, part
    assert "DS_ACCELERATOR=cpu" in out
    assert not (tmp_path / "deepspeed_env").exists()  # a dry run writes nothing

    # 2 hosts x 8 slots = 16 ranks: a global batch of 16 with micro-batches of 8 cannot fit.
    code = main(["launch", "--config", "quickstart", "--hostfile", str(hostfile), "--dry-run"])
    assert code == 2
    assert "world size (16)" in capsys.readouterr().err


def test_hostfile_and_world_size():
    from launcher.launch import LaunchSpec, read_hostfile, world_size

    hostfile = str(REPO / "examples" / "hostfile")
    assert read_hostfile(hostfile) == {"node-0": 8, "node-1": 8}
    assert world_size(LaunchSpec(["quickstart"], hostfile=hostfile)) == 16
    assert world_size(LaunchSpec(["quickstart"], hostfile=hostfile, num_nodes=1, num_gpus=2)) == 2
    assert world_size(LaunchSpec(["quickstart"], num_nodes=2, num_gpus=4)) == 8


def test_plan_agrees_with_deepspeed_estimators(capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from launcher.plan import make_plan
    from odegpt.commands.cli import main

    config = load_config(["model/1.3b-unshared", "train/pretrain"], world_size=16)
    plan = make_plan(config, nodes=2, gpus_per_node=8, gpu_tflops=312, mfu=0.4)
    p = plan.parameters
    assert plan.model_states_bytes["zero2"] == estimate_zero2_model_states_mem_needs(p, 8, 2, cpu_offload=False)[1]
    assert plan.model_states_bytes["zero3"] == estimate_zero3_model_states_mem_needs(
        p, plan.largest_layer_parameters, 8, 2, cpu_offload=False)[1]
    states = plan.model_states_bytes
    assert states["zero0"] > states["zero1"] > states["zero2"] > states["zero3"]
    assert 1.2e9 < p < 1.5e9
    assert plan.flops_per_token[0.5] == plan.flops_per_token[4.0]  # unshared layers always take step 1
    # Shared: fewer solver steps at larger a, fewer FLOPs and a smaller KV cache.
    plan = make_plan(load_config(["model/1.3b-shared", "train/pretrain"]), 2, 8, 312, 0.4)
    assert plan.flops_per_token[0.5] > plan.flops_per_token[1.0] > plan.flops_per_token[4.0]
    assert plan.kv_cache_bytes[1.0] == 2 * plan.kv_cache_bytes[2.0]
    tokens = config.train.train_steps * config.train.global_batch_size * config.train.seq_len
    assert plan.days == pytest.approx(tokens / plan.tokens_per_s / 86400)

    assert main(["plan", "--all-models", "--config", "train/pretrain", "--num-nodes", "4", "--num-gpus", "8"]) == 0
    table = capsys.readouterr().out
    for name in ("125m-shared", "350m-partial", "760m-unshared", "1.3b-shared", "13b-shared"):
        assert name in table


def test_plan_counts_the_objectives_extra_passes_as_the_trainers_mfu_does():
    from launcher.plan import make_plan
    from odegpt.training.objective import objective_flops_per_token

    plain = load_config(["quickstart"], overrides=["train.reference_weight=0"])
    config = load_config(["quickstart"])  # a ~ {2, 4}, and the a=1 loss on every step
    plan, plain_plan = make_plan(config, 1, 1, 312, 0.4), make_plan(plain, 1, 1, 312, 0.4)
    model, t = config.model_config(), config.train
    assert plan.expected_training_flops_per_token == pytest.approx(sum(
        0.5 * objective_flops_per_token(model, a, t.seq_len, 0.0, 1.0, None) for a in (2.0, 4.0)))
    reference = 3 * plan.flops_per_token[1.0]  # the a=1 solve, forward and backward
    assert plan.expected_training_flops_per_token == pytest.approx(plain_plan.expected_training_flops_per_token
                                                                   + reference)
    assert plan.activation_bytes > plain_plan.activation_bytes  # both graphs are held until the backward


def test_checkpoint_bookkeeping(tmp_path):
    import json

    import torch

    from launcher.checkpointing import COMPLETE, STATE, CheckpointError, choose, complete_tags, prune, tag_for

    for step in (1, 2, 3, 4):
        tag_dir = tmp_path / tag_for(step)
        tag_dir.mkdir()
        torch.save({"module": {}}, tag_dir / "mp_rank_00_model_states.pt")
        (tag_dir / STATE).write_text(json.dumps({"step": step, "consumed_samples": 8 * step, "config": {}}))
        if step != 4:  # step 4: a save that crashed half-way
            files = {p.name: p.stat().st_size for p in tag_dir.iterdir()}
            (tag_dir / COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    assert complete_tags(tmp_path) == [tag_for(1), tag_for(2), tag_for(3)]
    assert choose("auto", tmp_path).tag == tag_for(3)
    assert choose("auto", tmp_path).state == {"step": 3, "consumed_samples": 24, "config": {}}
    assert choose(str(tmp_path / tag_for(2)), tmp_path).tag == tag_for(2)
    assert choose(str(tmp_path), tmp_path / "elsewhere").tag == tag_for(3)
    assert choose("none", tmp_path) is None
    assert choose("auto", tmp_path / "empty") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint there"):
        choose(str(tmp_path / tag_for(4)), tmp_path)
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(2), tag_for(3), tag_for(4)]


def test_evaluate_perplexity_is_token_weighted():
    import torch

    from odegpt import OdeGPTForCausalLM
    from odegpt.evaluation.perplexity import evaluate_perplexity, nll_sums

    torch.manual_seed(0)
    model = OdeGPTForCausalLM(load_config(["quickstart"], ["model.vocab_size=50"]).model_config())
    tokens = torch.randint(0, 50, (3, 9))
    batches = [tokens[:2], tokens[2:]]  # unequal batches: the mean is over tokens, not batches
    result = evaluate_perplexity(model, batches, [1.0, 2.0])
    with torch.no_grad():
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1], step_size=2.0).loss
    # HF shifts labels inside: compare to our own full-batch cross entropy at a=2 instead.
    logits = model(input_ids=tokens[:, :-1], step_size=2.0).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert result[2.0] == pytest.approx(math.exp(expected.item()), rel=1e-5)
    assert nll_sums(model, batches, [1.0])[1.0][1] == 3 * 8
    assert math.isfinite(loss.item()) and model.training  # evaluation restores the training mode


@pytest.mark.parametrize("flags, message", [
    (["--gpu-tflops", "0"], "--gpu-tflops must be a finite number > 0, got 0"),
    (["--gpu-tflops", "nan"], "--gpu-tflops must be a finite number > 0, got nan"),
    (["--gpu-tflops", "-5"], "--gpu-tflops must be a finite number > 0, got -5"),  # printed "-0.00 days", exit 0
    (["--mfu", "0"], "--mfu must be a fraction in (0, 1], got 0"),
    (["--mfu", "1.5"], "--mfu must be a fraction in (0, 1], got 1.5"),
])
def test_plan_refuses_impossible_hardware_figures(capsys, flags, message):
    from odegpt.commands.cli import main

    assert main(["plan", "--config", "quickstart", "--num-gpus", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("seed", ["1e30", "99999999999999999999", "-1", "1.5"])
def test_train_seed_must_be_a_64_bit_integer(seed):
    with pytest.raises(ConfigError, match=r"train.seed must be (an integer in \[0, 2\*\*63\)|int)"):
        load_config(["quickstart"], [f"train.seed={seed}"])


def test_init_from_takes_the_shape_from_the_folder_and_names_every_disagreeing_key(tmp_path):
    from odegpt import OdeGPTConfig, OdeGPTForCausalLM
    from odegpt.folders.export import save_native

    save_native(OdeGPTForCausalLM(OdeGPTConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_attention_heads=2, segments="1u,2s", relax_rank=4)), tmp_path / "m")
    config = load_config([], [f"train.init_from={tmp_path / 'm'}", "model.step_size=2"])
    assert config.model.hidden_size == 32 and config.model.relax_rank == 4 and config.model.step_size == 2.0
    assert config.model.segments == [{"depth": 1, "shared": False}, {"depth": 2, "shared": True}]
    with pytest.raises(ConfigError) as error:
        load_config(["quickstart"], [f"train.init_from={tmp_path / 'm'}"])
    message = str(error.value)
    assert "model.hidden_size is" in message and "in the config but 32 in" in message and "\n" not in message
    with pytest.raises(ConfigError, match="train.init_from: cannot read"):
        load_config([], [f"train.init_from={tmp_path / 'missing'}"])


def test_the_renamed_step_size_distribution_key_is_named():
    with pytest.raises(ConfigError, match=r"train.step_size is now train.step_size_distribution"):
        load_config(["quickstart"], ["train.step_size={choices: [1]}"])


# ---- bounded inputs: a few bytes of YAML cost no more than a few bytes ---------------------------------

def _alias_bomb(levels: int) -> str:
    """Billion laughs: each list repeats the previous one nine times (9**levels strings, a few hundred bytes)."""
    names = "abcdefghijk"[:levels]
    items = ["&a [x,x,x,x,x,x,x,x,x]"] + [f"&{name} [{','.join([f'*{previous}'] * 9)}]"
                                          for previous, name in zip(names, names[1:])]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("section, key, value", [
    ("deepspeed", "extra", f"{{lol: {_alias_bomb(9)}}}"),  # train peaked at 7.7 GiB, wrote 1.41 GB of JSON
    ("train", "step_size_distribution", _alias_bomb(7)),  # a "one-line" error of 28 MB
])
def test_a_yaml_alias_bomb_is_refused_in_one_line_naming_the_file(tmp_path, section, key, value):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"{section}:\n  {key}: {value}\n")
    assert bomb.stat().st_size < 400
    with pytest.raises(ConfigError) as error:
        load_config(["quickstart", bomb])
    message = str(error.value)
    assert message == f"{bomb}: its aliases expand to more than 100,000 YAML nodes, the most a config may hold " \
                      f"(an alias bomb?)"
    with pytest.raises(ConfigError, match=r"^--set .*: the value: its aliases expand to more than 100,000"):
        load_config(["quickstart"], [f"{section}.{key}={value}"])
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("deepspeed:\n  extra: &a {more: *a}\n")
    with pytest.raises(ConfigError, match=f"^{recursive}: an alias refers to the node that holds it"):
        load_config(["quickstart", recursive])


def test_aliases_within_the_limit_still_work(tmp_path):
    ordinary = tmp_path / "aliases.yaml"
    ordinary.write_text("eval:\n  step_sizes: &sizes [1.0, 2.0]\ntrain:\n  step_size_distribution: {choices: *sizes}\n")
    config = load_config(["quickstart", ordinary])
    assert config.eval.step_sizes == [1.0, 2.0] and config.train.step_size_distribution == {"choices": [1.0, 2.0]}


def test_a_config_file_over_the_size_limit_is_refused_naming_it(tmp_path):
    from launcher.config import MAX_CONFIG_BYTES

    large = tmp_path / "large.yaml"
    large.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError) as error:
        load_config(["quickstart", large])
    assert str(error.value) == f"config file {large} is larger than 1,048,576 bytes, the most a config may hold"
    ds_config = tmp_path / "ds_config.json"
    ds_config.write_text("{" + " " * MAX_CONFIG_BYTES + "}")
    with pytest.raises(ConfigError, match=f"^deepspeed.config_file {ds_config} is larger than 1,048,576 bytes"):
        load_config(["quickstart"], [f"deepspeed.config_file={ds_config}"])


def test_a_large_value_echoed_in_an_error_is_cut_to_one_short_line():
    huge = "[" + ", ".join(["[1, 2, 3, 4, 5, 6, 7, 8, 9]"] * 5000) + "]"  # 50,000 nodes: within the limit
    for override, start in [(f"train.step_size_distribution={huge}", "train.step_size_distribution must be dict"),
                            (f"train.readout_weights={huge}", "train.readout_weights must be dict or null"),
                            (f"deepspeed.zero_stage={huge}", "deepspeed.zero_stage must be int")]:
        with pytest.raises(ConfigError) as error:
            load_config(["quickstart"], [override])
        message = str(error.value)
        assert message.startswith(start) and len(message) < 400 and "\n" not in message, message[:400]


def _defaults_chain(folder: Path, files: int) -> Path:
    """``files`` configs, each listing the next one twice under ``defaults:`` and setting a key of its own."""
    for index in range(files):
        include = f"defaults: [c{index + 1}.yaml, c{index + 1}.yaml]\n" if index + 1 < files else ""
        (folder / f"c{index}.yaml").write_text(f"{include}deepspeed:\n  extra:\n    key{index}: {index}\n"
                                               f"train:\n  seed: {index}\n")
    return folder / "c0.yaml"


def test_defaults_read_each_file_once_with_the_same_result(tmp_path, monkeypatch):
    import yaml

    parsed = []
    original = yaml.load
    monkeypatch.setattr(yaml, "load", lambda text, Loader: parsed.append(text) or original(text, Loader=Loader))
    config = load_config([_defaults_chain(tmp_path, 10)])
    assert len(parsed) == 10  # 2**10 - 1 = 1023 before: each listing expanded again, 26 files took minutes
    assert config.train.seed == 0 and config.deepspeed.extra == {f"key{index}": index for index in range(10)}

    # Where a file is listed again later, its values still win over the ones merged before it.
    (tmp_path / "a.yaml").write_text("train:\n  seed: 1\n")
    (tmp_path / "b.yaml").write_text("train:\n  seed: 2\n")
    (tmp_path / "top.yaml").write_text("defaults: [a.yaml, b.yaml, a.yaml]\n")
    assert load_config([tmp_path / "top.yaml"]).train.seed == 1
    (tmp_path / "loop.yaml").write_text("defaults: [top.yaml, loop.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself through defaults"):
        load_config([tmp_path / "loop.yaml"])


def test_the_copying_that_defaults_cause_is_bounded(tmp_path, monkeypatch):
    from launcher.config import loading

    monkeypatch.setattr(loading, "MAX_MERGED_NODES", 2000)
    (tmp_path / "part.yaml").write_text("deepspeed:\n  extra:\n    values: [" + ", ".join(["1"] * 200) + "]\n")
    (tmp_path / "top.yaml").write_text("defaults: [" + ", ".join(["part.yaml"] * 20) + "]\n")
    with pytest.raises(ConfigError) as error:
        load_config([tmp_path / "top.yaml"])
    assert str(error.value) == (f"config {tmp_path / 'top.yaml'}: merging its defaults copies more than 2,000 nodes "
                                f"(a file listed many times?)")


# ---- numbers that are not numbers ---------------------------------------------------------------------

@pytest.mark.parametrize("override, key, shown", [
    ("train.grad_clip=.nan", "train.grad_clip", "nan"),  # trained with "gradient_clipping": NaN
    ("train.reference_weight=.nan", "train.reference_weight", "nan"),  # dropped the reference term
    ("train.weight_decay=.nan", "train.weight_decay", "nan"),  # a traceback
    ("train.consistency_weight=.nan", "train.consistency_weight", "nan"),
    ("train.lr=.inf", "train.lr", "inf"),  # trained until three losses were NaN
    ("train.min_lr=.nan", "train.min_lr", "nan"),
    ("train.adam_eps=.inf", "train.adam_eps", "inf"),
    ("train.adam_beta1=.nan", "train.adam_beta1", "nan"),
    ("train.adam_beta2=-.inf", "train.adam_beta2", "-inf"),
    ("train.relax_lr_scale=.inf", "train.relax_lr_scale", "inf"),
    ("logging.peak_tflops_per_device=.nan", "logging.peak_tflops_per_device", "nan"),
    ("model.rope_theta=.inf", "model.rope_theta", "inf"),
    ("train.step_size_distribution={choices: [1, .nan]}", "train.step_size_distribution.choices[1]", "nan"),
    ("train.step_size_distribution={choices: [1, 2], weights: [1, .inf]}",
     "train.step_size_distribution.weights[1]", "inf"),
    ("train.step_size_distribution={low: 1, high: .inf}", "train.step_size_distribution.high", "inf"),
    ("train.readout_weights={2: .inf}", "train.readout_weights.2", "inf"),
    ("train.solvers={euler: .nan}", "train.solvers.euler", "nan"),
    ("eval.step_sizes=[1, .nan]", "eval.step_sizes[1]", "nan"),
])
def test_every_number_setting_refuses_nan_and_infinity_naming_the_key(override, key, shown):
    with pytest.raises(ConfigError) as error:
        load_config(["quickstart"], [override])
    assert str(error.value) == f"{key} must be a finite number, got {shown}"


@pytest.mark.parametrize("override, message", [
    ("logging.peak_tflops_per_device=0", "logging.peak_tflops_per_device must be > 0, got 0.0"),
    ("data.weights=[-1]", "data.weights[0] must be a number >= 0, got -1"),
])
def test_other_number_ranges_are_checked(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(["quickstart"], [override, "data.corpora=[one]"])
    assert str(error.value) == message


def test_the_nonfinite_guard_names_only_a_checkpoint_that_exists(tmp_path):
    from launcher.checkpointing import COMPLETE, tag_for
    from launcher.faults import NonFiniteGuard, NonFiniteLossError

    def stop_message(guard: NonFiniteGuard) -> str:
        with pytest.raises(NonFiniteLossError) as error:
            for step in (2, 3, 4):  # train.lr: .inf: step 1 finite, its update spoils every weight
                guard.update(step, math.nan, finite=False)
        return str(error.value)

    message = stop_message(NonFiniteGuard(3, checkpoint_dir=tmp_path / "checkpoints"))
    assert "No checkpoint was written before step 2, the first with a non-finite loss" in message
    assert "The last checkpoint was written" not in message
    for step in (1, 5):  # step 5: from another run resumed at step 1, not from before the streak
        (tmp_path / "checkpoints" / tag_for(step)).mkdir(parents=True)
        (tmp_path / "checkpoints" / tag_for(step) / COMPLETE).write_text("{}")
    message = stop_message(NonFiniteGuard(3, checkpoint_dir=tmp_path / "checkpoints"))
    assert f"The newest checkpoint from before step 2, the first with a non-finite loss, is " \
           f"{tmp_path / 'checkpoints' / tag_for(1)}; lower train.lr" in message


# ---- the reference -------------------------------------------------------------------------------------

def test_docs_config_md_is_what_the_schema_generates():
    from launcher.config.reference import reference

    assert (REPO / "docs" / "config.md").read_text() == reference(), \
        "docs/config.md is out of date: python -m launcher.config.reference > docs/config.md"
    for key in ("`step_size_distribution`", "`zero_stage`", "`segments`", "`peak_tflops_per_device`"):
        assert key in reference()
