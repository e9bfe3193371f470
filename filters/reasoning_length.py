"""A reasoning teacher's trace within bounds: `args: {min_tokens: 1, max_tokens: 4096}` (either may be
null), on a generate stage's rows (columns `reasoning`, `reasoning_tokens`).

Tokens are the teacher's own count (`reasoning_tokens`: a server's usage.completion_tokens_details, or
the split trace's tokens under an hf/vllm teacher). A row without a count is measured as characters / 4
(an estimate; give `min_chars`/`max_chars` to bound characters instead). Fails closed:
- `no_trace`: min_tokens >= 1 (the default) and the row has no trace: the teacher did not reason, or its
  trace was not captured (a server without a reasoning parser puts it in the text);
- `trace_too_short` / `trace_too_long`: outside the bounds (a long trace is what a student with a short
  max_length would see cut, and what costs most to train on).
Score: the trace's length in tokens (counted or estimated), for `synth sample --filter` and sorting.
"""

CHARS_PER_TOKEN = 4  # the same estimate synth plan uses when no tokenizer is at hand


def judge(row, min_tokens: int | None = 1, max_tokens: int | None = None, min_chars: int | None = None,
          max_chars: int | None = None):
    trace = row.get("reasoning") or ""
    if not trace.strip():
        return (False, "no_trace", 0.0) if (min_tokens or 0) >= 1 or (min_chars or 0) >= 1 else (True, None, 0.0)
    counted = row.get("reasoning_tokens")
    tokens = counted if isinstance(counted, int) and counted > 0 else len(trace) / CHARS_PER_TOKEN
    if min_chars is not None and len(trace) < min_chars or min_tokens is not None and tokens < min_tokens:
        return False, "trace_too_short", float(tokens)
    if max_chars is not None and len(trace) > max_chars or max_tokens is not None and tokens > max_tokens:
        return False, "trace_too_long", float(tokens)
    return True, None, float(tokens)
