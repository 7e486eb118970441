"""Decoders above the model: self-speculative decoding and adaptive depth, behind one ``generate``
(``odegpt.decoding.generate``). Importing this package imports nothing else, so that the commands can read
``odegpt.decoding.defaults`` without loading torch."""
