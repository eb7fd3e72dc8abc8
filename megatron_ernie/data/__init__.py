"""Offline real-text data: corpus -> byte-level BPE -> megatron-core indexed dataset -> GPTDataset -> micro-batches.

Modules (imported on demand; this package import is free of torch/megatron):

* ``config``     ``DataConfig``, the ``[data]`` config section
* ``corpus``     built-in (KJV, CPython stdlib) and user (.txt/.jsonl) documents
* ``tokenizer``  ``train_tokenizer``, ``load_tokenizer``, ``ByteBPETokenizer``
* ``indexed``    write/read/verify ``<prefix>.bin/.idx``
* ``preprocess`` ``preprocess(...)`` and the ``main(argv)`` command line
* ``prepare``    ``prepare_default_corpus`` / ``prepare_corpus``: atomic, cached
* ``datasets``   ``build_gpt_datasets`` via megatron-core's builder
* ``loader``     ``BatchLayout``, ``iter_global_batches``: resumable, DP-invariant
* ``pipeline``   ``setup_data(DataConfig, seq_length, num_samples)``
"""
