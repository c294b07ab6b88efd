"""BitX: lossless XOR-delta of a fine-tuned model against its base model (ZipLLM), as a filter in
the elves codec pipeline, and more: per-plane choice, unchanged elements dropped, the exponent
ranked given the base's, rows appended.

- ``bitx.codec``: the ``xor`` codec (named in ``elves.codecs.registry``);
- ``bitx.base``: base models (a model file/folder or an ``.elves`` archive), read and checked;
- ``bitx.delta``: which tensors to code against which base tensors, and how.

Use it through ``elves.compress(..., base=...)`` / ``elves compress --base``. Family clustering
and the multi-model store come next.
"""
