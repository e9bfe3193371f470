"""The `hf` teacher: transformers in-process, batched, left-padded generation. Runs on CPU.

Each request is one sample. A batch is seeded from its first request's per-sample seed, so a
request's text is reproducible given the same batch composition (the request id, and hence the
cache, does not depend on it). The chat template comes from the tokenizer.

Structured output (a stage's `schema`, params["json_schema"]) is enforced by xgrammar: a compiled
JSON-schema grammar masks each step's logits to the tokens that keep the answer valid. Chosen over
outlines and lm-format-enforcer because it compiles the grammar once per schema and tokenizer into a
token-mask automaton (microseconds per step, batched: one matcher per sequence), and it is the engine
vLLM uses by default, so an hf and a vllm teacher constrain the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from synth.errors import SynthError, one_line
from synth.secrets import scrub
from synth.teachers.base import (Completion, HFTeacherConfig, Request, ScoreRequest, TeacherBase,
                                 resolve_model_path, token_logprobs)


def device_of(device: str, cuda: bool) -> str:
    """A teacher's `device` as torch takes it: auto is the first CUDA GPU when torch sees one, else the CPU."""
    return ("cuda" if cuda else "cpu") if device == "auto" else device


class HFTeacher(TeacherBase):
    def __init__(self, name: str, config: HFTeacherConfig, base_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # synth draws its own progress; keep stderr readable
        hf_logging.set_verbosity_error()
        self.name, self.config, self.model = name, config, config.model
        self.capabilities = config.capabilities()
        path = resolve_model_path(config.model, base_dir)
        device = device_of(config.device, torch.cuda.is_available())
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SynthError(f"teacher '{name}': device {config.device!r} asks for a CUDA GPU and torch sees none here; "
                             "use device: auto (a GPU when there is one, else the CPU) or cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            dtype = torch.float32 if config.dtype == "float32" else (config.dtype if config.dtype == "auto"
                                                                     else getattr(torch, config.dtype))
            self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as exc:
            raise SynthError(f"teacher '{name}': cannot load model {config.model!r}: "
                             f"{scrub(' '.join(str(exc).split()))[:300]}") from None
        if not self.tokenizer.chat_template:
            raise SynthError(f"teacher '{name}': the tokenizer of {config.model!r} has no chat template")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.lm.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.max_positions = getattr(self.lm.config, "max_position_embeddings", None)
        self._grammar_compiler = None
        self._grammars: dict[str, object] = {}  # schema (canonical JSON) -> compiled grammar

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        import torch

        size = self.config.batch_size
        self._stopped = False
        for start in range(0, len(requests), size):
            if self._stopped:
                return
            batch = list(requests[start:start + size])
            # Requests of one batch must share sampling params; split where they differ.
            groups: dict[str, list[Request]] = {}
            for r in batch:
                groups.setdefault(repr(sorted(r.params.items())), []).append(r)
            for group in groups.values():
                with torch.inference_mode():
                    yield from self._generate_batch(group)

    def _generate_batch(self, batch: list[Request]) -> Iterator[Completion]:
        import torch

        params = batch[0].params
        started = time.monotonic()
        enc = self.tokenizer.apply_chat_template([r.messages for r in batch], add_generation_prompt=True,
                                                 padding=True, return_tensors="pt", return_dict=True)
        prompt_len = enc["input_ids"].shape[1]
        max_new = params.get("max_tokens", 256)
        if self.max_positions and prompt_len + max_new > self.max_positions:
            # Retry one by one so that only the overlong requests fail.
            if len(batch) > 1:
                for r in batch:
                    yield from self._generate_batch([r])
                return
            yield Completion(batch[0].id, error="context_length", error_message=(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_new}) exceeds the model's {self.max_positions}"))
            return
        seed = batch[0].seed
        if seed is not None:
            torch.manual_seed(seed)
        temperature = params.get("temperature", 1.0)
        sampling = {"do_sample": temperature > 0}
        if temperature > 0:
            sampling.update(temperature=temperature, top_p=params.get("top_p", 1.0), top_k=params.get("top_k", 0))
        top_k = params.get("logprobs")
        if top_k is not None:  # the model's own (raw) logits of each step, before temperature and top-p
            sampling.update(output_logits=True, return_dict_in_generate=True)
        if params.get("json_schema") is not None:
            sampling["logits_processor"] = [self._constrained(params["json_schema"])]
        try:
            out = self.lm.generate(**{k: v.to(self.lm.device) for k, v in enc.items()}, max_new_tokens=max_new,
                                   pad_token_id=self.tokenizer.pad_token_id, eos_token_id=list(self.eos_ids),
                                   **sampling)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: the batch fails, a re-run retries it
            for r in batch:
                yield Completion(r.id, error="backend_error", error_message=scrub(one_line(exc))[:500])
            return
        latency = time.monotonic() - started
        sequences = out.sequences if top_k is not None else out
        steps = None if top_k is None else _step_logprobs(out.logits, sequences[:, prompt_len:], top_k)
        for i, r in enumerate(batch):
            new = sequences[i, prompt_len:].tolist()
            stop_at = next((j for j, t in enumerate(new) if t in self.eos_ids), None)
            tokens = new if stop_at is None else new[:stop_at]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            finish = "length" if stop_at is None else "stop"
            text, finish = _apply_stop_strings(text, finish, params.get("stop"))
            generated = len(tokens) + (0 if stop_at is None else 1)  # the end-of-sequence token counts
            yield Completion(r.id, text=text, finish_reason=finish,
                             prompt_tokens=int(enc["attention_mask"][i].sum()), completion_tokens=generated,
                             latency_s=latency,
                             logprobs=None if steps is None else steps.row(i, new[:generated]))

    def score(self, requests: Sequence[ScoreRequest]) -> Iterator[Completion]:
        """Each sequence scored in one forward pass per batch (right-padded): the prompt as generate renders it
        (the chat template with the generation prompt), then the given tokens; the log_softmax of the raw logits
        at the position before each token gives its log-prob and the k best there (as generate's logprobs)."""
        import torch

        self._stopped = False
        size = self.config.batch_size
        for start in range(0, len(requests), size):
            if self._stopped:
                return
            with torch.inference_mode():
                yield from self._score_batch(list(requests[start:start + size]))

    def _score_batch(self, batch: list[ScoreRequest]) -> Iterator[Completion]:
        import torch

        started = time.monotonic()
        sequences, prompts, ready = [], [], []
        for r in batch:
            try:
                prompt = self.tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"]
            except Exception as exc:  # a conversation the chat template rejects
                yield Completion(r.id, error="bad_request", error_message="chat template: " + scrub(one_line(exc))[:480])
                continue
            length = len(prompt) + len(r.tokens)
            if self.max_positions and length > self.max_positions:
                yield Completion(r.id, error="context_length", prompt_tokens=len(prompt), error_message=(
                    f"prompt ({len(prompt)} tokens) + sequence ({len(r.tokens)}) exceeds the model's {self.max_positions}"))
                continue
            if not r.tokens or min(r.tokens) < 0 or max(r.tokens) >= self.lm.config.vocab_size:
                yield Completion(r.id, error="bad_request", prompt_tokens=len(prompt), error_message=(
                    "no tokens to score" if not r.tokens else
                    f"a token id outside the teacher's vocabulary of {self.lm.config.vocab_size}"))
                continue
            sequences.append(prompt + list(r.tokens))
            prompts.append(len(prompt))
            ready.append(r)
        if not ready:
            return
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        try:
            logits = self.lm(input_ids=ids.to(self.lm.device), attention_mask=mask.to(self.lm.device)).logits
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: the batch fails, a re-run retries it
            for r in ready:
                yield Completion(r.id, error="backend_error", error_message=scrub(one_line(exc))[:500])
            return
        latency = time.monotonic() - started
        for i, r in enumerate(ready):
            p, n = prompts[i], len(r.tokens)
            steps = logits[i, p - 1:p - 1 + n].float().log_softmax(-1)
            chosen, top_values, top_ids = _taken_and_top(steps, torch.tensor(r.tokens, device=steps.device), r.k)
            row = _StepLogprobs(chosen[None].cpu(), top_values[None].cpu(), top_ids[None].cpu(), r.k)
            yield Completion(r.id, prompt_tokens=p, completion_tokens=n, latency_s=latency,
                             logprobs=row.row(0, list(r.tokens)))

    def _constrained(self, schema: dict):
        """A fresh xgrammar logits processor for one generate() call (it keeps per-sequence state)."""
        import xgrammar  # the hf extra; imported only by a stage with a schema
        from xgrammar.contrib.hf import LogitsProcessor

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            if self._grammar_compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.lm.config.vocab_size,
                                                               stop_token_ids=sorted(self.eos_ids))
                self._grammar_compiler = xgrammar.GrammarCompiler(info)
            # compact JSON: free whitespace lets a weak model pad until max_tokens and never close the object
            self._grammars[key] = self._grammar_compiler.compile_json_schema(key, any_whitespace=False)
        return LogitsProcessor(self._grammars[key])

    def stop(self) -> None:
        self._stopped = True  # checked between batches

    def close(self) -> None:
        self.lm = None


def _taken_and_top(lp, taken, k: int):
    """From log-probabilities [n, vocabulary] and the token taken at each of the n positions [n]: the taken
    tokens' log-probs [n] and the k best per position, values and ids [n, k] (fewer if the vocabulary is)."""
    top_values, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return lp.gather(1, taken.unsqueeze(1)).squeeze(1), top_values, top_ids


@dataclass(frozen=True)
class _StepLogprobs:
    """A batch's log-probabilities (log_softmax of the raw logits, before temperature and top-p): at each
    step, of the token each row took and of its k most likely tokens. [rows, steps(, k)] on the CPU. A
    generated batch's (_step_logprobs) and a scored sequence's (a batch of one) become Completion.logprobs
    through `row`."""
    chosen: object      # FloatTensor [B, S]
    top_values: object  # FloatTensor [B, S, k]
    top_ids: object     # LongTensor [B, S, k]
    k: int

    def row(self, i: int, tokens: list[int]) -> dict:
        """Completion.logprobs of row i, whose generated tokens (the end-of-sequence one included) are `tokens`."""
        n = len(tokens)
        return token_logprobs(self.k, self.chosen[i, :n].tolist(), token_ids=list(tokens),
                              top_ids=self.top_ids[i, :n].reshape(-1).tolist(),
                              top_logprobs=self.top_values[i, :n].reshape(-1).tolist())


def _step_logprobs(logits, taken, k: int) -> _StepLogprobs:
    """`logits`: generate's raw logits, one [B, vocabulary] tensor per step; `taken`: [B, >= steps] the tokens
    generated. One log_softmax, gather and top-k per step over the whole batch, not per row and position
    (a row's values are the same: each row's vocabulary is reduced on its own), with at most one step's
    [B, vocabulary] log-probabilities alive at a time (a real model's vocabulary is ~150k)."""
    import torch

    chosen, values, ids = [], [], []
    for t, step in enumerate(logits):
        step_chosen, top_values, top_ids = _taken_and_top(step.float().log_softmax(-1), taken[:, t], k)
        chosen.append(step_chosen)
        values.append(top_values)
        ids.append(top_ids)
    return _StepLogprobs(torch.stack(chosen, 1).cpu(), torch.stack(values, 1).cpu(), torch.stack(ids, 1).cpu(), k)


def _apply_stop_strings(text: str, finish: str, stop: list[str] | None) -> tuple[str, str]:
    """Cut at the first stop string, as OpenAI-compatible servers do (the stop string is not kept)."""
    if not stop:
        return text, finish
    cuts = [text.find(s) for s in stop if s and s in text]
    if not cuts:
        return text, finish
    return text[:min(cuts)], "stop"
