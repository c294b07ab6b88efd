"""Family clustering: profiles of real and synthetic models, and the bases found from metadata and
from bitwise similarity of sampled tensors, never for unrelated models."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import xxhash

from elves.errors import ArchiveError, InputError
from elves.families import (
    ModelProfile,
    cluster,
    find_base,
    front_matter_base_model,
    profile,
    rank,
    sample_positions,
)
from tests.conftest import write_safetensors

OPENFF = ["openff-gnn-am1bcc-0.0.1-alpha.1", "openff-gnn-am1bcc-0.1.0-rc.1", "openff-gnn-am1bcc-0.1.0-rc.2",
          "openff-gnn-am1bcc-0.1.0-rc.3", "openff-gnn-am1bcc-1.0.0"]


# ---------------------------------------------------------------------------- synthetic models

def weights(seed: int) -> dict[str, np.ndarray]:
    """A small transformer-like set of F32 weights, as a trained model's look: N(0, 0.02)
    matrices, LayerNorm gains near 1, small biases, and a bias left at zero."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {"embeddings.word_embeddings.weight": rng.normal(0, 0.02, (300, 64))}
    for i in range(3):
        p = f"encoder.layer.{i}."
        out[p + "attention.query.weight"] = rng.normal(0, 0.02, (64, 64))
        out[p + "attention.query.bias"] = rng.normal(0, 0.01, 64)
        out[p + "output.dense.weight"] = rng.normal(0, 0.02, (128, 64))
        out[p + "output.LayerNorm.weight"] = 1 + rng.normal(0, 0.05, 64)
        out[p + "output.dense.bias"] = np.zeros(128)
    return {k: v.astype(np.float32) for k, v in out.items()}


def fine_tune(base: dict[str, np.ndarray], seed: int, scale: float = 1e-3) -> dict[str, np.ndarray]:
    """Every weight moved a little, as a few hundred small optimiser steps would."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in base.items()}


def write_model(folder: Path, w: dict[str, np.ndarray], *, prefix: str = "", name_or_path: str | None = None,
                base_model: str | None = None) -> Path:
    folder.mkdir(parents=True)
    write_safetensors(folder / "model.safetensors",
                      {prefix + k: ("F32", v.shape, v.tobytes()) for k, v in w.items()})
    config = {"architectures": ["BertModel"], "model_type": "bert"}
    if name_or_path is not None:
        config["_name_or_path"] = name_or_path
    (folder / "config.json").write_text(json.dumps(config))
    if base_model is not None:
        (folder / "README.md").write_text(f"---\nlicense: mit\nbase_model: {base_model}\n---\n# A fine-tune\n")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Profiles of a base, an unrelated model of the same architecture (trained from another
    seed), and fine-tunes of the base: with metadata, without, and with metadata naming a base
    that is not stored. The fine-tunes' names carry a ``model.`` prefix the base lacks."""
    root = tmp_path_factory.mktemp("tiny")
    base = weights(0)
    ft = fine_tune(base, 1)
    return {
        "base": profile(write_model(root / "tiny-base", base, name_or_path="tiny-base"), "tiny-base"),
        "other": profile(write_model(root / "other", weights(7), name_or_path="other")),
        "ft": profile(write_model(root / "ft", ft, prefix="model.", name_or_path="org/tiny-base",
                                  base_model="org/tiny-base")),
        "ft-bare": profile(write_model(root / "ft-bare", ft, prefix="model.")),
        "ft-orphan": profile(write_model(root / "ft-orphan", ft, prefix="model.", name_or_path="org/absent-base",
                                         base_model="org/absent-base")),
        "ft-liar": profile(write_model(root / "ft-liar", ft, prefix="model.", base_model="other")),
        "weights": {"base": base, "ft": ft},
        "root": root,
    }


def test_profile_reads_metadata_tensors_and_samples(tiny) -> None:
    p = tiny["ft"]
    assert p.name == "ft" and p.name_or_path == "org/tiny-base" and p.base_model == ["org/tiny-base"]
    assert p.architectures == ["BertModel", "bert"] and p.warnings == []
    ft = tiny["weights"]["ft"]
    assert len(p.tensors) == len(ft)
    for t in p.tensors:
        w = ft[t.name.removeprefix("model.")]
        assert (t.dtype, t.shape, t.nbytes) == ("F32", w.shape, w.nbytes)
        assert t.digest == xxhash.xxh3_128_hexdigest(w.tobytes())
    zeros = xxhash.xxh3_128_hexdigest(np.zeros(128, np.float32).tobytes())
    assert tiny["base"].constant == [zeros]  # the zero biases: identical in every model, no evidence
    # samples: float tensors of at least 256 elements, read at positions fixed by their size
    assert set(p.samples) == {t.name for t in p.tensors if t.nbytes >= 256 * 4}
    emb = ft["embeddings.word_embeddings.weight"].tobytes()
    windows = sample_positions("F32", (300, 64), len(emb))
    assert len(windows) == 4 and windows[0][0] == 0 and windows[-1][0] + windows[-1][1] == len(emb)
    assert sample_positions("BF16", (300, 64), len(emb) // 2) == [(o // 2, n // 2) for o, n in windows]
    assert p.samples["model.embeddings.word_embeddings.weight"] == b"".join(emb[o:o + n] for o, n in windows)
    small = ft["encoder.layer.0.attention.query.bias"]
    assert sample_positions("F32", small.shape, small.nbytes) == [(0, small.nbytes)]


def roundtrip(p: ModelProfile) -> ModelProfile:
    return ModelProfile.from_json(json.loads(json.dumps(p.to_json())))


def test_profile_json_roundtrips(tiny) -> None:
    for p in (tiny["ft"], tiny["base"]):
        assert roundtrip(p) == p
    with pytest.raises(ArchiveError, match="malformed model profile"):
        ModelProfile.from_json({"version": 1, "tensors": []})
    with pytest.raises(ArchiveError, match="malformed model profile"):
        ModelProfile.from_json({**tiny["ft"].to_json(), "samples": {"x": "not base64!"}})
    with pytest.raises(ArchiveError, match="version"):
        ModelProfile.from_json({**tiny["ft"].to_json(), "version": 99})


def test_front_matter_forms() -> None:
    assert front_matter_base_model("---\nbase_model: org/a\n---\n") == ["org/a"]
    assert front_matter_base_model("---\ntags: [x]\nbase_model: 'org/a'  # the one\n---\n") == ["org/a"]
    assert front_matter_base_model("---\nbase_model: [org/a, \"org/b\"]\n---\n") == ["org/a", "org/b"]
    assert front_matter_base_model("---\nbase_model:\n- org/a\n  - org/b\nlicense: mit\n---\n") == ["org/a", "org/b"]
    assert front_matter_base_model("# no front matter\nbase_model: org/a\n") == []
    assert front_matter_base_model("---\nlicense: mit\n---\nbase_model: org/a\n") == []


def test_bad_input_is_a_clear_error_or_a_warning(tmp_path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        profile(tmp_path / "missing")
    folder = write_model(tmp_path / "m", weights(3))
    (folder / "config.json").write_text("{not json")
    p = profile(folder)
    assert p.name_or_path is None and len(p.tensors) == 16
    assert len(p.warnings) == 1 and p.warnings[0].startswith("config.json: not valid JSON")


def test_finetune_finds_its_base_by_metadata(tiny) -> None:
    match = find_base(tiny["ft"], [tiny["other"], tiny["base"]])
    assert match is not None and match.base == "tiny-base" and match.pairs == 16
    assert "config _name_or_path = 'org/tiny-base' names 'tiny-base'" in match.evidence
    assert "README base_model = 'org/tiny-base' names 'tiny-base'" in match.evidence
    assert any(e.startswith("16/16 tensor names") for e in match.evidence)  # despite the model. prefix
    other = rank(tiny["ft"], [tiny["other"], tiny["base"]])[1]
    assert other.base == "other" and not other.accepted
    assert other.evidence[-1] == "not related: the sampled tensors differ as much as unrelated ones"


def test_finetune_without_metadata_finds_its_base_by_similarity(tiny) -> None:
    match = find_base(tiny["ft-bare"], [tiny["other"], tiny["base"]])
    assert match is not None and match.base == "tiny-base"
    bits = next(e for e in match.evidence if e.startswith("sampled XOR"))
    assert "7/7 tensors closer than chance" in bits
    with_meta = find_base(tiny["ft"], [tiny["base"]])
    assert match.score < with_meta.score
    # the unrelated model of the same architecture gets no base: names pair up, bits do not
    assert find_base(tiny["other"], [tiny["base"], tiny["ft-bare"]]) is None
    # nor does the base, when the fine-tune names it: the fine-tune derives from it
    ranked = rank(tiny["base"], [tiny["ft"]])
    assert not ranked[0].accepted and find_base(tiny["base"], [tiny["ft"]]) is None
    assert ranked[0].evidence[0] == \
        "'ft' has README base_model = 'org/tiny-base': it derives from this model, so it is not its base"


def test_a_cast_to_another_precision_is_found_by_its_rounded_bits(tiny) -> None:
    root = tiny["root"]
    for dtype, np_dtype in (("BF16", ml_dtypes.bfloat16), ("F16", np.float16)):
        folder = root / f"cast-{dtype}"
        folder.mkdir()
        write_safetensors(folder / "model.safetensors", {
            k: (dtype, v.shape, v.astype(np_dtype).tobytes()) for k, v in tiny["weights"]["base"].items()})
        cast = profile(folder)
        match = find_base(cast, [tiny["other"], tiny["base"]])
        assert match is not None and match.base == "tiny-base"
        assert "16/16 tensor names of the smaller model pair up, 16 with the same shape, " \
               "16 in another float precision" in match.evidence
        bits = next(e for e in match.evidence if e.startswith("sampled XOR"))
        assert "100% zero top bytes" in bits and "(7 compared in the coarser precision)" in bits
        assert find_base(cast, [tiny["other"]]) is None


def test_a_base_in_the_models_own_dtype_wins_over_the_one_the_metadata_names(tiny) -> None:
    """A BF16 fine-tune names the F32 original, but only a BF16 copy of the base can be XORed
    with it: that copy must be chosen, whichever was stored first."""
    root = tiny["root"]

    def bf16(folder: Path, w: dict[str, np.ndarray], **meta: str) -> ModelProfile:
        folder.mkdir()
        write_safetensors(folder / "model.safetensors", {
            k: ("BF16", v.shape, v.astype(ml_dtypes.bfloat16).tobytes()) for k, v in w.items()})
        (folder / "README.md").write_text(f"---\nbase_model: {meta['base_model']}\n---\n")
        return profile(folder)

    copy = bf16(root / "base-bf16", tiny["weights"]["base"], base_model="tiny-base")
    ft = bf16(root / "ft-bf16", tiny["weights"]["ft"], base_model="tiny-base")
    for order in ([tiny["base"], copy], [copy, tiny["base"]]):
        ranked = rank(ft, order)
        assert ranked[0].base == "base-bf16" and ranked[0].accepted and ranked[0].same_dtype == 16
        assert ranked[1].base == "tiny-base" and ranked[1].same_dtype == 0


def test_metadata_naming_an_absent_or_unrelated_base_gives_no_wrong_base(tiny) -> None:
    assert find_base(tiny["ft-orphan"], [tiny["other"]]) is None
    why = rank(tiny["ft-orphan"], [tiny["other"]])[0].evidence
    assert why[0] == "README base_model = 'org/absent-base' names no stored model"
    # the real base stored under another name is still found by its bits, below a metadata match
    match = find_base(tiny["ft-orphan"], [tiny["other"], tiny["base"]])
    assert match.base == "tiny-base" and match.score < find_base(tiny["ft"], [tiny["base"]]).score
    # metadata naming an unrelated stored model is not believed against the bits
    assert find_base(tiny["ft-liar"], [tiny["other"]]) is None
    assert rank(tiny["ft-liar"], [tiny["other"]])[0].evidence[-1] == \
        "the metadata names it, but the sampled tensors do not look related"
    assert find_base(tiny["ft"], [tiny["ft"]]) is None  # never the model itself


def test_cluster_gives_direction_from_metadata_then_order(tiny) -> None:
    # the fine-tune arrives first: its metadata names the base, which becomes the root
    [fam] = [f for f in cluster([tiny["ft"], tiny["other"], tiny["base"]]) if f.members]
    assert fam.root == "tiny-base" and [(n, m.base) for n, m in fam.members] == [("ft", "tiny-base")]
    # without metadata the earlier of two related models is the base
    fams = cluster([tiny["ft-bare"], tiny["other"], tiny["base"]])
    assert [(f.root, [(n, m.base) for n, m in f.members]) for f in fams] == \
        [("ft-bare", [("tiny-base", "ft-bare")]), ("other", [])]


# ---------------------------------------------------------------------------- real models

@pytest.fixture(scope="module")
def real(dataset):
    openff = dataset("openff")
    out = {n: profile(openff / f"{n}.pt") for n in OPENFF}
    out["merlin"] = profile(dataset("merlin-p1"), "merlin")
    for name in ("astra", "minilm", "fall", "silero"):
        out[name] = profile(dataset(name))
    return out


@pytest.mark.realdata
def test_openff_versions_form_a_chain(real) -> None:
    fams = {f.root: [(n, m.base) for n, m in f.members] for f in cluster([real[n] for n in OPENFF])}
    # rc.2 continues rc.1's training; rc.3 has rc.2's tensors exactly; 1.0.0 shares 20 of 22 with
    # both (two layers widened): the earlier one is taken, which keeps the delta chain short
    assert fams == {
        "openff-gnn-am1bcc-0.0.1-alpha.1": [],
        "openff-gnn-am1bcc-0.1.0-rc.1": [("openff-gnn-am1bcc-0.1.0-rc.2", "openff-gnn-am1bcc-0.1.0-rc.1"),
                                         ("openff-gnn-am1bcc-0.1.0-rc.3", "openff-gnn-am1bcc-0.1.0-rc.2"),
                                         ("openff-gnn-am1bcc-1.0.0", "openff-gnn-am1bcc-0.1.0-rc.2")],
    }
    m = find_base(real["openff-gnn-am1bcc-1.0.0"], [real[n] for n in OPENFF[:4]])
    assert "20/22 float tensors identical (xxh3-128)" in m.evidence
    m = find_base(real["openff-gnn-am1bcc-0.1.0-rc.2"], [real[n] for n in OPENFF[:2]])
    bits = next(e for e in m.evidence if e.startswith("sampled XOR"))
    assert "20/20 tensors closer than chance" in bits
    # alpha.1 has the same layer names, but was trained afresh: its bits are as far as chance
    none = rank(real["openff-gnn-am1bcc-0.1.0-rc.1"], [real[OPENFF[0]]])[0]
    assert not none.accepted and none.pairs == 22
    assert "0/17 tensors closer than chance" in next(e for e in none.evidence if e.startswith("sampled XOR"))


@pytest.mark.realdata
def test_astra_pairs_with_merlin_by_names_and_bits(real) -> None:
    others = [real[n] for n in ("minilm", "fall", "silero", *OPENFF)]
    for model, base in (("astra", "merlin"), ("merlin", "astra")):
        m = find_base(roundtrip(real[model]), [*map(roundtrip, others), roundtrip(real[base])])
        assert m is not None and m.base == base and m.pairs == 443
        assert "443/443 tensor names of the smaller model pair up, 443 with the same shape" in m.evidence
        bits = next(e for e in m.evidence if e.startswith("sampled XOR"))
        assert "22/22 tensors closer than chance" in bits


@pytest.mark.realdata
def test_unrelated_models_get_no_base(real) -> None:
    fams = cluster(real[n] for n in ("merlin", "astra", "minilm", "fall", "silero", *OPENFF))
    alone = {f.root for f in fams if not f.members}
    assert {"minilm", "fall", "silero"} <= alone
    for name in ("minilm", "fall", "silero"):
        assert find_base(real[name], [p for n, p in real.items() if n != name]) is None
