"""Reasoning teachers offline: a tiny model taught to emit think tags, as an hf and a vllm teacher.

The model is a random-init tiny Llama (synth.tiny.build_model: a tokenizer trained here on the task's text)
trained in this module for a couple of hundred steps (plain torch, ~20 s on one core) on chat examples
whose assistant turn is `<think>3+4 is 7</think>\\boxed{7}`; greedy and sampled generation then write a
trace in think tags and a boxed answer after it. Through real pipeline files and the CLI: the generate
stage moves the trace to the `reasoning` column and keeps the answer in `text` (which the boxed parser
reads); the trace's tokens are part of `completion_tokens`, so `synth plan`'s bound and `synth status`'s
spend cover them, and `reasoning_tokens` counts the trace with its tags (re-tokenised by the teacher's tokenizer);
a chat template that opens the tag in the prompt (`...</think>answer`) is split too, `reasoning_tags: []`
keeps the text whole; a trace cut at max_tokens is all reasoning, never an answer (and an sft export
leaves such a sample out); the export writes the trace in the student's think tags, and a student
trained on that export writes think tags itself."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil

import pytest

from conftest import VLLM_CPU_ENV, cli_env, echo_teacher, make_pipeline, query, synth, synth_run

SYSTEM = r"Think inside <think></think>, then answer in \boxed{}."
# the template synth renders: the same messages the model was trained on (asserted in the first test)
PROMPT = "system: 'Think inside <think></think>, then answer in \\boxed{}.'\nuser: 'What is {{ a }} + {{ b }}?'\n" \
         "parse: boxed\n"
TRAIN_PAIRS = [(a, b) for a in range(10) for b in range(10)]
TRACE = re.compile(r"(\d)\+(\d) is (\d+)")  # what the model writes between the tags
ANSWER = re.compile(r"\\boxed\{(\d+)\}")
CPU_ENV = VLLM_CPU_ENV


def messages(a: int, b: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]


def reply(a: int, b: int) -> str:
    return f"<think>{a}+{b} is {a + b}</think>\\boxed{{{a + b}}}"


def train_think_model(base, out, steps: int = 200, seed: int = 0):
    """The model at `base` trained to answer messages(a, b) with reply(a, b) (loss on the assistant turn and
    its end token), saved to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = []
    for a, b in TRAIN_PAIRS:
        prompt = tok.apply_chat_template(messages(a, b), add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        full = tok.apply_chat_template(messages(a, b) + [{"role": "assistant", "content": reply(a, b)}],
                                       tokenize=True, return_dict=True)["input_ids"]
        assert full[:len(prompt)] == prompt
        rows.append((full, len(prompt)))
    width = max(len(full) for full, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (full, n) in enumerate(rows):
        ids[i, :len(full)], mask[i, :len(full)] = torch.tensor(full), 1
        labels[i, n:len(full)] = torch.tensor(full[n:])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(rows), (32,), generator=gen)
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.3, f"the think model did not learn its format (loss {loss.item():.3f})"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"base": the random-init model (the student), "think": it trained to write think tags, "opened": the
    think model with a chat template whose generation prompt opens the tag (`<|assistant|>\\n<think>`),
    as Qwen3/DeepSeek-R1 templates do: it writes `trace</think>answer`}."""
    from transformers import AutoTokenizer

    from synth.tiny import build_model

    root = tmp_path_factory.mktemp("think_models")
    corpus = [SYSTEM] + [m["content"] for a, b in TRAIN_PAIRS for m in messages(a, b)[1:]] + \
             [reply(a, b) for a, b in TRAIN_PAIRS]
    base = build_model(root / "base", corpus, vocab_size=300, split_digits=True)
    think = train_think_model(base, root / "think")
    opened = root / "opened"
    shutil.copytree(think, opened)
    tok = AutoTokenizer.from_pretrained(opened)
    assert tok.chat_template.endswith("{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tok.chat_template = tok.chat_template.replace("<|assistant|>\n{% endif %}", "<|assistant|>\n<think>{% endif %}")
    tok.save_pretrained(opened)
    return {"base": base, "think": think, "opened": opened}


def sums(pairs) -> dict:
    """The files of a pipeline on `pairs`: sums.jsonl and the prompt template."""
    return {"sums.jsonl": [{"id": f"s{a}{b}", "a": a, "b": b} for a, b in pairs], "prompts/think.yaml": PROMPT}


TEST_PAIRS = [(3, 4), (7, 8), (0, 9), (5, 5), (2, 6), (9, 1), (4, 4), (8, 3)]


def generated(store, stage: str) -> list[tuple]:
    return query(store, "SELECT a, b, reasoning, text, answer, finish_reason, completion_tokens, reasoning_tokens, "
                        f"prompt_tokens FROM {stage} ORDER BY a, b, sample")


def assert_split(rows, *, greedy: bool = True) -> None:
    """Every row: the trace (without tags) in reasoning, the boxed answer alone in text, parsed. Greedy: the
    trace exactly as trained, its operands copied from the question; sampled (a rare odd token, e.g. "2+3
    is0" once in 400 samples at temperature 0.7): a trace without tags."""
    assert rows
    for a, b, reasoning, text, answer, finish, *_ in rows:
        assert finish == "stop", (a, b, reasoning, text)
        boxed = ANSWER.fullmatch(text or "")
        assert boxed and answer == boxed[1], (a, b, reasoning, text)
        assert reasoning and "+" in reasoning and "think>" not in reasoning, (a, b, reasoning, text)
        if greedy:
            trace = TRACE.fullmatch(reasoning)
            assert trace and (int(trace[1]), int(trace[2])) == (a, b), (a, b, reasoning)


@pytest.mark.slow
def test_hf_teacher_splits_the_trace_and_prices_it(tmp_path, models):
    """Through the CLI: the hf teacher's trace lands in `reasoning`, the answer alone in `text` (parsed by the
    template's boxed parser); completion_tokens is every generated token (tags, trace, answer, end token), so
    `synth plan` bounds and `synth status` prices the trace; the three exports write the trace in the
    student's tags (think), both variants (both) or the answer alone (drop)."""
    from transformers import AutoTokenizer

    pipeline = make_pipeline(tmp_path, files=sums(TEST_PAIRS), teachers={
        "thinker": {"backend": "hf", "model": str(models["think"]), "prices": {"input": 1000, "output": 2000}}},
        stages={"sums": "kind: load, path: sums.jsonl",
                "solutions": "kind: generate, input: sums, teacher: thinker, prompt: think, "
                             "params: {temperature: 0, max_tokens: 32}",
                "sft_think": 'kind: export, input: solutions, path: out/think.jsonl, reasoning: think, '
                             'think_tags: ["<reason>", "</reason>"]',
                "sft_both": "kind: export, input: solutions, path: out/both.jsonl, reasoning: both",
                "sft_drop": "kind: export, input: solutions, path: out/drop.jsonl"})
    plan = {s["stage"]: s for s in json.loads(synth("plan", pipeline, "--format", "json", check=True).stdout)}
    bound = plan["solutions"]
    assert bound["to_send"] == len(TEST_PAIRS) and bound["prompt_tokens_by"] == "tokenizer"
    assert bound["max_completion_tokens"] == 32 * len(TEST_PAIRS)  # trace and answer share max_tokens
    assert bound["max_cost"] == pytest.approx((bound["est_prompt_tokens"] * 1000 + 32 * len(TEST_PAIRS) * 2000) / 1e6)

    synth("run", pipeline, check=True)
    store = tmp_path / "out" / "run.duckdb"
    rows = generated(store, "solutions")
    assert len(rows) == len(TEST_PAIRS)
    assert_split(rows)
    # what synth sent is what the model learned on
    sent = [json.loads(m) for (m,) in query(store, "SELECT p.messages FROM solutions s JOIN synth.requests r "
                                                   "ON r.id = s.id JOIN synth.prompts p ON p.id = r.prompt_id "
                                                   "ORDER BY s.a, s.b")]
    assert sent == [messages(a, b) for a, b in sorted(TEST_PAIRS)]
    assert bound["est_prompt_tokens"] == sum(r[8] for r in rows)
    # completion_tokens: the whole output, tags and trace included, plus the end-of-sequence token
    tok = AutoTokenizer.from_pretrained(models["think"])
    for _, _, reasoning, text, _, _, completion_tokens, reasoning_tokens, _ in rows:
        whole = len(tok(f"<think>{reasoning}</think>{text}")["input_ids"]) + 1
        assert completion_tokens == whole > len(tok(text)["input_ids"]) + 1 + len(tok(reasoning)["input_ids"])
        # the trace with its tags, re-tokenised by the teacher's tokenizer: what generating it took
        assert reasoning_tokens == len(tok(f"<think>{reasoning}</think>", add_special_tokens=False)["input_ids"])
        assert 0 < reasoning_tokens < completion_tokens
    cost = (sum(r[8] for r in rows) * 1000 + sum(r[6] for r in rows) * 2000) / 1e6
    status = synth("status", pipeline, check=True).stdout
    assert f"${cost:,.4f}" in status, status

    def assistant(path):
        return [(r["id"], [m["content"] for m in r["messages"] if m["role"] == "assistant"][0])
                for r in map(json.loads, (tmp_path / "out" / path).read_text().splitlines())]
    ids = [i for (i,) in query(store, "SELECT id FROM solutions ORDER BY input_id, sample, id")]
    by_id = dict(zip(ids, query(store, "SELECT reasoning, text FROM solutions ORDER BY input_id, sample, id")))
    assert assistant("think.jsonl") == [(i, f"<reason>\n{by_id[i][0]}\n</reason>\n\n{by_id[i][1]}") for i in ids]
    assert assistant("drop.jsonl") == [(i, by_id[i][1]) for i in ids]
    assert assistant("both.jsonl") == [x for i in ids for x in (
        (i + ":think", f"<think>\n{by_id[i][0]}\n</think>\n\n{by_id[i][1]}"), (i + ":answer", by_id[i][1]))]


@pytest.mark.slow
def test_a_template_that_opens_the_tag_and_reasoning_tags(tmp_path, models):
    """The `opened` model's chat template ends the prompt with `<think>`: the model writes `trace</think>answer`
    and that is split the same way. `reasoning_tags: []` keeps the text whole (trace, tags and all); the
    boxed parser still finds the answer in it."""
    from transformers import AutoTokenizer

    pipeline = make_pipeline(tmp_path, files=sums(TEST_PAIRS), teachers={
        "opened": {"backend": "hf", "model": str(models["opened"])},
        "plain": {"backend": "hf", "model": str(models["think"]), "reasoning_tags": []},
        "thinker": {"backend": "hf", "model": str(models["think"])}}, stages={
        "sums": "kind: load, path: sums.jsonl",
        # a seed each: `plain` and `thinker` are one model, and requests with the same id share the cache
        # (the split is made on an answer's arrival: a cached answer keeps the split it was stored with)
        **{f"by_{t}": f"kind: generate, input: sums, teacher: {t}, prompt: think, "
                      f"params: {{temperature: 0, max_tokens: 32, seed: {seed}}}"
           for seed, t in enumerate(("opened", "plain", "thinker"))}})
    synth_run(pipeline)
    store = tmp_path / "out" / "run.duckdb"
    opened, thinker = generated(store, "by_opened"), generated(store, "by_thinker")
    assert_split(opened)
    assert_split(thinker)
    # the opened template put `<think>` in the prompt, and the model's output did not repeat it: the whole
    # output (every generated token counted, plus the end token) is `trace</think>answer`
    tok = AutoTokenizer.from_pretrained(models["think"])
    opening = len(tok("<think>")["input_ids"])
    assert [r[2:4] for r in opened] == [r[2:4] for r in thinker]  # split the same as `<think>...</think>`
    for o, t in zip(opened, thinker):
        assert o[8] == t[8] + opening
        assert o[6] == len(tok(f"{o[2]}</think>{o[3]}")["input_ids"]) + 1 == t[6] - opening
    whole = generated(store, "by_plain")
    assert [(r[0], r[1], r[3], r[4]) for r in whole] == [
        (a, b, f"<think>{reasoning}</think>{text}", answer) for a, b, reasoning, text, answer, *_ in thinker]
    assert all(r[2] is None for r in whole)


@pytest.mark.slow
def test_a_trace_cut_at_max_tokens_is_never_an_answer(tmp_path, models):
    """max_tokens 5 stops the model inside its trace (`<think>3+4`, no closing tag): on_length keep (the
    default) stores the half trace as reasoning with an empty text and no answer, and the sft exports leave
    the sample out (no answer to train on, and no closing tag the teacher never wrote); on_length error
    records the cut as an error row; on_length retry gets the whole trace and the answer."""
    pairs = TEST_PAIRS[:4]
    # a seed per stage: the same request in two stages is one cached answer, and a policy (on_length) applies
    # to answers as they arrive
    cut = "kind: generate, input: sums, teacher: thinker, prompt: think, params: {temperature: 0, max_tokens: 5, seed: %d}"
    pipeline = make_pipeline(tmp_path, files=sums(pairs), teachers={
        "thinker": {"backend": "hf", "model": str(models["think"])}}, stages={
        "sums": "kind: load, path: sums.jsonl",
        "kept": cut % 0,
        "failed": cut % 1 + ", on_length: error",
        "retried": cut % 2 + ", on_length: retry, retry_max_tokens: 32",
        "sft_think": "kind: export, input: kept, path: out/think.jsonl, reasoning: think",
        "sft_drop": "kind: export, input: kept, path: out/drop.jsonl"})
    counts = synth_run(pipeline)
    store = tmp_path / "out" / "run.duckdb"
    kept, retried = generated(store, "kept"), generated(store, "retried")
    assert len(kept) == len(pairs)
    for (a, b, reasoning, text, answer, finish, completion_tokens, *_), full in zip(kept, retried):
        assert finish == "length" and completion_tokens == 5
        assert text == "" and answer is None, (reasoning, text)
        assert reasoning and full[2].startswith(reasoning) and reasoning != full[2]  # a prefix of the whole trace
        assert "</think>" not in reasoning and "boxed" not in reasoning
    assert_split(retried)
    assert query(store, "SELECT count(*) FROM failed")[0][0] == 0
    assert query(store, "SELECT cause, count(*) FROM synth.errors WHERE stage = 'failed' GROUP BY cause") == \
        [("length", len(pairs))]
    assert counts["errors"] >= len(pairs)
    for path in ("think.jsonl", "drop.jsonl"):
        assert (tmp_path / "out" / path).read_text() == ""
    detail = dict(query(store, "SELECT name, detail FROM synth.stages WHERE kind = 'export'"))
    assert all(json.loads(d)["unanswered"] == len(pairs) for d in detail.values())


def test_an_export_leaves_out_a_trace_without_an_answer(workspace):
    """No model needed: an answer that is only an open trace (`<think>...`, cut at max_tokens) is all
    reasoning and no text; no export writes it (think would close a tag the teacher never closed and
    train an empty answer; drop would train an empty answer); the whole answers are exported as before."""
    rules = [{"match": r"Q([02468]):", "reply": "<think>still adding {{ match[1] }} and"},
             {"match": r"Q(\d+):", "reply": "<think>add {{ match[1] }}</think>\\boxed{ {{ match[1] }} }"}]
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(rules)}, stages={
        "problems": "kind: load, path: seeds.jsonl, limit: 4",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve",
        **{f"sft_{mode}": f"kind: export, input: solutions, path: out/{mode}.jsonl, reasoning: {mode}"
           for mode in ("drop", "think", "both")}})
    synth_run(pipeline)
    store = workspace / "out" / "run.duckdb"
    rows = query(store, "SELECT question, reasoning, text, answer FROM solutions ORDER BY input_id")
    assert sorted((q[:2], r, t, a) for q, r, t, a in rows) == [
        ("Q0", "still adding 0 and", "", None), ("Q1", "add 1", "\\boxed{ 1 }", "1"),
        ("Q2", "still adding 2 and", "", None), ("Q3", "add 3", "\\boxed{ 3 }", "3")]
    for mode, per_row in (("drop", 1), ("think", 1), ("both", 2)):
        records = [json.loads(line) for line in (workspace / "out" / f"{mode}.jsonl").read_text().splitlines()]
        texts = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
        assert len(records) == 2 * per_row and all("boxed" in t for t in texts), (mode, texts)
        assert not any("still adding" in t for t in texts)
    detail = json.loads(query(store, "SELECT detail FROM synth.stages WHERE name = 'sft_think'")[0][0])
    assert detail["unanswered"] == 2


@pytest.mark.slow
def test_a_student_trained_on_the_traces_writes_think_tags(tmp_path, models):
    """The loop closed: the hf teacher's traces exported in the student's think tags, a few SFT steps of the
    random-init base model on them (TRL through the train stage), and the student, as a teacher by its
    name, writes `<think>...</think>` itself: its trace is split into `reasoning` like its teacher's."""
    pairs = random.Random(0).sample(TRAIN_PAIRS, 40)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "sft.yaml").write_text("max_steps: 60\nlearning_rate: 0.003\nper_device_train_batch_size: 8\n"
                                                 "max_length: 96\nlogging_steps: 1\nwarmup_steps: 0\nseed: 0\n")
    pipeline = make_pipeline(tmp_path, files=sums(pairs), teachers={
        "thinker": {"backend": "hf", "model": str(models["think"])},
        "base": {"backend": "hf", "model": str(models["base"])}}, stages={
        "sums": "kind: load, path: sums.jsonl",
        "solutions": "kind: generate, input: sums, teacher: thinker, prompt: think, "
                     "params: {temperature: 0, max_tokens: 32}",
        "sft_data": "kind: export, input: solutions, path: out/sft.jsonl, reasoning: think",
        "student": "kind: train, method: sft, data: sft_data, student: base, recipe: train/sft.yaml",
        "mine": "kind: generate, input: sums, teacher: student, prompt: think, params: {temperature: 0, max_tokens: 32}"})
    synth("run", pipeline, timeout=600, check=True, env=cli_env())
    store = tmp_path / "out" / "run.duckdb"
    data = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert len(data) == len(pairs)
    assert all(re.fullmatch(r"<think>\n\d\+\d is \d+\n</think>\n\n\\boxed\{\d+\}", r["messages"][-1]["content"])
               for r in data)
    losses = [loss for (loss,) in query(store, "SELECT loss FROM student WHERE loss IS NOT NULL ORDER BY step")]
    assert len(losses) >= 50 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 3
    mine = generated(store, "mine")
    assert len(mine) == len(pairs)
    split = [r for r in mine if r[2] and TRACE.fullmatch(r[2]) and ANSWER.fullmatch(r[3] or "")]
    assert len(split) >= 0.9 * len(pairs), mine


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")  # before training
def test_vllm_teacher_splits_the_trace(tmp_path, models):
    """The same model in offline vLLM (one engine, 4 prompts x 2 sampled answers): every answer's trace in
    `reasoning`, the boxed answer alone in `text`, the whole output in completion_tokens."""
    pairs = TEST_PAIRS[:4]
    teacher = {"backend": "vllm", "model": str(models["think"]), "max_model_len": 256, "chunk_size": 8}
    pipeline = make_pipeline(tmp_path, files=sums(pairs), teachers={"thinker": teacher}, stages={
        "sums": "kind: load, path: sums.jsonl",
        "solutions": "kind: generate, input: sums, teacher: thinker, prompt: think, samples: 2, "
                     "params: {temperature: 0.7, max_tokens: 32, seed: 0}"})
    synth("run", pipeline, env=cli_env(**CPU_ENV), timeout=600, check=True)
    rows = generated(tmp_path / "out" / "run.duckdb", "solutions")
    assert len(rows) == 2 * len(pairs)
    assert_split(rows, greedy=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["think"])
    for _, _, reasoning, text, _, _, completion_tokens, reasoning_tokens, _ in rows:
        assert completion_tokens == len(tok(f"<think>{reasoning}</think>{text}")["input_ids"]) + 1
        assert reasoning_tokens == len(tok(f"<think>{reasoning}</think>", add_special_tokens=False)["input_ids"])


def test_an_export_of_only_cut_traces_says_why_it_is_empty(workspace):
    rules = [{"match": r"Q(\d+):", "reply": "<think>still adding {{ match[1] }} and"}]
    pipeline = make_pipeline(workspace, teachers={"t": echo_teacher(rules)}, stages={
        "problems": "kind: load, path: seeds.jsonl, limit: 3",
        "solutions": "kind: generate, input: problems, teacher: t, prompt: solve",
        "sft": "kind: export, input: solutions, path: out/sft.jsonl, reasoning: think"})
    ran = synth("run", pipeline, check=True)
    said = " ".join(ran.stderr.split())  # rich wraps the line at the console's width
    assert "every sample's trace was cut at max_tokens before an answer (3 unanswered" in said
