"""Folders that used to give wrong numbers with exit 0 or lose data: export onto its own input, step sizes refused
before any weight is read, non-finite weights."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

# ---- 2, 3. export: step sizes refused before any weight is read; never onto its own input ------------------
from odegpt.commands.cli import main as odegpt_main  # noqa: E402


def _odegpt(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = odegpt_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_export_refuses_a_too_small_step_size_before_reading_any_weight(model_folder, tmp_path, capsys,
                                                                        monkeypatch):
    from odegpt import OdeGPTForCausalLM

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the step size was checked")

    monkeypatch.setattr(OdeGPTForCausalLM, "from_pretrained", no_weights)
    code, err = _odegpt(capsys, "export", "--model", model_folder, "--output", tmp_path / "out", "--step-size", "1e-6")
    assert code == 2 and err.count("\n") == 1 and "--step-size: step size 1e-06 needs" in err, err
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_its_input_nor_a_folder_without_overwrite(model_folder, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(model_folder, model)
    weights = (model / "model.safetensors").read_bytes()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    earlier = tmp_path / "earlier"
    assert _odegpt(capsys, "export", "--model", model, "--output", earlier)[0] == 0
    cases = [(model, "is the --model folder"), (model / "sub", "is inside --model"),
             (tmp_path, "holds the --model folder"), (kept, "exists and is not a model folder"),
             (earlier, "exists and is not empty")]
    for output, message in cases:
        code, err = _odegpt(capsys, "export", "--model", model, "--output", output, "--dtype", "bfloat16")
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert (model / "model.safetensors").read_bytes() == weights and not (model / "sub").exists()
    assert (kept / "notes.txt").read_text() == "mine"

    code, err = _odegpt(capsys, "export", "--model", model, "--output", earlier, "--dtype", "bfloat16", "--overwrite")
    assert code == 0, err
    assert len((earlier / "model.safetensors").read_bytes()) < len(weights)  # bf16 now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "kept", "m"]  # no staging folder or lock left


# ---- 5. non-finite weights: refused on load, naming the tensor ------------------------------------------

def _overwrite_tensor_bytes(folder: Path, name: str) -> None:
    """What a damaged copy does: the tensor's bytes become 0xff (NaN in float32); the file still loads."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_size = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8:8 + header_size])[name]["data_offsets"]
    data[8 + header_size + start:8 + header_size + end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))


def test_nonfinite_weights_are_refused_by_every_command_that_loads_them(model_folder, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(model_folder, damaged)
    _overwrite_tensor_bytes(damaged, "model.norm.weight")
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    commands = [["generate", "--model", damaged, "--max-new-tokens", "3"],
                ["evaluate", "--model", damaged, "--data", tmp_path / "text.txt", "--step-sizes", "1",
                 "--seq-len", "16"],
                ["export", "--model", damaged, "--output", tmp_path / "out"]]
    for argv in commands:
        code, err = _odegpt(capsys, *argv)
        assert code == 2 and "Traceback" not in err, (argv, err)
        err = err.strip().splitlines()[-1]  # after transformers' loading bar, one line
        assert (f"odegpt {argv[0]}: {damaged} has non-finite weights (NaN or infinity): "
                "model.norm.weight (64 of 64)") in err, err
    assert not (tmp_path / "out").exists()




# ---- the second list: weight files and config.json values that gave tracebacks or wrong numbers ----------

def _edited_weights(model_folder, tmp_path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "edited"
    shutil.copytree(model_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _first(tensors, part: str) -> str:
    return next(name for name in sorted(tensors) if part in name)


def test_weights_of_another_shape_are_named_with_both_shapes(model_folder, tmp_path, capsys):
    def narrower(t):
        t[_first(t, "q_proj")] = t[_first(t, "q_proj")][:, :-1].contiguous()

    def transposed(t):
        t[_first(t, "up_proj")] = t[_first(t, "up_proj")].t().contiguous()

    for edit, part in ((narrower, "q_proj"), (transposed, "up_proj")):
        folder = _edited_weights(model_folder, tmp_path / part, edit)
        code, err = _odegpt(capsys, "generate", "--model", folder, "--prompt", "def ", "--max-new-tokens", "2")
        assert code == 2 and f"{part}.weight has shape" in err and "the model's is" in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_an_empty_or_garbled_weight_file_is_one_line(model_folder, tmp_path, capsys):
    for name, content in (("empty", b""), ("bad-header", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")):
        folder = tmp_path / name
        shutil.copytree(model_folder, folder)
        (folder / "model.safetensors").write_bytes(content)
        code, err = _odegpt(capsys, "generate", "--model", folder, "--prompt", "def ", "--max-new-tokens", "2")
        assert code == 2 and "model.safetensors is not a readable safetensors file" in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_finite_weights_too_large_for_any_model_are_refused(model_folder, tmp_path, capsys):
    def huge(t):
        t[_first(t, "down_proj")] = t[_first(t, "down_proj")] * 1e35

    folder = _edited_weights(model_folder, tmp_path, huge)
    code, err = _odegpt(capsys, "generate", "--model", folder, "--prompt", "def ", "--max-new-tokens", "2")
    assert code == 2 and "down_proj.weight, beyond any trained model's" in err, err


def test_a_config_without_a_shape_field_is_named(model_folder, tmp_path, capsys):
    for field in ("hidden_size", "vocab_size"):
        folder = tmp_path / field
        shutil.copytree(model_folder, folder)
        config = json.loads((folder / "config.json").read_text())
        del config[field]
        (folder / "config.json").write_text(json.dumps(config))
        code, err = _odegpt(capsys, "generate", "--model", folder, "--prompt", "def ", "--max-new-tokens", "2")
        assert code == 2 and f"config.json has no {field}" in err and len(err.strip().splitlines()) == 1, err


def test_a_prompt_on_stdin_that_is_not_utf8_and_a_seed_past_64_bits_are_one_line(model_folder, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"def \xff\xfe x")))
    code, err = _odegpt(capsys, "generate", "--model", model_folder, "--prompt", "-", "--max-new-tokens", "2")
    assert code == 2 and "--prompt -: stdin is not UTF-8 text (byte 0xff at offset 4)" in err, err
    code, err = _odegpt(capsys, "generate", "--model", model_folder, "--prompt", "def ", "--seed",
                        "99999999999999999999", "--temperature", "1")
    assert code == 2 and "--seed must be an integer in [0, 2**63)" in err, err


def test_an_output_that_is_a_file_or_cannot_be_written_is_one_line(model_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 40)
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    evaluate = ["evaluate", "--model", model_folder, "--data", tmp_path / "text.txt", "--seq-len", "16", "--no-speed"]
    code, err = _odegpt(capsys, *evaluate, "--output", taken)
    assert code == 2 and f"--output {taken} is a file, not a folder" in err and err.count("\n") == 1, err
    assert taken.read_text() == "mine"

    import odegpt.evaluation.report as report  # what a read-only folder or a full disk does to the write

    def refused(document, output_dir):
        raise PermissionError(13, "Permission denied", str(Path(output_dir) / "results.json"))

    monkeypatch.setattr(report, "write_report", refused)
    code, err = _odegpt(capsys, *evaluate, "--output", tmp_path / "report")
    assert code == 1 and err.strip().splitlines()[-1] == \
        f"odegpt evaluate: Permission denied: {tmp_path / 'report' / 'results.json'}", err


def test_a_tokenizer_larger_than_the_models_vocabulary_is_one_line(model_folder, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 100  # the tokenizer has more ids: they would index past the embedding
    (folder / "config.json").write_text(json.dumps(config))
    code, err = _odegpt(capsys, "generate", "--model", folder, "--prompt", "def ", "--max-new-tokens", "2")
    assert code == 2 and "tokens, more than the model's vocabulary of 100" in err and err.count("\n") == 1, err


def test_a_full_disk_while_writing_the_weights_is_one_line_and_leaves_nothing(model_folder, tmp_path, capsys,
                                                                              monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):  # what safetensors raises when the device fills up mid-write
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    for kind in ("native", "unrolled"):
        code, err = _odegpt(capsys, "export", "--model", model_folder, "--output", tmp_path / kind, "--format", kind)
        assert code == 1 and "No space left on device" in err and err.count("\n") == 1, err
        assert f"{tmp_path / kind}" in err and ".partial" not in err, err  # names --output, not the staging folder
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder
