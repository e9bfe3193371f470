"""Teachers: one Protocol, one module per backend (hf.py, openai.py, vllm.py, echo.py).

A teacher takes a batch of requests and yields exactly one Completion per request, in the order they
finish, so that the caller can commit results as they arrive. It is synchronous to its caller and
may be asynchronous inside. A failed request is a Completion with `error` set (a short cause code)
rather than an exception: the generate stage records it as an error row that a re-run retries.
Heavy libraries (torch, transformers, vllm) are imported inside the backend modules only.
"""

from __future__ import annotations

from pathlib import Path

from synth.teachers.base import (  # the package's public names (the backends import synth.teachers.base)
    CHARS_PER_TOKEN, DEFAULT_REASONING_TAGS, Capabilities, Completion, EchoRule, EchoTeacherConfig, HFTeacherConfig,
    OpenAITeacherConfig, POLICY_CAUSES, Prices, Request, SamplingParams, ScoreRequest, Teacher, TeacherBase,
    TeacherConfig,
    VLLMTeacherConfig, _TeacherConfig, approx_prompt_tokens, content_filtered, estimated_tokens,
    logprobs_from_entries, model_signature, prompt_token_counter, resolve_model_path, split_reasoning,
    token_logprobs, vocabulary_of,
)

__all__ = ['CHARS_PER_TOKEN', 'DEFAULT_REASONING_TAGS', 'Capabilities', 'Completion', 'EchoRule', 'EchoTeacherConfig', 'HFTeacherConfig',
           'OpenAITeacherConfig', 'POLICY_CAUSES', 'Prices', 'Request', 'SamplingParams', 'ScoreRequest', 'Teacher',
           'TeacherBase', 'TeacherConfig', 'VLLMTeacherConfig', '_TeacherConfig', 'approx_prompt_tokens',
           'content_filtered', 'estimated_tokens', 'model_signature', 'prompt_token_counter',
           'resolve_model_path', 'split_reasoning', 'load_teacher', 'logprobs_from_entries', 'token_logprobs',
           'vocabulary_of']


def load_teacher(name: str, config: _TeacherConfig, base_dir: Path) -> Teacher:
    """Construct the backend for a teacher config. Imports the backend module only now."""
    if config.backend == "hf":
        from synth.teachers.hf import HFTeacher
        return HFTeacher(name, config, base_dir)
    if config.backend == "openai" and config.mode == "batch":
        from synth.teachers.batch import BatchTeacher
        return BatchTeacher(name, config, base_dir)
    if config.backend == "openai":
        from synth.teachers.openai import OpenAITeacher
        return OpenAITeacher(name, config, base_dir)
    if config.backend == "vllm":
        from synth.teachers.vllm import VLLMTeacher
        return VLLMTeacher(name, config, base_dir)
    if config.backend == "echo":
        from synth.teachers.echo import EchoTeacher
        return EchoTeacher(name, config, base_dir)
    raise AssertionError(f"unknown backend {config.backend!r}")  # pydantic rejected it already
