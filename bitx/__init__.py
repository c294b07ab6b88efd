"""BitX: lossless XOR-delta of a fine-tuned tensor against its base tensor (ZipLLM), as a filter in
the elves codec pipeline. The codec, family clustering and the multi-model store are the next
milestone; this package is its home so that the import name is reserved from the start."""
