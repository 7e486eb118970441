"""The decoders' defaults, in a file that imports nothing, so the commands' ``--help`` can show them without
loading torch. Copied into exported folders with the decoders."""

DEFAULT_SWIFT_STEP_SIZE = 4.0  # energy routing's swift step size B
DEFAULT_DRAFT_TOKENS = 4  # self-speculative draft length k
