import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from odegpt.commands.cli import main as odegpt_main
from odegpt.folders.export import save_native, save_unrolled, unroll_to_llama
from odegpt.folders.importing import retrofit
from odegpt.model.solver import plan_solve
from tests.conftest import FULLY_SHARED, PARTIALLY_SHARED, left_padded, tiny_model


def test_unshared_odegpt_is_llama():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rms_norm_eps=1e-6,
    )).eval()
    model, _ = retrofit(llama)
    assert model.config.segments == [{"depth": 3, "shared": False}]
    x = torch.randint(0, 101, (2, 11))
    torch.testing.assert_close(model(x).logits, llama(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("segments", [FULLY_SHARED, PARTIALLY_SHARED], ids=["fully", "partially"])
@pytest.mark.parametrize("a", [0.5, 1, 2, 3])
def test_unrolled_llama_gives_the_native_logits(segments, a):
    model = tiny_model(segments)
    llama = unroll_to_llama(model, a)
    assert isinstance(llama, LlamaForCausalLM)
    assert llama.config.num_hidden_layers == len(plan_solve(segments, a))
    x = torch.randint(0, 97, (2, 10))
    assert (llama(x).logits - model(x, step_size=a).logits).abs().max() <= 1e-4


def test_unrolled_folder_loads_as_a_plain_llama_and_generates_the_same(tmp_path):
    model = tiny_model(PARTIALLY_SHARED, tie_word_embeddings=True)
    save_unrolled(model, tmp_path, step_size=2)
    llama = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(llama) is LlamaForCausalLM
    assert not list(tmp_path.glob("*.py")) and list(tmp_path.glob("*.safetensors"))
    prompt = torch.randint(1, 97, (1, 5))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(llama.generate(prompt, **kwargs), model.generate(prompt, step_size=2, **kwargs))


NO_ODEGPT = textwrap.dedent("""
    import importlib.abc, sys
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("odegpt", "launcher", "data_pipeline", "tests"):
                raise ImportError("odegpt is not installed here: " + name)
    sys.meta_path.insert(0, Refuse())
    sys.path = [p for p in sys.path if p not in ("", ".")]
""")


def test_native_folder_loads_without_odegpt(tmp_path):
    model = tiny_model(PARTIALLY_SHARED)
    folder = tmp_path / "native"
    save_native(model, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("OdeGPTForCausalLM")
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    x = torch.randint(1, 97, (1, 7))
    expected = model.generate(x, max_new_tokens=8, do_sample=False, step_size=2, pad_token_id=0)
    # self-speculative decoding (the decoders travel in custom_generate/, not in the modeling code) on a left-padded
    # batch
    batch, mask = left_padded([torch.randint(1, 97, (n,)) for n in (6, 3)])
    batch_expected = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, step_size=1,
                                    pad_token_id=0)
    assert (folder / "custom_generate" / "generate.py").is_file()
    assert (folder / "custom_generate" / "speculative.py").is_file()
    assert not (folder / "speculative.py").exists()  # the modeling code imports no decoder
    torch.save({"x": x, "expected": expected, "logits": model(x, step_size=3).logits, "batch": batch, "mask": mask,
                "batch_expected": batch_expected}, tmp_path / "io.pt")
    script = NO_ODEGPT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        try:
            import odegpt
            raise SystemExit("odegpt is importable: the test proves nothing")
        except ImportError:
            pass
        io = torch.load({str(tmp_path / 'io.pt')!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model.generate(io["x"], max_new_tokens=8, do_sample=False, step_size=2, pad_token_id=0)
        assert torch.equal(out, io["expected"]), (out, io["expected"])
        assert (model(io["x"], step_size=3).logits - io["logits"]).abs().max() < 1e-5
        out = model.generate(io["batch"], attention_mask=io["mask"], max_new_tokens=10, do_sample=False, step_size=1,
                             pad_token_id=0, draft_step_size=4, draft_tokens=3, return_dict_in_generate=True)
        assert torch.equal(out.sequences, io["batch_expected"]), (out.sequences, io["batch_expected"])
        assert type(out).__name__ == "SelfSpeculativeOutput" and out.drafted_tokens > 0
        print("loaded", type(model).__name__)
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded OdeGPTForCausalLM" in result.stdout


def test_export_command_writes_native_and_unrolled_folders(tmp_path, capsys):
    model = tiny_model(FULLY_SHARED)
    save_native(model, tmp_path / "model")
    calibration = '{"records": [{"rule": "exit", "tolerance": 0.02, "threshold": -1.0, "check_times": [3]}]}\n'
    (tmp_path / "model" / "exit_calibration.json").write_text(calibration)
    assert odegpt_main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "native"),
                        "--step-size", "2"]) == 0
    assert (tmp_path / "native" / "exit_calibration.json").read_text() == calibration  # the weights' thresholds
    assert odegpt_main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "llama"),
                        "--format", "unrolled", "--step-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "native odegpt folder" in printed and "unrolled LlamaForCausalLM at step size 2: 2 layers" in printed
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert native.config.step_size == 2.0 and llama.config.num_hidden_layers == 2
    x = torch.randint(0, 97, (1, 6))
    assert (native(x).logits - llama(x).logits).abs().max() <= 1e-4
    assert odegpt_main(["export", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2


def _imported_modules(path) -> set[str]:
    import ast

    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_the_model_imports_no_decoder_and_the_decoders_import_no_odegpt():
    """The layering a native folder relies on: modeling code without decoders; decoders (custom_generate/) that
    import only torch, transformers, the standard library and each other."""
    import odegpt.decoding
    import odegpt.model

    model_dir, decoding_dir = Path(odegpt.model.__file__).parent, Path(odegpt.decoding.__file__).parent
    for path in model_dir.glob("*.py"):
        assert not {m for m in _imported_modules(path)
                    if "decoding" in m or "adaptive" in m or "speculative" in m}, path
    siblings = {"." + path.stem for path in decoding_dir.glob("*.py")}
    for path in decoding_dir.glob("*.py"):
        if path.name != "__init__.py":
            outside = {m for m in _imported_modules(path) if m.startswith(".") and m not in siblings
                       or m.split(".")[0] in ("odegpt", "launcher", "data_pipeline")}
            assert not outside, f"{path.name} imports {outside}"


def _run(*argv, capsys) -> tuple[int, str]:
    """``odegpt ARGV`` in this process: (exit code, stderr)."""
    code = odegpt_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_export_imports_an_unrolled_llama_and_refuses_bad_step_sizes(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from odegpt import OdeGPTForCausalLM
    from odegpt.folders.export import save_native, save_unrolled
    from odegpt.model.solver import plan_solve
    from tests.conftest import PARTIALLY_SHARED, tiny_model

    model = tiny_model(PARTIALLY_SHARED)
    save_native(model, tmp_path / "native")
    save_unrolled(model, tmp_path / "unrolled", step_size=2)
    code, _ = _run("export", "--model", tmp_path / "unrolled", "--output", tmp_path / "reimported", capsys=capsys)
    assert code == 0
    reimported = OdeGPTForCausalLM.from_pretrained(tmp_path / "reimported").eval()
    steps = len(plan_solve(PARTIALLY_SHARED, 2))
    assert reimported.config.segments == [{"depth": steps, "shared": False}]  # a layer per executed step at a=2
    x = torch.randint(0, 97, (2, 9))
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "unrolled").eval()
    torch.testing.assert_close(reimported(x).logits, llama(x).logits, rtol=0, atol=1e-5)

    for bad, message in (("1e-9", "needs 5,000,000,002 solver steps (trained depth 7), more than the maximum of "
                                  "1,024"), ("0", "must be a real number > 0"), ("nan", "must be a real number > 0"),
                         ("inf", "must be finite")):
        code, err = _run("export", "--model", tmp_path / "native", "--output", tmp_path / f"out-{bad}",
                            "--step-size", bad, capsys=capsys)
        lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("odegpt export: --step-size"), err
        assert message in lines[0]
        assert not (tmp_path / f"out-{bad}").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "gpt2"}')
    code, err = _run("export", "--model", tmp_path / "other", "--output", tmp_path / "x", capsys=capsys)
    assert code == 2 and "holds a 'gpt2' model" in err


def test_custom_generate_imports_every_decoder_file_itself():
    """transformers 4.57 and 5.4 copy into their module cache only the relative imports of custom_generate/generate.py
    itself (found by this regex of theirs), so a decoder file only a sibling imports is missing on those clients."""
    import re

    from odegpt.folders.export import DECODING_DIR

    source = (DECODING_DIR / "generate.py").read_text()
    direct = set(re.findall(r"^\s*from\s+\.(\S+)\s+import", source, flags=re.MULTILINE))
    files = {path.stem for path in DECODING_DIR.glob("*.py")} - {"__init__", "generate"}
    assert files <= direct, f"generate.py must import {sorted(files - direct)} itself"
