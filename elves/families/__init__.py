"""Family clustering: which stored model is a new model's base, and why.

The package, one concept a module, each importing only those before it: ``profiling`` (a model
reduced to a :class:`ModelProfile`: metadata, tensor digests, sampled bytes), ``naming`` (the
names a model is known by and the bases its metadata declares), ``similarity`` (the bitwise
comparison of sampled tensors), ``ranking`` (candidate bases weighed on all the evidence:
:func:`rank`, :func:`find_base`) and ``clustering`` (models grouped into :class:`Family` trees).
"""
from .clustering import Family, cluster
from .naming import awaits, model_key
from .profiling import ModelProfile, Profiler, front_matter_base_model, profile, sample_positions
from .ranking import BaseMatch, find_base, rank

__all__ = [
    "BaseMatch", "Family", "ModelProfile", "Profiler", "awaits", "cluster", "find_base", "front_matter_base_model", "model_key",
    "profile", "rank", "sample_positions",
]
