"""Will a train stage's data fit its student? What can be known before the data exists.

`synth plan` shows it in the train stage's row and `synth run` checks it in the train stage's preflight,
before any teacher is paid (the train stage's own readiness check, `synth.train.readiness`, measures the
data file itself once it exists, at training time):

- lengths: every prompt the data will be made from (the rows of the generate stage the export reads,
  rendered by its template), tokenised with the student's tokenizer and chat template, against the
  recipe's `max_length`. A prompt that alone reaches max_length leaves its answer nothing to train on:
  when more prompts than the recipe's `max_truncated_share` do, the train stage would refuse after the
  teacher is paid, so the run is refused now. Prompt + the generate stage's `max_tokens` over
  max_length is a warning (answers that long will be cut). max_length beyond the student's position
  limit (config.json's max_position_embeddings) is a warning.
- think tags: an sft export with `reasoning: think|both` puts each trace between its `think_tags` in the
  assistant turn. A student whose chat template drops that block from assistant turns (DeepSeek-R1's
  strips everything up to `</think>`) would never see a trace: refused, found by rendering a probe
  conversation with the student's own template.

A prompt is measured as the generate stage's messages with the generation prompt (the export may drop
a system turn or few-shot turns: an upper bound). Nothing here is known when the student is not a local
model directory (a hub id not in the cache, a student trained earlier in this run that does not exist
yet) or the generate stage's input rows are not (an upstream generate stage has not run): then the fit
says so and checks nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from synth.errors import MissingValue, SynthError
from synth.graph import Graph
from synth.requests import input_rows
from synth.vocab import load_tokenizer

PROBE = "synth-probe-trace-3f9c"  # a trace no template rewrites by accident


@dataclass
class Fit:
    max_length: int | None
    max_share: float
    position_limit: int | None = None
    prompts: int = 0  # prompts measured (0: not known yet)
    longest_prompt: int = 0
    over: int = 0  # prompts that alone reach max_length
    max_tokens: int | None = None  # the generate stage's
    think_dropped: bool | None = None  # None: no traces exported, or not knowable
    think_tags: tuple[str, str] | None = None
    unknown: str | None = None  # why the lengths are not known yet
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def note(self) -> str:
        """One line for `synth plan`."""
        parts = []
        if self.prompts and self.max_length:
            answer_room = self.max_length - self.longest_prompt
            parts.append(f"prompts ≤ {self.longest_prompt:,} student tokens of max_length {self.max_length:,}"
                         + (f" (room for {max(answer_room, 0):,}; max_tokens {self.max_tokens:,})"
                            if self.max_tokens else ""))
        elif self.unknown:
            parts.append(self.unknown)
        if self.think_dropped is False:
            parts.append(f"the student's template keeps {self.think_tags[0]}…{self.think_tags[1]}")
        return "; ".join(parts + [f"will fail: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings])


def _student_tokenizer(student: str | None):
    if not student or not Path(student, "config.json").is_file():
        return None
    try:
        return load_tokenizer(str(student))
    except SynthError:
        return None


def think_kept(tokenizer, tags: tuple[str, str]) -> bool | None:
    """Whether the student's chat template keeps a trace between `tags` in an assistant turn (None: it
    cannot render a two-turn conversation at all, a problem the train stage reports itself)."""
    messages = [{"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": f"{tags[0]}\n{PROBE}\n{tags[1]}\n\n4"}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja errors of a template that cannot render this: not ours to judge
        return None
    return PROBE in text


def source_generate(graph: Graph, export: str) -> str | None:
    """The generate stage whose prompts an export's rows carry (through filters, keeps, pairs and score
    stages), or None (a dataset's own rows, a mix of several)."""
    name = graph.root(graph.stage(export).input)
    for _ in range(4):
        kind = graph.stage(name).kind
        if kind == "generate":
            return name
        if kind not in ("pairs", "score"):
            return None
        name = graph.root(graph.stage(name).input)
    return None


def fit(graph: Graph, name: str, student: str | None, max_length: int | None, max_share: float) -> Fit:
    """The fit of train stage `name`'s data to `student` (a model directory), under its recipe's max_length
    and max_truncated_share."""
    stage = graph.stage(name)
    export = graph.stage(stage.data)
    result = Fit(max_length=max_length, max_share=max_share)
    tokenizer = _student_tokenizer(student)
    if tokenizer is None:
        result.unknown = "the student's tokenizer is not here yet: lengths checked when it trains"
        return result
    try:
        limit = json.loads(Path(student, "config.json").read_text()).get("max_position_embeddings")
        result.position_limit = limit if isinstance(limit, int) else None
    except (OSError, ValueError):
        pass
    if max_length and result.position_limit and max_length > result.position_limit:
        result.warnings.append(f"max_length {max_length:,} is beyond the student's max_position_embeddings "
                               f"{result.position_limit:,}")
    if export.format == "sft" and export.reasoning != "drop":
        result.think_tags = tuple(export.think_tags)
        kept = think_kept(tokenizer, result.think_tags)
        result.think_dropped = None if kept is None else not kept
        if result.think_dropped:
            result.errors.append(
                f"the student's chat template drops the {export.think_tags[0]}…{export.think_tags[1]} block from "
                f"assistant turns, so export '{stage.data}' (reasoning: {export.reasoning}) would train on no "
                "trace: set reasoning: drop on it, or train a student whose template keeps the trace")
    source = source_generate(graph, stage.data)
    if source is None or not max_length:
        return result
    rows = input_rows(graph, source, from_store=graph.stage(source).input not in graph.seeds)
    if rows is None:
        result.unknown = f"lengths known once '{graph.stage(source).input}' has run"
        return result
    template = graph.templates[source]
    lengths = []
    for row in rows:
        try:
            messages = template.render(row, where=graph.where(source))
        except MissingValue:  # not sent: no example
            continue
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception:  # noqa: BLE001 - the train stage's readiness names the row and the template's error
            continue
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5: a BatchEncoding
            ids = ids["input_ids"]
        lengths.append(len(ids))
    if not lengths:
        return result
    result.prompts, result.longest_prompt = len(lengths), max(lengths)
    result.over = sum(1 for n in lengths if n >= max_length)
    result.max_tokens = graph.stage(source).params.max_tokens
    if result.over and result.over / len(lengths) > max_share:
        result.errors.append(
            f"{result.over:,} of {len(lengths):,} prompts of '{source}' are alone {max_length:,}+ tokens under the "
            f"student's chat template (longest {result.longest_prompt:,}), max_length {max_length:,}: their answers "
            f"would be cut away and training would refuse after the teacher is paid; raise max_length in "
            f"{stage.recipe} or shorten the prompts")
    elif result.longest_prompt + result.max_tokens > max_length:
        result.warnings.append(
            f"answers longer than {max(max_length - result.longest_prompt, 0):,} tokens will be cut at max_length "
            f"{max_length:,} (prompts up to {result.longest_prompt:,} student tokens, '{source}' max_tokens "
            f"{result.max_tokens:,}); training refuses when more than {max_share:.0%} of rows are")
    return result
