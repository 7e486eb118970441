"""`odegpt bench` and the timing loop it shares with `odegpt evaluate` (structure, not speeds)."""
import json

import pytest
import torch

from odegpt.commands.cli import main as odegpt_main
from odegpt.evaluation.throughput import Variant, measure_interleaved, random_prompt, time_generation
from odegpt.folders.export import save_native, unroll_to_llama
from odegpt.model.accounting import model_cost
from tests.conftest import PARTIALLY_SHARED, tiny_config, tiny_model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_native(tiny_model(PARTIALLY_SHARED), tmp_path_factory.mktemp("bench") / "model")


def test_timed_loop_is_greedy_decoding_with_the_cache():
    """What is timed is real work: the same tokens as generate(), and the same for the unrolled Llama."""
    model = tiny_model(PARTIALLY_SHARED)
    prompt = random_prompt(97, 2, 6)
    timed = time_generation(Variant(model, {"step_size": 2.0}), prompt, new_tokens=5)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, step_size=2.0, pad_token_id=0)
    assert torch.equal(timed.tokens, expected[:, 6:])
    llama = time_generation(Variant(unroll_to_llama(model, 2.0), {}), prompt, new_tokens=5)
    assert torch.equal(llama.tokens, timed.tokens)
    assert timed.prefill_seconds > 0 and timed.decode_seconds > 0

    calls = []
    speeds = measure_interleaved({"a": Variant(model, {}), "b": Variant(model, {"step_size": 4.0})},
                                 {1: prompt[:1], 2: prompt}, new_tokens=2, rounds=2,
                                 on_measurement=lambda: calls.append(1))
    assert sorted(speeds) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)] and len(calls) == 2 * 2 * 2


def test_bench_json_has_odegpt_and_llama_for_every_step_size_and_batch(model_folder, capsys):
    threads = torch.get_num_threads()  # --threads sets torch's global thread count: restore it after
    try:
        status = odegpt_main(["bench", "--model", str(model_folder), "--step-sizes", "2,0.5", "--batch-sizes", "1,3",
                              "--rounds", "1", "--new-tokens", "2", "--prompt-tokens", "5", "--threads", "1",
                              "--json"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    document = json.loads(capsys.readouterr().out)
    assert {key: document[key] for key in ("rounds", "prompt_tokens", "new_tokens", "threads", "dtype")} == {
        "rounds": 1, "prompt_tokens": 5, "new_tokens": 2, "threads": 1, "dtype": "float32"}
    rows = {(row["batch_size"], row["step_size"]): row for row in document["results"]}
    config = tiny_config(PARTIALLY_SHARED)
    assert sorted(rows) == [(1, 0.5), (1, 2.0), (3, 0.5), (3, 2.0)]  # a=1 is measured as the reference only
    for (_, a), row in rows.items():
        assert row["solver_steps"] == {2.0: 5, 0.5: 12}[a]
        context = 5 + 2 // 2  # mean context while decoding
        assert row["flops_per_token"] == model_cost(config, a, seq_len=context).flops_per_token
        assert row["flop_ratio"] == pytest.approx(model_cost(config, 1.0, seq_len=context).flops_per_token
                                                  / row["flops_per_token"])
        for impl in ("odegpt", "llama"):
            speeds = row[impl]
            assert set(speeds) == {"prefill_tokens_per_s", "decode_tokens_per_s", "prefill_speedup", "decode_speedup"}
            assert all(value > 0 for value in speeds.values())
        for part in ("prefill", "decode"):
            assert row["odegpt_over_llama"][part] == pytest.approx(
                row["odegpt"][f"{part}_tokens_per_s"] / row["llama"][f"{part}_tokens_per_s"])
    # 0.5 executes more steps than 2: its FLOP ratio over a=1 is below 1, the other's above.
    assert rows[1, 0.5]["flop_ratio"] < 1 < rows[1, 2.0]["flop_ratio"]


def test_bench_prints_a_table(model_folder, capsys):
    assert odegpt_main(["bench", "--model", str(model_folder), "--step-sizes", "1,4", "--batch-sizes", "2",
                        "--rounds", "1", "--new-tokens", "1", "--prompt-tokens", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("    2 ")]
    assert [row[1] for row in rows] == ["1", "4"]
    assert rows[0][-2:] == ["1.00", "1.00"]  # a=1 over a=1, odegpt and Llama


@pytest.mark.parametrize("args, message", [
    (["--step-sizes", "0"], "must be a real number > 0"),
    (["--step-sizes", "0.001"], "more than the maximum"),
    (["--batch-sizes", "0"], "--batch-sizes: expected integers >= 1"),
    (["--prompt-tokens", "100", "--new-tokens", "100"], "must stay below the model's 128 positions"),
    (["--rounds", "0"], "--rounds must be >= 1"),
])
def test_bench_bad_inputs_are_one_line_errors(model_folder, capsys, args, message):
    assert odegpt_main(["bench", "--model", str(model_folder), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


def test_bench_refuses_an_unrolled_llama_folder(model_folder, tmp_path, capsys):
    assert odegpt_main(["export", "--model", str(model_folder), "--output", str(tmp_path / "llama"),
                        "--format", "unrolled"]) == 0
    capsys.readouterr()
    assert odegpt_main(["bench", "--model", str(tmp_path / "llama")]) == 2
    assert "holds a 'llama' model; this needs a native odegpt folder" in capsys.readouterr().err
