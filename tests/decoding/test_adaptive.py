"""Adaptive depth per token: entropy early exit, energy routing, and the KV fills for mixed schedules."""
import pytest
import torch

from odegpt import OdeGPTForCausalLM
from odegpt.commands.cli import main as odegpt_main
from odegpt.decoding.adaptive import AdaptiveCache, AdaptiveDepth, adaptive_forward, energy, entropy
from odegpt.evaluation.calibration import calibrate_energy
from odegpt.evaluation.perplexity import adaptive_nll_sums
from odegpt.model.accounting import adaptive_flops_per_token, model_cost
from odegpt.model.solver import plan_solve
from tests.conftest import EXACT, FULLY_SHARED, PARTIALLY_SHARED, damped, exact_model, left_padded, tiny_config

FILLS = ("lazy", "copy", "interpolate")


@pytest.fixture(params=["fully_shared", "partially_shared", "partially_shared-heun", "partially_shared-relaxed",
                        "partially_shared-relaxed-heun"])
def model(request):
    """Residual branches scaled down, as in a trained model, so that solves at different step sizes
    mostly agree and read-outs sharpen along the solve: exits and routing then split the tokens. The Heun
    variant takes two block evaluations (two KV-cache slots) per step; the relaxed ones have shared maps that
    vary with time (random rank-2 corrections), so a state's keys depend on the step that projects it."""
    segments = FULLY_SHARED if request.param == "fully_shared" else PARTIALLY_SHARED
    relaxed = "relaxed" in request.param
    model = damped(exact_model(segments, solver="heun" if request.param.endswith("heun") else "euler",
                              relax_rank=2 if relaxed else 0), 0.3)
    if relaxed:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".relax_" in name:
                    parameter.normal_(0, 0.3)
    return model


def decode(model, settings: AdaptiveDepth, input_ids, attention_mask=None, prefix: int = 3) -> torch.Tensor:
    """Logits of every position fed through an AdaptiveCache: a prefix, then one token at a time."""
    cache, logits = AdaptiveCache(), []
    for begin, end in [(0, prefix)] + [(i, i + 1) for i in range(prefix, input_ids.shape[1])]:
        mask = None if attention_mask is None else attention_mask[:, :end]
        out = adaptive_forward(model, input_ids[:, begin:end], settings, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def median_threshold(values: torch.Tensor) -> float:
    """Halfway between the two middle values: half the tokens on each side, none within rounding of it."""
    ordered = values.flatten().sort().values
    middle = len(ordered) // 2
    return float(ordered[middle - 1:middle + 1].mean())


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("kv_fill, step_size", [("lazy", 1.0), ("copy", 0.5), ("interpolate", 1.0)])
def test_an_exit_that_never_fires_is_the_fixed_step_solve(model, kv_fill, step_size):
    prompt = torch.randint(1, 97, (2, 9))
    fixed = model(prompt, step_size=step_size, use_cache=False).logits
    settings = AdaptiveDepth(exit_entropy=0.0, kv_fill=kv_fill, step_size=step_size)
    out = adaptive_forward(model, prompt, settings)
    torch.testing.assert_close(out.logits, fixed, **EXACT)
    assert bool((out.counts.executed_steps == model.config.solver_steps(step_size)).all())
    kwargs = dict(max_new_tokens=6, do_sample=False, step_size=step_size, pad_token_id=0)
    plain = model.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, exit_entropy=0.0, kv_fill=kv_fill, **kwargs), plain)


@pytest.mark.parametrize("kv_fill", FILLS)
def test_routing_every_token_is_the_super_solve_and_routing_none_is_the_swift_solve(model, kv_fill):
    prompt = torch.randint(1, 97, (2, 9))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    for threshold, step_size in ((-float("inf"), 1.0), (float("inf"), 4.0)):
        settings = AdaptiveDepth(route_energy=threshold, kv_fill=kv_fill, step_size=1.0, swift_step_size=4.0)
        fixed = model(prompt, step_size=step_size, use_cache=False).logits
        torch.testing.assert_close(adaptive_forward(model, prompt, settings).logits, fixed, **EXACT)
        plain = model.generate(prompt, step_size=step_size, **kwargs)
        routed = model.generate(prompt, route_energy=threshold, kv_fill=kv_fill, swift_step_size=4.0, **kwargs)
        assert torch.equal(routed, plain), f"route_energy={threshold}"


@pytest.mark.parametrize("kv_fill", FILLS)
def test_an_exit_that_always_fires_is_the_solve_cut_at_its_first_check(kv_fill):
    model = exact_model(FULLY_SHARED)
    first_step = OdeGPTForCausalLM(tiny_config([{"depth": 1, "shared": True}])).double().eval()
    first_step.load_state_dict(model.state_dict())  # the same block, integrated for time 1 only
    prompt = torch.randint(1, 97, (1, 7))
    out = adaptive_forward(model, prompt, AdaptiveDepth(exit_entropy=1e9, kv_fill=kv_fill))
    torch.testing.assert_close(out.logits, first_step(prompt, use_cache=False).logits, **EXACT)
    assert bool((out.counts.executed_steps == 1).all()) and bool((out.counts.readouts == 1).all())
    # A check every 2 steps exits at time 2: the same block integrated for time 2.
    first_two = OdeGPTForCausalLM(tiny_config([{"depth": 2, "shared": True}])).double().eval()
    first_two.load_state_dict(model.state_dict())
    out = adaptive_forward(model, prompt, AdaptiveDepth(exit_entropy=1e9, kv_fill=kv_fill, check_every=2))
    torch.testing.assert_close(out.logits, first_two(prompt, use_cache=False).logits, **EXACT)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, exit_entropy=1e9, kv_fill=kv_fill, **kwargs)[:, 7:],
                       first_step.generate(prompt, **kwargs)[:, 7:])


@pytest.mark.parametrize("segments, check_every, projections", [
    (FULLY_SHARED, 1, 1),  # exit after step 1 of 4: the one shared block projects the frozen state once
    (PARTIALLY_SHARED, 1, 3),  # exit after the unshared first layer: shared blocks 1, 2 and the last layer
    (PARTIALLY_SHARED, 2, 3),  # exit one step into block 1: its two remaining steps share one projection
])
def test_a_frozen_token_is_projected_once_per_block_it_has_left(segments, check_every, projections):
    model, prompt = exact_model(segments), torch.randint(1, 97, (2, 6))
    for kv_fill in ("copy", "interpolate"):
        settings = AdaptiveDepth(exit_entropy=1e9, kv_fill=kv_fill, check_every=check_every)
        counts = adaptive_forward(model, prompt, settings).counts
        assert bool((counts.kv_projections == projections).all()), (kv_fill, counts.kv_projections)
        # Decoding, where every token has exited and the reused projection is what later steps cache,
        # gives the same logits as scoring the sequence in one pass.
        torch.testing.assert_close(decode(model, settings, prompt), adaptive_forward(model, prompt, settings).logits,
                                   **EXACT)


def test_routing_fills_each_swift_state_with_one_projection_per_block():
    model, prompt = exact_model(FULLY_SHARED), torch.randint(1, 97, (1, 6))
    # Nobody routed: the super solve at times 0, 1, 2, 3 attends to the swift states at times 0 and 4:
    # copy takes 0, 0, 0 (a tie goes earlier), 4; interpolate mixes 0 and 4. Two projections either way.
    for kv_fill in ("copy", "interpolate"):
        settings = AdaptiveDepth(route_energy=float("inf"), kv_fill=kv_fill, step_size=1.0, swift_step_size=4.0)
        counts = adaptive_forward(model, prompt, settings, past_key_values=AdaptiveCache()).counts
        assert bool((counts.kv_projections == 2).all()), (kv_fill, counts.kv_projections)


def uncached_early_exit(model, input_ids, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for lazy early exit: the whole fixed-step solve at a=1 over the sequence, no cache,
    each token read out after the first step whose entropy is below ``threshold``."""
    inner = model.model
    h = inner.embed_tokens(input_ids)
    cos, sin, mask = inner.attention_inputs(h, None, None, 0)
    plan = plan_solve(model.config.segments, 1.0, method=model.config.solver)
    logits = exit_step = None
    for step in plan:
        h = plan.method.step(inner.blocks[step.block], h, step.dt, cos=cos, sin=sin, mask=mask, cache=None,
                             slot=step.slots.start, time=step.start)
        step_logits = model.read_out(h)
        if logits is None:
            logits, exit_step = step_logits.clone(), torch.full(input_ids.shape, len(plan))
        pending = exit_step == len(plan)
        exits = pending & ((entropy(step_logits) < threshold) | step.last)
        logits[exits], exit_step[exits] = step_logits[exits], step.index + 1
    return logits, exit_step


def test_lazy_fill_equals_uncached_recomputation_of_the_same_schedule(model):
    tokens = torch.randint(1, 97, (2, 14))
    threshold = median_threshold(entropy(model(tokens, step_size=1.0, use_cache=False).logits))
    reference, exit_step = uncached_early_exit(model, tokens, threshold)
    assert len(exit_step.unique()) > 1  # the schedules are mixed
    settings = AdaptiveDepth(exit_entropy=threshold, kv_fill="lazy")
    torch.testing.assert_close(decode(model, settings, tokens), reference, **EXACT)
    assert torch.equal(adaptive_forward(model, tokens, settings).counts.executed_steps, exit_step.float())

    # Routing: each token's logits are its swift solve's or, above the threshold, the whole super solve's.
    swift, full = (model(tokens, step_size=a, use_cache=False).logits for a in (4.0, 1.0))
    threshold = median_threshold(energy(swift))
    routed = energy(swift) > threshold
    settings = AdaptiveDepth(route_energy=threshold, kv_fill="lazy")
    torch.testing.assert_close(decode(model, settings, tokens), torch.where(routed[..., None], full, swift),
                               **EXACT)


@pytest.mark.parametrize("kv_fill", ["copy", "interpolate"])
@pytest.mark.parametrize("method", ["exit", "route"])
def test_copy_and_interpolate_decode_mixed_schedules_in_a_left_padded_batch(model, kv_fill, method):
    rows = [torch.randint(1, 97, (n,)) for n in (10, 4, 7)]
    input_ids, attention_mask = left_padded(rows)
    real = attention_mask.bool()
    if method == "exit":
        final = model(input_ids, attention_mask=attention_mask, step_size=1.0).logits
        settings = AdaptiveDepth(exit_entropy=median_threshold(entropy(final)[real]), kv_fill=kv_fill)
    else:
        swift = model(input_ids, attention_mask=attention_mask, step_size=4.0).logits
        settings = AdaptiveDepth(route_energy=median_threshold(energy(swift)[real]), kv_fill=kv_fill)
    whole = adaptive_forward(model, input_ids, settings, attention_mask=attention_mask)
    assert len(whole.counts.executed_steps[real].unique()) > 1  # tokens took different schedules
    # Decoding with the cache gives each token the logits of the one-pass scoring, and padding changes nothing.
    torch.testing.assert_close(decode(model, settings, input_ids, attention_mask)[real], whole.logits[real],
                               **EXACT)
    for i, row in enumerate(rows):
        alone = adaptive_forward(model, row[None], settings).logits[0]
        torch.testing.assert_close(whole.logits[i, -len(row):], alone, **EXACT)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, kv_fill=kv_fill,
                  **({"exit_entropy": settings.exit_entropy} if method == "exit" else
                     {"route_energy": settings.route_energy}))
    batch = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    for i, row in enumerate(rows):
        assert torch.equal(batch[i, input_ids.shape[1]:], model.generate(row[None], **kwargs)[0, len(row):])
    if method == "route":  # the fill matters: it is not the exact (lazy) answer
        lazy = adaptive_forward(model, input_ids, AdaptiveDepth(route_energy=settings.route_energy, kv_fill="lazy"),
                                attention_mask=attention_mask)
        assert not torch.allclose(lazy.logits[real], whole.logits[real], atol=1e-4)


def test_calibration_hits_its_compute_target_on_held_out_text():
    model = exact_model(FULLY_SHARED)
    generator = torch.Generator().manual_seed(1)
    calibration, held_out = ([torch.randint(1, 97, (8, 65), generator=generator) for _ in range(2)] for _ in range(2))
    super_flops = model_cost(model.config, 1.0, seq_len=64).flops_per_token
    for target in (0.5, 0.8):
        record = calibrate_energy(model, calibration, AdaptiveDepth(route_energy=0.0), target, seq_len=64)
        score = adaptive_nll_sums(model, held_out, AdaptiveDepth(route_energy=record["route_energy"]))
        flops = adaptive_flops_per_token(model.config, score.per_token("executed_steps"), score.per_token("readouts"),
                                         seq_len=64)
        assert abs(flops / super_flops - target) < 0.05 * target, (target, flops / super_flops)
        assert 0 < record["routed_fraction"] < 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adaptive") / "model"
    exact_model(PARTIALLY_SHARED).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")  # flags are refused before the tokenizer is read
    return folder


@pytest.mark.parametrize("command, args, message", [
    ("generate", ["--exit-entropy", "-1"], "--exit-entropy must be an entropy in nats >= 0"),
    ("generate", ["--route-energy", "nan"], "--route-energy must be a real energy threshold"),
    ("generate", ["--route-energy", "1", "--kv-fill", "nearest"], "--kv-fill must be one of lazy, copy, interpolate"),
    ("generate", ["--target-compute", "1.5"],
     "--target-compute must be a fraction of the super solve's FLOPs in (0, 1]"),
    ("generate", ["--target-compute", "0.5"], "holds no calibration for it"),
    ("generate", ["--exit-entropy", "1", "--route-energy", "1"], "are alternatives: give one"),
    ("evaluate", ["--exit-entropy", "-0.5"], "--exit-entropy must be an entropy in nats >= 0"),
    ("evaluate", ["--target-compute", "0"], "--target-compute must be a fraction of the super solve's FLOPs in (0, 1]"),
    ("evaluate", ["--route-energy", "1", "--kv-fill", "copy,bogus"], "--kv-fill must be one of"),
    ("evaluate", ["--exit-entropy", "x"], "--exit-entropy: 'x' is not a number"),
    ("evaluate", ["--route-energy", "1", "--swift-step-size", "0"], "--swift-step-size must be a real number > 0"),
])
def test_bad_flag_values_are_one_line_errors(folder, capsys, command, args, message):
    data = ["--data", str(folder)] if command == "evaluate" else []
    assert odegpt_main([command, "--model", str(folder), *data, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"odegpt {command}: ") and message in err and len(err.splitlines()) == 1, err


def test_generate_keywords_are_checked():
    model = exact_model(FULLY_SHARED)
    prompt = torch.randint(1, 97, (1, 4))
    with pytest.raises(ValueError, match="exit_entropy must be an entropy in nats >= 0"):
        model.generate(prompt, exit_entropy=-1.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="kv_fill, swift_step_size and check_times apply to adaptive depth"):
        model.generate(prompt, kv_fill="copy", max_new_tokens=2)
    with pytest.raises(ValueError, match="check_times apply to adaptive depth"):
        model.generate(prompt, check_times=(2.0,), max_new_tokens=2)
    with pytest.raises(ValueError, match="separate decoders"):
        model.generate(prompt, exit_entropy=1.0, draft_step_size=4, max_new_tokens=2)


def test_evaluate_reports_adaptive_rows_and_saves_the_calibration_beside_the_model(tmp_path, capsys):
    import json

    from data_pipeline.tokenizer import train_tokenizer
    from odegpt.folders.export import save_native

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 1\n" * 30
    (tmp_path / "corpus.txt").write_text(text)
    info = train_tokenizer([str(tmp_path / "corpus.txt")], tmp_path / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    model = OdeGPTForCausalLM(tiny_config(FULLY_SHARED, vocab_size=info.vocab_size, pad_token_id=info.pad_id,
                                          eos_token_id=info.eos_id, bos_token_id=info.bos_id))
    folder = save_native(model, tmp_path / "model", tokenizer_dir=tmp_path / "tokenizer")
    common = ["evaluate", "--model", str(folder), "--data", str(tmp_path / "corpus.txt"), "--seq-len", "32",
              "--step-sizes", "1,4", "--no-speed", "--json"]
    assert odegpt_main([*common, "--exit-entropy", "0", "--target-compute", "0.8"]) == 0
    document = json.loads(capsys.readouterr().out)
    fixed = {row["step_size"]: row for row in document["results"]}
    never_exits, routed = document["adaptive"]
    assert never_exits["executed_steps"] == 4 and never_exits["perplexity"] == pytest.approx(fixed[1.0]["perplexity"])
    assert 1 < routed["executed_steps"] < 4
    saved = json.loads((folder / "adaptive_calibration.json").read_text())["route_energy"]
    assert [record["target_compute"] for record in saved] == [0.8]
    assert routed["route_energy"] == saved[0]["route_energy"]
    # generate reads the saved threshold
    assert odegpt_main(["generate", "--model", str(folder), "--prompt", "def ", "--max-new-tokens", "4",
                        "--target-compute", "0.8"]) == 0
    assert "adaptive depth: route energy >" in capsys.readouterr().err


def test_readout_losses_add_the_weighted_loss_of_the_solve_cut_at_each_time():
    from odegpt.model.loss import shifted_cross_entropy
    from odegpt.training.objective import language_model_loss, objective_flops_per_token, readout_slots

    with torch.enable_grad():
        model = exact_model(FULLY_SHARED).train()
        tokens = torch.randint(1, 97, (2, 13))
        cut = {}
        for depth in (1, 2):
            cut[depth] = OdeGPTForCausalLM(tiny_config([{"depth": depth, "shared": True}])).train()
            cut[depth].load_state_dict(model.state_dict())

        def cross_entropy(m, a=1.0):
            return shifted_cross_entropy(m(tokens[:, :-1], step_size=a, use_cache=False).logits.float(), tokens)

        weights = {1: 0.5, 2: 0.25, 2.5: 1.0}  # 2.5 is no step boundary at a = 1 or 2: skipped
        expected = cross_entropy(model) + 0.5 * cross_entropy(cut[1]) + 0.25 * cross_entropy(cut[2])
        torch.testing.assert_close(language_model_loss(model, tokens, 1.0, readout_weights=weights), expected)
        expected = cross_entropy(model, 2.0) + 0.25 * shifted_cross_entropy(
            cut[2](tokens[:, :-1], step_size=2.0, use_cache=False).logits.float(), tokens)
        torch.testing.assert_close(language_model_loss(model, tokens, 2.0, readout_weights=weights), expected)
    assert readout_slots(model.config, 4.0, weights) == []
    head = 2 * model.config.vocab_size * model.config.hidden_size
    assert objective_flops_per_token(model.config, 1.0, 16, readout_weights=weights) == \
        objective_flops_per_token(model.config, 1.0, 16) + 3 * 2 * head


@pytest.mark.parametrize("override, message", [
    ("train.readout_weights={4: 0.3}", r"time 4 must be a number in \(0, 4\)"),
    ("train.readout_weights={2: -1}", "weight -1 at time 2 must be >= 0"),
    ("train.readout_weights=[2]", "train.readout_weights must be dict"),
])
def test_readout_weights_config_errors_name_the_key(override, message):
    from launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(["quickstart"], [override])


def test_generate_takes_the_settings_as_one_object():
    model = exact_model(FULLY_SHARED)
    prompt = torch.randint(1, 97, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    by_keywords = model.generate(prompt, exit_entropy=4.0, kv_fill="interpolate", step_size=0.5, **kwargs)
    settings = AdaptiveDepth(exit_entropy=4.0, kv_fill="interpolate", step_size=0.5)
    assert torch.equal(model.generate(prompt, adaptive=settings, **kwargs), by_keywords)
    out = model.generate(prompt, adaptive=AdaptiveDepth(exit_entropy=1e9, check_every=2), step_size=1.0,
                         return_dict_in_generate=True, **kwargs)
    assert out.executed_steps_per_token == 2.0 and out.readouts_per_token == 1.0
    with pytest.raises(ValueError, match="not both"):
        model.generate(prompt, adaptive=settings, kv_fill="copy", **kwargs)
