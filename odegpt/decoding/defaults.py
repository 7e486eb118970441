"""The decoders' defaults, in a file that imports nothing, so the commands' ``--help`` can show them without
loading torch. Copied into exported folders with the decoders."""

DEFAULT_SWIFT_STEP_SIZE = 4.0  # energy routing's swift step size B
DEFAULT_DRAFT_TOKENS = 4  # self-speculative draft length k
DEFAULT_MAX_DRAFT_TOKENS = 8  # the longest draft an adaptive length (draft_tokens="auto") tries
DEFAULT_LOOKUP_NGRAM = 2  # prompt lookup matches the sequence's last 2 tokens, else its last one
