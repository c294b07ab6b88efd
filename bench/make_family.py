"""A family of fine-tunes of the real all-MiniLM-L6-v2, made here by real training on CPU.

    python bench/make_family.py                 # every variant not made yet
    python bench/make_family.py lora --force    # remake some

Each variant is a Hugging Face-style folder ``$ELVES_DATA/models/minilm-family/<variant>/``
(``model.safetensors``, ``config.json`` with ``_name_or_path`` naming the base, the base's
tokenizer and sentence-transformers files, a ``README.md`` whose front matter says
``base_model:``), the input of the BitX/store benchmarks (``bench/bitx_bench.py``, issue 3):

- ``base-bf16``: the base cast to BF16 (the same-dtype base of ``ft-bf16``);
- ``ft-f32``, ``ft-bf16``: a full fine-tune (AdamW, lr 2e-5, warm-up then linear decay, weight
  decay 0.01), saved in F32 and cast to BF16;
- ``lora``: rank-8 LoRA on the query/key/value/attention-output projections, merged;
- ``added-tokens``: new tokens appended to the vocabulary (new embedding rows start as the mean
  row), then a short full fine-tune;
- ``last-layers``: only the last two encoder layers trained, everything else bit-identical.

The objective is sentence-transformers' (MultipleNegativesRankingLoss): adjacent sentences of
the same section are positives, the rest of the batch negatives, cosine similarity of the
mean-pooled, L2-normalised embeddings scaled by 20. The text is the English prose in
``pydoc_data/topics.py`` (Python's own reference manual, which ships with Python); code blocks are
left out. Dropout is on, as in training the original.

Seeded and deterministic on a given machine (fixed seed, deterministic algorithms, a fixed
number of threads); other CPUs may round differently. A variant whose folder exists is skipped
unless ``--force``. Each folder is built beside its place and renamed in; a marker
``$ELVES_DATA/markers/minilm-family.<variant>.json`` records the recipe, time and digests.
Needs torch, safetensors and tokenizers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import DATA_ROOT, sha256_file  # bench/datasets.py, beside this script

BASE_DIR = DATA_ROOT / "models" / "minilm"
FAMILY_DIR = DATA_ROOT / "models" / "minilm-family"
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
SEED = 20251123
THREADS = 2          # fixed: the thread count changes how CPU kernels sum, hence the bits
MAX_TOKENS = 32      # per sentence; keeps a step to about a second on one core
BATCH = 16           # sentence pairs per step (in-batch negatives)
SCALE = 20.0         # sentence-transformers' MultipleNegativesRankingLoss scale
COPIED = ("1_Pooling/config.json", "config_sentence_transformers.json", "modules.json",
          "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json",
          "tokenizer_config.json", "vocab.txt")


@dataclass(frozen=True)
class Recipe:
    what: str
    train: str = "none"      # "all", "lora", "last-layers"
    steps: int = 0
    lr: float = 0.0
    dtype: str = "F32"
    from_variant: str | None = None   # cast of another variant instead of training
    added_tokens: int = 0
    lora_rank: int = 0


RECIPES = {
    "base-bf16": Recipe("the base, cast to BF16", dtype="BF16"),
    "ft-f32": Recipe("full fine-tune", train="all", steps=300, lr=2e-5),
    "ft-bf16": Recipe("full fine-tune (ft-f32), cast to BF16", dtype="BF16", from_variant="ft-f32"),
    "lora": Recipe("LoRA rank 8 (alpha 16) on query/key/value/attention output, merged",
                   train="lora", steps=100, lr=2e-4, lora_rank=8),
    "added-tokens": Recipe("48 tokens added (rows start as the mean row), then a short full fine-tune",
                           train="all", steps=50, lr=2e-5, added_tokens=48),
    "last-layers": Recipe("only encoder layers 4 and 5 trained", train="last-layers", steps=100, lr=2e-5),
}


# ============================================================================ text

def sentence_pairs() -> list[tuple[str, str]]:
    """Adjacent sentences of the prose of each section of Python's reference manual."""
    from pydoc_data.topics import topics

    pairs = []
    for key in sorted(topics):
        sents = []
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.splitlines()
            # Code and grammar are indented three or more, or are doctests; headings are underlined.
            if not lines or re.fullmatch(r"[*=\-]+", lines[-1].strip()) or \
                    any(re.match(r"\s{3}|\s*(>>>|\.\.\. )", ln) or "::=" in ln for ln in lines):
                continue
            text = re.sub(r"^[*\-] ", "", " ".join(ln.strip() for ln in lines))
            sents += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"“])", text) if len(s) >= 20]
        pairs += itertools.pairwise(sents)
    return pairs


def new_tokens(tok, pairs: list[tuple[str, str]], n: int) -> list[str]:
    """The ``n`` most frequent words of the text that the tokenizer cuts into three or more pieces."""
    counts = Counter(w for a, b in pairs for w in re.findall(r"[a-z]{5,}", (a + " " + b).lower()))
    pieces = {w: len(tok.encode(w, add_special_tokens=False).ids) for w in counts}
    ranked = sorted((w for w in counts if pieces[w] >= 3), key=lambda w: (-counts[w], w))
    return ranked[:n]


# ============================================================================ model

def bert(W: dict, ids, mask, cfg: dict, train: bool):
    """BertModel forward from a dict of weights (safetensors names) + mean pooling + L2 norm."""
    import torch.nn.functional as F

    p_drop = cfg["hidden_dropout_prob"] if train else 0.0
    a_drop = cfg["attention_probs_dropout_prob"] if train else 0.0
    B, T = ids.shape
    H = cfg["num_attention_heads"]

    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), W[p + ".weight"], W[p + ".bias"], cfg["layer_norm_eps"])

    def lin(x, p):
        return F.linear(x, W[p + ".weight"], W[p + ".bias"])

    def heads(t):
        return t.view(B, T, H, -1).transpose(1, 2)

    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:T] \
        + W["embeddings.token_type_embeddings.weight"][0]
    x = F.dropout(ln(x, "embeddings.LayerNorm"), p_drop, train)
    keep = mask[:, None, None, :].bool()
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        q, k, v = (heads(lin(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=a_drop)
        ctx = ctx.transpose(1, 2).reshape(B, T, -1)
        x = ln(F.dropout(lin(ctx, p + "attention.output.dense"), p_drop, train) + x, p + "attention.output.LayerNorm")
        h = F.gelu(lin(x, p + "intermediate.dense"))
        x = ln(F.dropout(lin(h, p + "output.dense"), p_drop, train) + x, p + "output.LayerNorm")
    m = mask.unsqueeze(-1).to(x.dtype)
    return F.normalize((x * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def batches(tok, pairs: list[tuple[str, str]], steps: int, seed: int):
    """``steps`` batches of (ids, mask) for the first and the second sentences, in a seeded order."""
    import numpy as np
    import torch

    order = np.random.default_rng(seed).permutation(len(pairs))
    for step in range(steps):
        pick = [pairs[i] for i in order[(step * BATCH + np.arange(BATCH)) % len(order)]]
        out = []
        for side in (0, 1):
            enc = tok.encode_batch([p[side] for p in pick])
            n = max(len(e.ids) for e in enc)
            ids = torch.zeros((BATCH, n), dtype=torch.long)
            mask = torch.zeros((BATCH, n), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, :len(e.ids)] = torch.tensor(e.ids)
                mask[i, :len(e.ids)] = 1
            out.append((ids, mask))
        yield out


def train(W: dict, trainable: list[str], extra: dict, tok, pairs, cfg: dict, recipe: Recipe,
          weights: Callable[[], dict]) -> float:
    """AdamW on ``trainable`` (names in W) and ``extra`` (free parameters) with warm-up then linear
    decay; ``weights()`` gives the dict the forward pass reads. Returns the last loss."""
    import torch
    import torch.nn.functional as F

    params = [W[n] for n in trainable] + list(extra.values())
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    warm = max(1, recipe.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (recipe.steps - s) / (recipe.steps - warm))))
    labels = torch.arange(BATCH)
    loss = torch.tensor(float("nan"))
    t0 = time.perf_counter()
    for step, ((ia, ma), (ib, mb)) in enumerate(batches(tok, pairs, recipe.steps, SEED)):
        w = weights()
        ea, eb = bert(w, ia, ma, cfg, True), bert(w, ib, mb, cfg, True)
        loss = F.cross_entropy(SCALE * ea @ eb.T, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            print(f"  step {step + 1}/{recipe.steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s",
                  flush=True)
    for t in params:
        t.requires_grad_(False)
    return float(loss.detach())


# ============================================================================ variants

def load_base() -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(BASE_DIR / "model.safetensors"), json.loads((BASE_DIR / "config.json").read_text())


def make(variant: str, recipe: Recipe, out: Path) -> dict:
    """Build ``variant`` into the empty folder ``out``; returns facts for the README and marker."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    torch.manual_seed(SEED)
    W, cfg = load_base()
    tok = Tokenizer.from_file(str(BASE_DIR / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    facts: dict = {}
    if recipe.from_variant:
        W = load_file(FAMILY_DIR / recipe.from_variant / "model.safetensors")
        cfg = json.loads((FAMILY_DIR / recipe.from_variant / "config.json").read_text())
    if recipe.train != "none":
        pairs = sentence_pairs()
        facts["pairs"] = len(pairs)
        extra: dict = {}
        weights = lambda: W
        trainable = [n for n, t in W.items() if t.is_floating_point()]
        if recipe.added_tokens:
            words = new_tokens(tok, pairs, recipe.added_tokens)
            tok.add_tokens([AddedToken(w, normalized=True) for w in words])
            emb = W["embeddings.word_embeddings.weight"]
            W["embeddings.word_embeddings.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(len(words), -1)])
            cfg["vocab_size"] = W["embeddings.word_embeddings.weight"].shape[0]
            facts["new_tokens"] = words
        if recipe.train == "last-layers":
            last = cfg["num_hidden_layers"] - 2
            trainable = [n for n in trainable if re.match(rf"encoder\.layer\.({last}|{last + 1})\.", n)]
        if recipe.train == "lora":
            r, alpha = recipe.lora_rank, 2 * recipe.lora_rank
            targets = [n for n in W if re.search(r"attention\.(self\.(query|key|value)|output\.dense)\.weight$", n)]
            for n in targets:
                a = torch.empty(r, W[n].shape[1])
                torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # as peft initialises LoRA A; B starts at 0
                extra[n + ".A"], extra[n + ".B"] = a, torch.zeros(W[n].shape[0], r)
            trainable = []

            def weights():
                return {**W, **{n: W[n] + (alpha / r) * extra[n + ".B"] @ extra[n + ".A"] for n in targets}}
        facts["last_loss"] = train(W, trainable, extra, tok, pairs, cfg, recipe, weights)
        with torch.no_grad():
            W = {n: t.detach().clone() for n, t in weights().items()}
        facts["trained_tensors"] = len(trainable) if recipe.train != "lora" else len(targets)
    if recipe.dtype == "BF16":
        W = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in W.items()}
    cfg.update(_name_or_path=BASE_ID, torch_dtype={"F32": "float32", "BF16": "bfloat16"}[recipe.dtype])
    W = {n: t.contiguous() for n, t in W.items()}
    save_file(W, out / "model.safetensors", metadata={"format": "pt"})
    for rel in COPIED:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BASE_DIR / rel, out / rel)
    if recipe.added_tokens:
        saved = Tokenizer.from_file(str(BASE_DIR / "tokenizer.json"))  # the base's padding and truncation
        saved.add_tokens([AddedToken(w, normalized=True) for w in facts["new_tokens"]])
        saved.save(str(out / "tokenizer.json"))
        start = cfg["vocab_size"] - len(facts["new_tokens"])
        (out / "added_tokens.json").write_text(
            json.dumps({w: start + i for i, w in enumerate(facts["new_tokens"])}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(readme(variant, recipe, facts))
    return facts


def readme(variant: str, recipe: Recipe, facts: dict) -> str:
    how = (f"{recipe.steps} AdamW steps (lr {recipe.lr:g}, weight decay 0.01, 10% warm-up then linear decay), "
           f"batch {BATCH} sentence pairs of at most {MAX_TOKENS} tokens, MultipleNegativesRankingLoss over "
           f"{facts['pairs']} adjacent-sentence pairs from Python's pydoc_data/topics.py; final loss "
           f"{facts['last_loss']:.3f}." if recipe.train != "none" else
           f"The weights of `{recipe.from_variant}`, rounded to the nearest BF16." if recipe.from_variant else
           "No training: the base's weights rounded to the nearest BF16.")
    return (f"---\nbase_model: {BASE_ID}\nlibrary_name: sentence-transformers\nlicense: apache-2.0\n"
            f"pipeline_tag: sentence-similarity\ntags:\n- sentence-transformers\n- elves-benchmark\n---\n\n"
            f"# all-MiniLM-L6-v2, {variant}\n\n{recipe.what}; {recipe.dtype}. {how}\n\n"
            f"Made by `bench/make_family.py` of the elves project (seed {SEED}) as a benchmark input for "
            f"delta compression against the base; not meant for use.\n")


def build(variant: str, force: bool) -> bool:
    """Make ``variant`` unless it is there; True when it was made."""
    final = FAMILY_DIR / variant
    if final.is_dir() and not force:
        print(f"{variant}: already made ({final})")
        return False
    dep = RECIPES[variant].from_variant
    if dep and not (FAMILY_DIR / dep).is_dir():
        build(dep, False)
    import torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    FAMILY_DIR.mkdir(parents=True, exist_ok=True)
    print(f"{variant}: {RECIPES[variant].what}", flush=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=FAMILY_DIR))
    try:
        facts = make(variant, RECIPES[variant], tmp)
        files = {str(p.relative_to(tmp)): [p.stat().st_size, sha256_file(p)]
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    marker = DATA_ROOT / "markers" / f"minilm-family.{variant}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"variant": variant, "recipe": asdict(RECIPES[variant]), "seed": SEED,
                                  "threads": THREADS, "torch": torch.__version__, "seconds": round(seconds, 1),
                                  "facts": facts, "files": files}, indent=1) + "\n")
    size = sum(v[0] for v in files.values())
    print(f"{variant}: made {final} in {seconds:.0f} s, {size / 1e6:.1f} MB, model.safetensors sha256 "
          f"{files['model.safetensors'][1][:16]}...", flush=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", metavar="VARIANT", help=f"some of {', '.join(RECIPES)} (default: all)")
    ap.add_argument("--force", action="store_true", help="remake variants that exist")
    args = ap.parse_args()
    unknown = [v for v in args.variants if v not in RECIPES]
    if unknown:
        ap.error(f"unknown variant {', '.join(unknown)}; there are {', '.join(RECIPES)}")
    if not (BASE_DIR / "model.safetensors").is_file():
        sys.exit(f"make_family: the base is missing ({BASE_DIR}): run `python bench/datasets.py minilm`")
    for v in args.variants or list(RECIPES):
        build(v, args.force)


if __name__ == "__main__":
    main()
