"""Small random-init models with a tokenizer trained on your own text: `synth models`, the demo, the tests.

No model can be downloaded here (tests, CI, the offline demo), and a new task's students start from
random weights, so everything that needs such a model builds one with this module: a byte-level BPE
tokenizer trained with `tokenizers` on a corpus (the user's own files: every string of their rows), a
chat template whose assistant turns carry `{% generation %}` markers (TRL's assistant-only loss), and a
Llama-shaped model with random weights.

    synth models models.yaml          # the models a spec file names (ModelsSpec), built only when changed
    python -m synth.tiny DIR [--hidden 128 --layers 2 --seed 0]   # one model on a built-in 5-line corpus (tests)

`build_models` builds several models on one tokenizer and skips those already built from the same
spec and corpus (a marker file in each model dir holds the key); each is written to DIR.tmp and renamed,
so a killed build leaves no half model behind. The demo's world builder is one caller of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.errors import one_line, SynthError
from synth.ids import content_hash
from synth.seeds import read_rows

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}\n"
    "{% else %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DEFAULT_CORPUS = [
    "Question: Ann has 3 apples and buys 4 more. How many apples does she have?",
    "Answer: 3 + 4 = 7. The answer is \\boxed{7}.",
    "Let's think step by step. First add the numbers, then multiply the result by two.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { }",
    "You are a helpful assistant. Solve the problem and put the final answer in \\boxed{}.",
]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, *, split_digits: bool = False):
    """A byte-level BPE tokenizer trained on `corpus`, wrapped as a transformers fast tokenizer.
    split_digits: every digit its own token (arithmetic is learnable digit by digit; a BPE merge like
    "17" would make each number an unrelated symbol), with a leading space kept on the first digit
    (" 17" -> " 1", "7"): a bare space token before every number would make every number look alike to
    the attention that copies it from the question."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = pre_tokenizers.Split(Regex(" ?[0-9]"), behavior="isolated")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([digits, byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_model(out_dir: str | Path, corpus: Iterable[str] | None = None, *, hidden: int = 128,
                layers: int = 2, heads: int = 2, vocab_size: int = 512, max_positions: int = 1024,
                intermediate: int | None = None, split_digits: bool = False, seed: int = 0) -> Path:
    """Write a randomly initialised tiny model + tokenizer to `out_dir` and return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus or DEFAULT_CORPUS, vocab_size, split_digits=split_digits)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN), bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "synth_tiny.json").write_text(json.dumps({"hidden": hidden, "layers": layers, "heads": heads,
                                                     "vocab_size": vocab_size, "intermediate": intermediate,
                                                     "split_digits": split_digits, "seed": seed}))
    return out


SPEC_FILE = "synth_models.json"  # in each model dir built by build_models: the key it was built from


class ModelShape(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(64, ge=8, description="hidden size (a multiple of heads)")
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate: int | None = Field(None, ge=1, description="MLP width; default 4 x hidden")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


class ModelsSpec(BaseModel):
    """A models.yaml for `synth models`: the text a tokenizer learns from and the models to build on it."""
    model_config = ConfigDict(extra="forbid")
    text: list[str] = Field(min_length=1, description="files whose text the tokenizer learns (jsonl/json/csv/"
                            "parquet rows: every string value; .txt/.md: the lines), relative to the spec file")
    out: str = Field("models", description="where the model dirs go, relative to the spec file")
    vocab_size: int = Field(800, ge=300, le=65536)
    split_digits: bool = Field(False, description="every digit its own token (arithmetic tasks)")
    max_positions: int = Field(1024, ge=16)
    seed: int = 0
    models: dict[str, ModelShape] = Field(min_length=1, description="name -> shape; each is built as out/<name>")


def read_models_spec(path: Path) -> ModelsSpec:
    """The spec file, validated: a mistake is one SynthError line naming the file and the key."""
    import yaml
    from pydantic import ValidationError


    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SynthError(f"{path}: cannot read the models spec: {one_line(exc)}") from None
    try:
        return ModelsSpec.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        raise SynthError(f"{path}: key '{where}': {e['msg']} (expected: text: [files], models: {{name: {{hidden, "
                         "layers, heads}}}}, optional out, vocab_size, split_digits, max_positions, seed)") from None


def corpus_of(paths: Iterable[Path]) -> list[str]:
    """The text of the user's files for a tokenizer: a rows file (jsonl, json, csv, parquet, an HF dataset
    dir: synth.seeds.read_rows) gives every string value of every row; a .txt/.md file gives its lines."""

    texts: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise SynthError(f"{path}: no such file (a text file for the tokenizer)")
        if path.suffix in (".txt", ".md"):
            texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            continue
        for row in read_rows(path):
            texts += [v for k, v in row.items() if isinstance(v, str) and k != "id"]
    if not texts:
        raise SynthError(f"{', '.join(map(str, paths))}: no text to train a tokenizer on")
    return texts


def build_models(out_root: Path, texts: list[str], models: dict[str, dict], *, vocab_size: int,
                 split_digits: bool = False, max_positions: int = 1024, seed: int = 0,
                 key_extra: dict | None = None, console=None) -> list[Path]:
    """Build out_root/<name> for each name -> {hidden, layers, heads, intermediate?} on one tokenizer trained
    on `texts`, skipping a model whose marker holds the same key (texts, shape, vocabulary, seed and
    key_extra). Returns the models built now."""
    import hashlib
    import shutil


    corpus_hash = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    common = {"corpus": corpus_hash, "vocab_size": vocab_size, "split_digits": split_digits,
              "max_positions": max_positions, "seed": seed, **(key_extra or {})}
    built = []
    for name, shape in models.items():
        out = Path(out_root) / name
        key = content_hash({**common, **shape})
        marker = out / SPEC_FILE
        if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
            continue
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_model(tmp, texts, hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                    intermediate=shape.get("intermediate") or 4 * shape["hidden"], vocab_size=vocab_size,
                    max_positions=max_positions, split_digits=split_digits, seed=seed)
        (tmp / SPEC_FILE).write_text(json.dumps({"key": key, **common, **shape}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # whole or absent: a killed build leaves only the .tmp dir, rebuilt next time
        built.append(out)
        if console is not None:
            console.print(f"models: built {out} ({shape['hidden']} wide, {shape['layers']} layers, "
                          f"{shape['heads']} heads, random weights; tokenizer of {vocab_size} on your text)")
    return built


def build_from_spec(path: Path, console=None) -> tuple[ModelsSpec, list[Path]]:
    """`synth models models.yaml`: the spec's models, built when changed. Returns the spec and what was built."""
    path = Path(path)
    spec = read_models_spec(path)
    base = path.resolve().parent
    texts = corpus_of([base / t for t in spec.text])
    built = build_models(base / spec.out, texts, {n: m.model_dump() for n, m in spec.models.items()},
                         vocab_size=spec.vocab_size, split_digits=spec.split_digits,
                         max_positions=spec.max_positions, seed=spec.seed, console=console)
    return spec, built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random transformers model with a local tokenizer.")
    parser.add_argument("out_dir")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_model(args.out_dir, hidden=args.hidden, layers=args.layers, seed=args.seed))


if __name__ == "__main__":
    main()
