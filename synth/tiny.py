"""Tiny local models: a transformers causal LM with a locally trained tokenizer and a chat template.

No model can be downloaded here (tests, CI, the offline demo), so everything that needs a model
builds one with this module: a byte-level BPE tokenizer trained with `tokenizers` on a small corpus,
a chat template whose assistant turns carry `{% generation %}` markers (TRL's assistant-only loss),
and a Llama-shaped model (head size 64, which vLLM's CPU kernels accept) with random weights.

    python -m synth.tiny DIR [--hidden 128 --layers 2 --seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

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
