"""Rate limits and adaptive concurrency on the openai teacher's fast path.

The server side is the fault proxy (tests/fault_proxy.py) enforcing a fixed-window request limit
the way OpenAI does (x-ratelimit-* headers on every answer, 429 + Retry-After over the limit) in
front of the scripted OpenAI-compatible server; synth is not told the limit. The window is 3 s
instead of a minute so that the test takes seconds: the limiter reads the reset from the headers,
so the window length does not matter to it.
"""

from __future__ import annotations

import asyncio
import json

from conftest import query, synth, write
from fault_proxy import FaultProxy, Rules
from scripted_teacher import ScriptedTeacher

from synth.teachers.limiter import Limiter, parse_reset

LIMIT, WINDOW = 40, 3.0  # 40 requests per 3 s window = 800 requests/min
ROWS, SAMPLES = 120, 2   # 240 requests: six windows' worth


def test_achieves_the_servers_rate_with_almost_no_429s(workspace):
    write(workspace / "questions.jsonl", "".join(json.dumps({"id": f"q{i}", "question": f"Q{i}: what is it?"})
                                                  + "\n" for i in range(ROWS)))
    rules = Rules(limit_requests=LIMIT, limit_window_s=WINDOW)
    with ScriptedTeacher(p=1.0) as teacher, FaultProxy(teacher.base_url.removesuffix("/v1"), rules) as proxy:
        pipeline = write(workspace / "pipeline.yaml", f"""\
            store: out/run.duckdb
            teachers:
              limited: {{backend: openai, model: m, base_url: "{proxy.base_url}", max_concurrency: 16}}
            stages:
              problems: {{kind: load, path: questions.jsonl}}
              solutions: {{kind: generate, input: problems, teacher: limited, prompt: solve, samples: {SAMPLES},
                          params: {{temperature: 1.0, max_tokens: 16, seed: 0}}}}
            """)
        synth("run", pipeline, check=True, timeout=120)
    assert query(workspace / "out" / "run.duckdb", "SELECT count(*) FROM solutions")[0][0] == ROWS * SAMPLES
    assert teacher.requests == ROWS * SAMPLES  # every request answered once upstream: nothing dropped

    attempts = rules.attempts
    start = attempts[0][0]
    windows: dict[int, int] = {}
    for t, _, status in attempts:
        if status == 200:
            index = int((t - proxy._started) // WINDOW)
            windows[index] = windows.get(index, 0) + 1
    full = sorted(windows)[1:-1]  # windows the run spanned completely
    achieved = sum(windows[i] for i in full) / len(full)
    after_first = [s for t, _, s in attempts if t >= start + WINDOW]
    rejected = sum(s == 429 for s in after_first) / len(after_first)
    print(f"\nlimit {LIMIT}/window: achieved {achieved:.1f}/window over {len(full)} full windows; "
          f"429s after the first window {rejected:.1%} of {len(after_first)} attempts; "
          f"429s in all {sum(s == 429 for *_, s in attempts)}")
    assert achieved >= 0.9 * LIMIT
    assert rejected <= 0.01


def test_parse_reset_reads_openai_durations():
    assert parse_reset("1s") == 1.0 and parse_reset("6m0s") == 360.0 and parse_reset("250ms") == 0.25
    assert parse_reset("1h2m3.5s") == 3723.5 and parse_reset("2.5") == 2.5
    assert parse_reset("") is None and parse_reset("soon") is None


def test_aimd_halves_on_overload_and_grows_back():
    async def scenario():
        limiter = Limiter(16, cooldown_s=0.0)
        for _ in range(3):  # three 429s: 16 -> 8 -> 4 -> 2
            await limiter.acquire()
            await limiter.release("rate_limit")
        low = limiter.window
        for _ in range(40):  # healthy answers: about +1 per window's worth
            await limiter.acquire()
            await limiter.release("ok")
        return low, limiter.window

    low, grown = asyncio.run(scenario())
    assert low == 2.0
    assert 8.0 < grown <= 16.0


def test_concurrency_never_exceeds_the_window():
    async def scenario():
        limiter = Limiter(8, cooldown_s=0.0)
        await limiter.acquire()
        await limiter.release("server_error")  # window 4
        over, first_wave = [], []

        async def one(i):
            await limiter.acquire()
            if limiter.in_flight > max(int(limiter.window), 1):
                over.append((limiter.in_flight, limiter.window))
            if i < 8:
                first_wave.append(limiter.in_flight)
            await asyncio.sleep(0.01)
            await limiter.release("ok")

        await asyncio.gather(*(one(i) for i in range(40)))
        return over, first_wave, limiter.window

    over, first_wave, window = asyncio.run(scenario())
    assert over == []
    assert max(first_wave) == 4  # the cut window holds the first burst to 4 in flight
    assert window == 8.0  # and 40 healthy answers grow it back to max_concurrency
