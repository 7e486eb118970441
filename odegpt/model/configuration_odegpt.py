"""Configuration of an odegpt model: a Llama-shaped decoder whose depth is a list of segments.

A segment ``{"depth": D, "shared": True}`` is ONE block integrated over time D (an ODE solve);
``{"depth": D, "shared": False}`` is D separate blocks, each taking step 1 (ordinary layers).
This file is copied verbatim into exported model folders, so it imports only transformers (and packaging,
which transformers needs) and its sibling ``solver``.
"""
from __future__ import annotations

import transformers
from packaging.version import Version
from transformers import PretrainedConfig

from .solver import DEFAULT_MAX_SOLVER_STEPS, SolveTooLongError, check_solve_length, check_step_size, solver_method

# The oldest transformers a native folder runs on (its layered DynamicCache; tests/folders/test_clients.py checks
# it in CI).
OLDEST_TRANSFORMERS = "4.57"
# Releases that load this code wrongly, and why. 5.3 drops a custom-code model's tied LM head from the weights it
# reports missing, then declines to tie it: the head stays uninitialised (logits off by 1e37).
BROKEN_TRANSFORMERS = {"5.3": "it leaves a tied LM head uninitialised in models with their own code"}


def check_transformers_version(installed: str = transformers.__version__) -> None:
    """Refuse, in one line, a transformers this folder's code cannot run on, rather than load and give wrong
    numbers."""
    version = Version(installed)
    if version < Version(OLDEST_TRANSFORMERS):
        raise ImportError(f"this odegpt model needs transformers >= {OLDEST_TRANSFORMERS}, found {installed}: "
                          f"pip install -U 'transformers>={OLDEST_TRANSFORMERS}'")
    reason = BROKEN_TRANSFORMERS.get(f"{version.major}.{version.minor}")
    if reason is not None:
        raise ImportError(f"this odegpt model cannot run on transformers {installed}: {reason}; "
                          f"pip install -U transformers")


check_transformers_version()


def parse_segments(text: str) -> list[dict]:
    """``"1u,6s,1u"`` -> segments: depth then ``u`` (unshared: that many layers) or ``s`` (shared: one block)."""
    segments = []
    for part in text.replace(" ", "").split(","):
        kind, depth = part[-1:], part[:-1]
        if kind not in ("u", "s") or not depth.isdigit() or int(depth) < 1:
            raise ValueError(f"segments {text!r}: each comma-separated part is a depth >= 1 and u (unshared) or "
                             f"s (shared), e.g. 1u,6s,1u; got {part!r}")
        segments.append({"depth": int(depth), "shared": kind == "s"})
    return segments


def _check_segments(segments: object) -> list[dict]:
    if isinstance(segments, str):
        segments = parse_segments(segments)
    if not isinstance(segments, (list, tuple)) or len(segments) == 0:
        raise ValueError(f"segments must be a non-empty list of {{'depth': int, 'shared': bool}}, got {segments!r}")
    checked = []
    for index, segment in enumerate(segments):
        if not isinstance(segment, dict) or set(segment) - {"depth", "shared"} or "depth" not in segment:
            raise ValueError(f"segments[{index}] must be {{'depth': int, 'shared': bool}}, got {segment!r}")
        depth, shared = segment["depth"], segment.get("shared", True)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"segments[{index}].depth must be an integer >= 1, got {depth!r}")
        if not isinstance(shared, bool):
            raise ValueError(f"segments[{index}].shared must be true or false, got {shared!r}")
        checked.append({"depth": depth, "shared": shared})
    return checked


def has_tail(segments: list[dict]) -> bool:
    """Whether unshared layers follow the last shared segment: the tail an exit to the tail still runs."""
    return any(segment["shared"] for segment in segments) and not segments[-1]["shared"]


class OdeGPTConfig(PretrainedConfig):
    """An odegpt model's shape and solver. (The ``model`` section of a run config is these arguments; this list
    is its documentation, in docs/config.md.)

    Args:
        vocab_size: token ids: rows of the embedding and of the LM head.
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_attention_heads: query heads; they divide hidden_size.
        num_key_value_heads: key/value heads (grouped-query attention), dividing num_attention_heads;
            None = num_attention_heads.
        max_position_embeddings: the longest sequence the model is meant for (train.seq_len fits in it).
        rope_theta: base of the rotary position frequencies.
        rms_norm_eps: epsilon of the RMS norms (> 0).
        tie_word_embeddings: the LM head is the embedding matrix.
        segments: the depth, as a list of {depth: D, shared: true|false} (shared: one block integrated over
            time D; unshared: D layers of step 1) or the short form "1u,6s,1u"; None = [{depth: 12, shared: true}].
        step_size: the step size a the model is solved at unless a call says otherwise (a finite number > 0).
        solver: the ODE solver method of shared segments (odegpt.model.solver.METHODS: euler, heun).
        max_solver_steps: the most solver steps one forward may take; a step size that needs more is refused.
        initializer_range: standard deviation of the initial weights.
        use_cache: generation keeps a KV cache.
        bos_token_id: the tokenizer's beginning-of-sequence id.
        eos_token_id: the tokenizer's end-of-sequence id.
        pad_token_id: the tokenizer's padding id.
        head_dim: width of one attention head (even: rotary positions); None = hidden_size / num_attention_heads.
        attention_bias: biases on the query, key and value projections (imported models).
        attention_output_bias: a bias on the attention's output projection (imported models).
        mlp_bias: biases in the MLP (imported models).
        source_rope_parameters: an imported model's rotary settings, kept for the Llama export.
        rotary_inv_freq: the rotary inverse frequencies transformers computed from those settings (head_dim / 2
            of them); None = from rope_theta.
        rotary_attention_scaling: the cos/sin scale of those rotary settings.
        relax_rank: the time-continuous relaxation of shared blocks: rank of each linear map's correction,
            which varies over the segment's time (0 = none, "full" = dense).
        exit_head: a learned exit head on the state (null = none, 0 = linear, N = one hidden layer of N), which
            predicts how far a state's read-out still is from the end of the solve: the exit and routing rule of
            adaptive depth (odegpt/decoding/adaptive.py).
        exit_to_tail: the head was fitted for the exit to the tail: a token it stops inside the last shared segment
            still runs the unshared layers after it, and the head predicts how far that read-out is from the end
            (needs unshared layers after the last shared segment).
    """

    model_type = "odegpt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        tie_word_embeddings: bool = False,
        segments: list[dict] | str | None = None,
        step_size: float = 1.0,
        solver: str = "euler",
        max_solver_steps: int = DEFAULT_MAX_SOLVER_STEPS,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        head_dim: int | None = None,
        attention_bias: bool = False,
        attention_output_bias: bool = False,
        mlp_bias: bool = False,
        source_rope_parameters: dict | None = None,
        rotary_inv_freq: list[float] | None = None,
        rotary_attention_scaling: float = 1.0,
        relax_rank: int | str = 0,
        exit_head: int | None = None,
        exit_to_tail: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.segments = _check_segments([{"depth": 12, "shared": True}] if segments is None else segments)
        self.step_size = check_step_size(step_size)
        self.solver = solver
        self.max_solver_steps = max_solver_steps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # What a model imported from a pretrained checkpoint may carry (odegpt.folders.importing): an explicit head
        # size, biases (Llama's attention_bias is both; Qwen2's is the input projections only), and rotary positions
        # other than the default, as the source's parameters (``source_rope_parameters``, kept for the Llama export) and
        # the inverse frequencies and cos/sin scale transformers' own rotary initialisation computed from them.
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.attention_bias, self.attention_output_bias, self.mlp_bias = attention_bias, attention_output_bias, mlp_bias
        self.source_rope_parameters = source_rope_parameters
        self.rotary_inv_freq = rotary_inv_freq
        self.rotary_attention_scaling = float(rotary_attention_scaling)
        # The time-continuous relaxation of shared blocks: rank of each linear map's correction ("full": dense).
        self.relax_rank = relax_rank
        self.exit_head = exit_head  # the learned exit head's hidden width (None: no head, 0: linear)
        self.exit_to_tail = exit_to_tail  # its exit keeps the unshared layers after the last shared segment
        kwargs.pop("num_hidden_layers", None)  # derived from segments; older folders may carry it
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "max_solver_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 2 \
                or self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be an even positive integer for rotary positions, got {self.head_dim!r}")
        if self.rotary_inv_freq is not None and len(self.rotary_inv_freq) != self.head_dim // 2:
            raise ValueError(f"rotary_inv_freq must hold head_dim/2 = {self.head_dim // 2} frequencies, "
                             f"got {len(self.rotary_inv_freq)}")
        if not (self.relax_rank == "full" or (isinstance(self.relax_rank, int) and not isinstance(self.relax_rank, bool)
                                              and self.relax_rank >= 0)):
            raise ValueError(f"relax_rank must be an integer >= 0 or 'full', got {self.relax_rank!r}")
        if self.exit_head is not None and (isinstance(self.exit_head, bool) or not isinstance(self.exit_head, int)
                                           or self.exit_head < 0):
            raise ValueError(f"exit_head must be null (no head), 0 (linear) or a hidden width >= 1, "
                             f"got {self.exit_head!r}")
        if not isinstance(self.exit_to_tail, bool):
            raise ValueError(f"exit_to_tail must be true or false, got {self.exit_to_tail!r}")
        if self.exit_to_tail and not has_tail(self.segments):
            raise ValueError("exit_to_tail needs unshared layers after the last shared segment (a tail to exit to); "
                             "set it to false for this layout")
        solver_method(self.solver)  # one of odegpt.model.solver.METHODS
        check_solve_length(self.segments, self.step_size, self.max_solver_steps)
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    @property
    def num_hidden_layers(self) -> int:
        """The trained depth: the time horizon of the whole solve at step size 1."""
        return sum(segment["depth"] for segment in self.segments)

    def solver_steps(self, step_size: float | None = None, name: str | None = None) -> int:
        """Executed steps at ``step_size`` (default: the config's); raises ``SolveTooLongError`` beyond
        ``max_solver_steps`` and ``ValueError`` for a step size that is not a finite real > 0, naming the setting
        as ``name`` (e.g. ``--step-size``) when given."""
        step_size = self.step_size if step_size is None else check_step_size(step_size, name or "step_size")
        try:
            return check_solve_length(self.segments, step_size, self.max_solver_steps)
        except SolveTooLongError as error:
            if name is None:
                raise
            raise SolveTooLongError(f"{name}: {error}") from None
