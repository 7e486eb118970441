"""Model folders are data, never code: what every odegpt command reads from a folder
(odegpt/folders/model_folder.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from odegpt.commands.cli import main as odegpt_main
from odegpt.folders.export import save_native
from tests.conftest import tokenized_tiny_model

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40
# What a hostile folder's code does when it runs: leave a file behind.
PAYLOAD = "import pathlib; pathlib.Path({marker!r}).write_text('the folder ran its code')\n"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    model, _ = tokenized_tiny_model(root, TEXT)
    return save_native(model, root / "model", tokenizer_dir=root / "tokenizer")


def hostile_copy(model_folder: Path, target: Path, marker: Path, model_type: str) -> Path:
    """``model_folder`` with code that writes ``marker`` when imported, named by config.json's auto_map."""
    shutil.copytree(model_folder, target)
    for name in ("configuration_odegpt.py", "modeling_odegpt.py"):
        source = target / name
        source.write_text(PAYLOAD.format(marker=str(marker)) + source.read_text())
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {"model_type": model_type}))
    return target


def run_command(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "odegpt", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_a_folder_of_another_model_type_is_refused_in_one_line_without_asking_or_running_its_code(
        model_folder, tmp_path):
    marker = tmp_path / "ran"
    evil = hostile_copy(model_folder, tmp_path / "evil", marker, "evilmodel")
    # A user who pipes a prompt: transformers would ask "Do you wish to run the custom code?", eat the 'y' as
    # the answer and run the folder's code.
    result = run_command("generate", "--model", str(evil), "--prompt", "-", stdin="y\n")
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr.strip().splitlines() == [
        f"odegpt generate: {evil} holds a 'evilmodel' model; odegpt reads only odegpt folders and Llama folders "
        f"(such as an unrolled export), and never runs a folder's own code"], result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    for command in (["evaluate", "--model", str(evil), "--data", "stdlib"],
                    ["export", "--model", str(evil), "--output", str(tmp_path / "out")],
                    ["bench", "--model", str(evil)]):
        capsys_free = run_command(*command)
        assert capsys_free.returncode == 2 and "holds a 'evilmodel' model" in capsys_free.stderr, command
        assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_odegpt_folder_with_edited_code_runs_on_odegpts_own_classes(model_folder, tmp_path):
    marker = tmp_path / "ran"
    edited = hostile_copy(model_folder, tmp_path / "edited", marker, "odegpt")
    result = run_command("generate", "--model", str(edited), "--prompt", "def add(", "--max-new-tokens", "4",
                         stdin="y\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def add(") and not marker.exists()
    assert "[y/N]" not in result.stdout + result.stderr


def test_weights_that_do_not_belong_to_the_config_are_refused_not_initialised_at_random(model_folder, tmp_path,
                                                                                        capsys):
    as_llama = tmp_path / "as_llama"  # native weights under a Llama config: a random Llama, silently, before
    shutil.copytree(model_folder, as_llama)
    config = json.loads((as_llama / "config.json").read_text())
    (as_llama / "config.json").write_text(json.dumps(config | {"model_type": "llama", "num_hidden_layers": 7}))
    missing = tmp_path / "missing_tensor"
    shutil.copytree(model_folder, missing)
    weights = load_file(missing / "model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    empty = tmp_path / "no_tensors"
    shutil.copytree(model_folder, empty)
    save_file({}, empty / "model.safetensors", metadata={"format": "pt"})
    for folder, message in ((as_llama, "63 missing keys for a 'llama' model, e.g. model.layers.0."),
                            (missing, f"1 missing keys for a 'odegpt' model, e.g. {dropped}"),
                            (empty, "missing keys for a 'odegpt' model")):
        capsys.readouterr()
        assert odegpt_main(["generate", "--model", str(folder), "--prompt", "def", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert f"cannot load the model of {folder}" in err and message in err and err.count("\n") == 1, err


def test_solver_flag_integrates_a_native_folder_with_another_method(model_folder, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    reports = {}
    for solver in ("euler", "heun"):
        capsys.readouterr()
        assert odegpt_main(["evaluate", "--model", str(model_folder), "--data", str(text), "--step-sizes", "1,2",
                            "--seq-len", "32", "--no-speed", "--json", "--solver", solver]) == 0
        reports[solver] = json.loads(capsys.readouterr().out)
    assert reports["heun"]["solver"] == "heun" and reports["euler"]["solver"] == "euler"
    for euler, heun in zip(reports["euler"]["results"], reports["heun"]["results"]):
        assert heun["solver_steps"] == euler["solver_steps"] and heun["perplexity"] != euler["perplexity"]
        assert heun["flops_per_token"] > 1.5 * euler["flops_per_token"]  # two block evaluations per step
    assert odegpt_main(["generate", "--model", str(model_folder), "--prompt", "def", "--max-new-tokens", "3",
                        "--solver", "heun"]) == 0
    capsys.readouterr()
    assert odegpt_main(["generate", "--model", str(model_folder), "--solver", "rk4"]) == 2
    assert "--solver: solver must be one of euler, heun, got 'rk4'" in capsys.readouterr().err
    assert odegpt_main(["export", "--model", str(model_folder), "--output", str(tmp_path / "llama"),
                        "--format", "unrolled"]) == 0
    capsys.readouterr()
    assert odegpt_main(["generate", "--model", str(tmp_path / "llama"), "--solver", "heun"]) == 2
    assert "--solver applies to native odegpt models" in capsys.readouterr().err


def test_exporting_a_heun_model_unrolled_is_one_line_naming_the_reason(tmp_path, capsys):
    from tests.conftest import PARTIALLY_SHARED, tiny_model

    folder = save_native(tiny_model(PARTIALLY_SHARED, solver="heun"), tmp_path / "heun")
    assert odegpt_main(["export", "--model", str(folder), "--output", str(tmp_path / "out"),
                        "--format", "unrolled"]) == 2
    err = capsys.readouterr().err
    assert "--format unrolled: the heun solver cannot be unrolled to Llama layers: a Heun step is" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_what_a_folder_asks_for_is_bounded_before_anything_is_built(model_folder, tmp_path, capsys):
    """Each of these used to hang, exhaust memory or load silently wrong; now one line, at once."""
    config = json.loads((model_folder / "config.json").read_text())

    def edited(name: str, **changes) -> Path:
        folder = tmp_path / name
        shutil.copytree(model_folder, folder)
        fields = {k: v for k, v in (config | changes).items() if v is not None}
        if "drop" in changes:
            fields.pop(changes["drop"])
            fields.pop("drop")
        (folder / "config.json").write_text(json.dumps(fields))
        return folder

    llama = tmp_path / "llama"
    assert odegpt_main(["export", "--model", str(model_folder), "--output", str(llama), "--format", "unrolled"]) == 0
    huge_llama = tmp_path / "huge_llama"
    shutil.copytree(llama, huge_llama)
    llama_config = json.loads((llama / "config.json").read_text())
    (huge_llama / "config.json").write_text(json.dumps(llama_config | {"num_hidden_layers": 1_000_000}))
    cases = [(edited("steps", max_solver_steps=10**12), "asks for max_solver_steps 1,000,000,000,000; odegpt "
                                                        "loads at most 65,536"),
             (edited("wide", hidden_size=2**20, intermediate_size=2**22, num_attention_heads=2**10,
                     num_key_value_heads=2**10), "more than this machine's"),
             (edited("no_segments", drop="segments"), "config.json has no segments"),
             (huge_llama, "asks for 1,000,000 layers; odegpt loads at most 16,384")]
    for folder, message in cases:
        capsys.readouterr()
        assert odegpt_main(["generate", "--model", str(folder), "--prompt", "def", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (folder.name, err)


def test_a_swapped_or_truncated_tokenizer_is_refused(model_folder, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    swapped = tmp_path / "swapped"
    shutil.copytree(model_folder, swapped)
    model_file = swapped / "tokenizer.model"
    model_file.write_bytes(model_file.read_bytes()[:-100])  # truncated
    for command in (["generate", "--model", str(swapped), "--prompt", "def"],
                    ["evaluate", "--model", str(swapped), "--data", str(text), "--seq-len", "32", "--no-speed"]):
        capsys.readouterr()
        assert odegpt_main(command) == 2
        err = capsys.readouterr().err
        assert "tokenizer.model is not the tokenizer its odegpt_tokenizer.json records" in err, err


def test_evaluate_refuses_a_zero_window_instead_of_using_the_default(model_folder, capsys):
    assert odegpt_main(["evaluate", "--model", str(model_folder), "--data", "stdlib", "--seq-len", "0"]) == 2
    assert "--seq-len must be in 1.." in capsys.readouterr().err
