"""Structure-aware fuzzing of everything elves reads (issue 10): seeds (corpus.py), forgers that
recompute checksums as a hostile uploader would (forge.py), a worker process under resource
limits (worker.py) and its driver (harness.py). tests/test_fuzz.py runs it; docs/SECURITY.md says
how to run it longer."""
