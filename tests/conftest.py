import pytest
import torch

from odegpt import OdeGPTConfig, OdeGPTForCausalLM
from odegpt.decoding.generate import with_decoders

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40  # a tiny corpus of code
FULLY_SHARED = [{"depth": 4, "shared": True}]
PARTIALLY_SHARED = [{"depth": 1, "shared": False}, {"depth": 3, "shared": True},
                    {"depth": 2, "shared": True}, {"depth": 1, "shared": False}]
UNSHARED = [{"depth": 4, "shared": False}]
# Exactness tests compare two computations of one function: cached against uncached decoding, a draft's reused work
# against its recomputation, a batch against each row alone. In float32 the two differ by rounding whose size depends
# on the CPU (AVX2, AVX-512 and NEON kernels sum in other orders: 1.1e-4 on one, 8e-5 on another); in float64 that
# rounding is about 1e-13 of the values, so their models run in float64 and compare with EXACT, a tolerance far below
# any real error and far above rounding on every CPU. Greedy tokens compared with torch.equal meet no near-tie then.
EXACT = dict(rtol=0, atol=1e-9)


def tiny_config(segments=FULLY_SHARED, **overrides) -> OdeGPTConfig:
    """A small model with large random weights, so greedy decoding is not degenerate."""
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, segments=segments,
                  initializer_range=0.15, pad_token_id=0)
    fields.update(overrides)
    return OdeGPTConfig(**fields)


def tiny_model(segments=FULLY_SHARED, seed=0, dtype: torch.dtype = torch.float32, **overrides) -> OdeGPTForCausalLM:
    """A tiny model in eval mode whose ``generate`` has odegpt's decoders, as a loaded folder's has; the same
    weights whatever ``dtype`` (drawn in float32, then cast)."""
    torch.manual_seed(seed)
    return with_decoders(OdeGPTForCausalLM(tiny_config(segments, **overrides)).to(dtype).eval())


def exact_model(segments=FULLY_SHARED, seed=0, **overrides) -> OdeGPTForCausalLM:
    """:func:`tiny_model` in float64, for exactness tests (see EXACT)."""
    return tiny_model(segments, seed, torch.float64, **overrides)


def tokenized_tiny_model(root, text: str, segments=PARTIALLY_SHARED):
    """A tokenizer trained on ``text`` (in ``root/tokenizer``) and a tiny model with its vocabulary and
    special ids: ``(model, tokenizer info)``."""
    from data_pipeline.tokenizer import train_tokenizer

    (root / "corpus.txt").write_text(text)
    info = train_tokenizer([str(root / "corpus.txt")], root / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    model = OdeGPTForCausalLM(tiny_config(segments, vocab_size=info.vocab_size, pad_token_id=info.pad_id,
                                          eos_token_id=info.eos_id, bos_token_id=info.bos_id))
    return model, info


def damped(model: OdeGPTForCausalLM, scale: float) -> OdeGPTForCausalLM:
    """``model`` with its residual branches scaled by ``scale`` in place, as in a trained model: solves at
    different step sizes then mostly agree."""
    with torch.no_grad():
        for block in model.model.blocks:
            block.self_attn.o_proj.weight.mul_(scale)
            block.mlp.down_proj.weight.mul_(scale)
    return model


@pytest.fixture(params=["fully_shared", "partially_shared"])
def shared_model(request):
    return exact_model(FULLY_SHARED if request.param == "fully_shared" else PARTIALLY_SHARED)


def left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one left-padded batch: (input_ids, attention_mask)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A native model folder with a tokenizer trained on TEXT: a tiny partially shared model whose byte-fallback
    pieces (<0x..>, which all decode to one replacement character) are silenced, so the random model writes real
    pieces and equal text means equal tokens."""
    from transformers import AutoTokenizer

    from odegpt.folders.export import save_native

    root = tmp_path_factory.mktemp("generate")
    model, info = tokenized_tiny_model(root, TEXT)
    pieces = AutoTokenizer.from_pretrained(root / "tokenizer").convert_ids_to_tokens(list(range(info.vocab_size)))
    with torch.no_grad():
        model.lm_head.weight[[i for i, piece in enumerate(pieces) if piece.startswith("<0x")]] = 0
    return save_native(model, root / "model", tokenizer_dir=root / "tokenizer")


HF_EOS = "<|endoftext|>"


def hf_tokenizer_folder(folder, text: str | None = None, vocab_size: int = 400, eos_token: str | None = HF_EOS,
                        add_prefix_space: bool = False):
    """A tiny byte-level BPE tokenizer (GPT-2's pre-tokenizer) trained with the ``tokenizers`` library on ``text``
    (default: some of odegpt's own source), saved as a Hugging Face fast tokenizer folder with ``eos_token``."""
    from pathlib import Path

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if text is None:
        root = Path(__file__).resolve().parents[1]
        text = "".join((root / name).read_text() for name in ("odegpt/folders/export.py", "data_pipeline/prepare.py"))
    tokenizer = ByteLevelBPETokenizer(add_prefix_space=add_prefix_space)
    tokenizer.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2, special_tokens=[HF_EOS],
                                  show_progress=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer._tokenizer,
                                 **({} if eos_token is None else {"eos_token": eos_token}))
    hf.save_pretrained(str(folder))
    return Path(folder)
