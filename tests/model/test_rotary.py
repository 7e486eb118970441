"""The rotary table: made once per device and dtype, read by slicing; the same angles as computing them."""
import torch

from odegpt.model.modeling_odegpt import rotary_cos_sin, rotary_inv_freq
from tests.conftest import left_padded, tiny_model


def direct(model, position_ids):
    return rotary_cos_sin(position_ids, rotary_inv_freq(model.config), 1.0, torch.float32)


def test_the_table_gives_the_angles_of_each_position_with_and_without_padding():
    model = tiny_model()
    h = torch.zeros(3, 4, model.config.hidden_size)
    cos, sin, _ = model.model.attention_inputs(h, None, None, past_len=9)
    torch.testing.assert_close((cos, sin), direct(model, torch.arange(9, 13)[None]))  # broadcast over the batch

    _, mask = left_padded([torch.ones(6, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    cos, sin, _ = model.model.attention_inputs(torch.zeros(2, 6, model.config.hidden_size), mask, None, past_len=0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]])  # padding counts no position
    torch.testing.assert_close((cos, sin), direct(model, positions))


def test_positions_past_the_table_are_computed():
    model = tiny_model()
    limit = model.config.max_position_embeddings
    cos, sin, _ = model.model.attention_inputs(torch.zeros(1, 2, model.config.hidden_size), None, None, limit - 1)
    torch.testing.assert_close((cos, sin), direct(model, torch.tensor([[limit - 1, limit]])))


def test_a_table_first_made_under_inference_mode_still_trains():
    model = tiny_model()
    tokens = torch.randint(1, 97, (2, 8))
    with torch.inference_mode():
        model(tokens)  # makes the table
    model.train()
    model(tokens, labels=tokens).loss.backward()  # an inference tensor saved for backward would raise here
    assert model.model.embed_tokens.weight.grad is not None
