"""A scripted OpenAI-compatible chat server on loopback, for tests that need a teacher whose
behaviour is known exactly (a real tiny model cannot be made correct with a chosen probability).
The openai backend, the HTTP path, caching and the store are all real; only the answers are scripted.

Solver requests (a user message "Q<i>: ..."): the answer is i ("\\boxed{i}") with probability p,
else one of `wrong` distractors (i+1, i+2, ...) uniformly; the draw is seeded by the request's seed
and the question, so a given request always gets the same answer.
Critic requests (the system prompt mentions "grader"): "Score: 9" when the solution's boxed answer
is correct, "Score: 2" when it is wrong, and a reply with no score when the solution contains
"NOSCORE". A question containing LONG gets a 12-word answer, cut at max_tokens words (finish_reason
length) when that is smaller; REFUSE gets a refusal; FILTERME is stopped by a content filter. Usage is
10 prompt and 5 completion tokens per answer (the budget tests price them), a LONG answer's word count.
`logprobs: true` with `top_logprobs: k` returns OpenAI-shaped logprobs, one entry per word, unless
the server was made with logprobs=False (as servers without them do, it then ignores the keys).
Pairwise critic requests ("compare two"): the correct solution wins; when both or neither
are correct it answers "Winner: A" — a pure position bias that judging both orders must cancel.
"""

from __future__ import annotations

import random
import re
import time

from aiohttp import web
from loopback import LoopbackServer

from synth.parsers import last_boxed


class ScriptedTeacher(LoopbackServer):
    def __init__(self, p: float = 0.7, wrong: int = 2, logprobs: bool = True, token_ids: bool = False):
        super().__init__()
        self.p, self.wrong, self.logprobs, self.token_ids = p, wrong, logprobs, token_ids
        self.requests = 0
        self.bodies: list[dict] = []  # every request body, in arrival order

    def answer(self, question_number: int, seed: int | None, salt: str) -> int:
        rng = random.Random(f"{seed}:{salt}")
        if rng.random() < self.p:
            return question_number
        return question_number + rng.randint(1, self.wrong)

    def reply(self, body: dict) -> str:
        messages = body["messages"]
        system = " ".join(m["content"] for m in messages if m["role"] == "system")
        user = messages[-1]["content"]
        if "compare two" in system:  # pairwise critic: prefers the correct solution, else says "A" (position bias)
            q = int(re.search(r"Q(\d+)", user).group(1))
            a = last_boxed(user.split("Solution B:")[0]) == str(q)
            b = last_boxed(user.split("Solution B:")[1]) == str(q)
            return "Winner: B" if b and not a else "Winner: A"
        if "grader" in system:
            if "NOSCORE" in user:
                return "I cannot decide."
            q = int(re.search(r"Q(\d+)", user).group(1))
            given = last_boxed(user)
            return "Checked.\nScore: 9" if given == str(q) else "Wrong result.\nScore: 2"
        if "REFUSE" in user:
            return "I'm sorry, but I can't help with that."
        q = int(re.search(r"Q(\d+)", user).group(1))
        if "LONG" in user:
            return f"Let me work through this one slowly, step by step: so \\boxed{{{self.answer(q, body.get('seed'), user)}}}"
        return f"Working it out. \\boxed{{{self.answer(q, body.get('seed'), user)}}}"

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        self.bodies.append(body)
        return web.json_response(self.response(body))

    def response(self, body: dict) -> dict:
        """The chat.completion object answering one request body."""
        text = self.reply(body)
        # a question containing FILTERME is cut by a content filter, as hosted APIs do
        finish = "content_filter" if "FILTERME" in body["messages"][-1]["content"] else "stop"
        words = text.split(" ")
        completion_tokens = len(words) if "LONG" in body["messages"][-1]["content"] else 5
        if len(words) > (body.get("max_tokens") or 10**9):
            words = words[:body["max_tokens"]]
            text, finish, completion_tokens = " ".join(words), "length", len(words)
        choice = {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}
        if self.logprobs and body.get("logprobs"):
            k = body.get("top_logprobs") or 0
            # word t has logprob -0.1*(t+1); its alternatives are "alt1".."altk", less likely. As vLLM's server
            # asked for return_tokens_as_token_ids (and made with token_ids=True): "token_id:N" (word t: id 10+t,
            # alternative j: 100+j)
            ids = self.token_ids and body.get("return_tokens_as_token_ids")

            def token(t: int, w: str) -> str:
                return f"token_id:{10 + t}" if ids else (" " if t else "") + w

            choice["logprobs"] = {"content": [
                {"token": token(t, w), "logprob": -0.1 * (t + 1), "bytes": None,
                 "top_logprobs": [{"token": token(t, w), "logprob": -0.1 * (t + 1), "bytes": None}]
                 + [{"token": f"token_id:{100 + j}" if ids else f"alt{j}", "logprob": -0.1 * (t + 1) - j,
                     "bytes": None} for j in range(1, k)]}
                for t, w in enumerate(words)]}
        return {"id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": 10, "completion_tokens": completion_tokens,
                          "total_tokens": 10 + completion_tokens}}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
