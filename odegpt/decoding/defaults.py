"""The decoders' defaults, in a file that imports nothing, so the commands' ``--help`` can show them without
loading torch. Copied into exported folders with the decoders."""

DEFAULT_SWIFT_STEP_SIZE = 4.0  # energy routing's swift step size B
# Self-speculative draft length: adapted each round to the running acceptance and the measured costs, none when no
# draft pays (speculative.DraftPolicy), so speculation is never much slower than plain decoding; an integer fixes it.
DEFAULT_DRAFT_TOKENS = "auto"
DEFAULT_MAX_DRAFT_TOKENS = 8  # the longest draft an adaptive length (draft_tokens="auto") tries
DEFAULT_LOOKUP_NGRAM = 2  # prompt lookup matches the sequence's last 2 tokens, else its last one
