"""odegpt's data pipeline: raw text -> tokenizer -> token shards -> packed, blended training samples.

Modules, one idea each:

* `tokenizer` - train a SentencePiece model (byte fallback, fixed special ids) and its Hugging
  Face twin; read a tokenizer folder of either kind, odegpt's or any Hugging Face fast tokenizer
  (`TokenizerInfo.load(dir)`, `tokenizer_fingerprint(dir)`, `load_tokenizer(dir)`).
* `readers`   - input formats (txt/jsonl/json/parquet, gzip/zstd, saved HF datasets, ``stdlib``).
* `prepare`   - parallel, streaming, resumable, deterministic tokenization into shards.
* `shards`, `manifest` - the on-disk format (``.bin``/``.idx`` + ``manifest.json``) and its checks.
* `datasets`  - `build_datasets` (packing, seeded epochs, blending, validation) and
  `DistributedBatchSampler` (exact resume from ``consumed_samples``).
* `files`     - atomic writes and content digests (shared by `odegpt` and `launcher` too).
* `cli`       - ``odegpt tokenizer | prepare | inspect``.

Importing this package is cheap; nothing here imports torch, `odegpt` or `launcher`.
"""
