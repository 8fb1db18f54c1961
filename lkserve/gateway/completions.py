"""POST /v1/completions: OpenAI's (legacy) text completions, streaming and not.

Supported: prompt as a string, a list of strings, a list of token ids or a list of lists (up to 16 prompts),
n (up to 8; at most 16 choices per request), echo, stop, seed, temperature/top_p/top_k/min_p, penalties,
stream_options.include_usage, logprobs (0-20; with echo, the prompt's too, as vLLM's server gives them).
Not supported (400): suffix, logit_bias, best_of != n.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from lkserve.gateway import generation as g
from lkserve.gateway import serving
from lkserve.gateway.errors import bad_request
from lkserve.gateway.protocol import (
    MAX_CHOICES,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    new_id,
)

router = APIRouter()


async def _prompts(state, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """[(token ids, text or None)] per prompt."""
    p = req.prompt
    tok = state.engine.tokenizer
    vocab = len(tok)
    if isinstance(p, str):
        return [(await serving.tokenize(tok, p, True), p)]
    if p and all(isinstance(x, str) for x in p):
        return [(await serving.tokenize(tok, x, True), x) for x in p]
    if p and all(isinstance(x, int) for x in p):
        g.check_token_ids(p, vocab, "prompt")
        return [(list(p), None)]
    out = []
    for ids in p:
        g.check_token_ids(ids, vocab, "prompt")
        out.append((list(ids), None))
    return out


def _logprobs(tokenizer, entries: list[tuple[int, object]], offset: int) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy shape for (token id, engine TokenLogprob or None) pairs, text offsets from `offset` (as
    vLLM's server counts them: each token's own text, not the detokenized delta). Returns it and the next offset."""
    lp = CompletionLogprobs()
    for tid, e in entries:
        if e is None:  # the prompt's first token has no logprob
            token, value, top = tokenizer.decode([tid]), None, None
        else:
            token, value = e.token, g.wire_logprob(e.logprob)
            # most likely first, then the chosen token (OpenAI: up to logprobs + 1 entries); tokens that decode to
            # the same text (byte pieces of one character all decode to "") share a key: the likeliest one keeps it
            top = {}
            for _, text, v in e.top:
                top.setdefault(text, g.wire_logprob(v))
            top.setdefault(e.token, value)
        lp.tokens.append(token)
        lp.token_logprobs.append(value)
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)
        offset += len(token)
    return lp, offset


class _Completions(serving.Endpoint):
    stream_response = CompletionStreamResponse

    def __init__(self, echo_text: dict[int, str], echo_ids: dict[int, list[int]], logprobs: bool, tokenizer):
        self.echo_text = echo_text  # choice index -> prompt text to put in front (echo=true)
        self.echo_ids = echo_ids  # choice index -> prompt token ids (echo=true), for the prompt's logprobs
        self.logprobs = logprobs
        self.tokenizer = tokenizer
        self.started: set[int] = set()

    def _entries(self, st, logprobs, with_prompt: bool) -> list[tuple[int, object]]:
        prompt = []
        if with_prompt and st.index in self.echo_ids:
            ids = self.echo_ids[st.index]
            prompt = list(zip(ids, st.prompt_logprobs or [None] * len(ids)))
        return prompt + [(e.token_id, e) for e in logprobs]

    def on_chunk(self, reply, st, chunk):
        text, first = chunk.text, st.index not in self.started
        if first:
            self.started.add(st.index)
            text = self.echo_text.get(st.index, "") + text
        logprobs = None
        if self.logprobs:  # exactly this chunk's tokens (and the prompt's, in the first chunk of an echo)
            logprobs, st.text_offset = _logprobs(self.tokenizer, self._entries(st, chunk.logprobs or [], first),
                                                 st.text_offset)
        if not text and not chunk.finished and not (logprobs and logprobs.tokens):
            return
        yield g.sse(CompletionStreamResponse(
            id=reply.rid, created=reply.created, model=reply.model,
            choices=[CompletionChoice(
                index=st.index, text=text, logprobs=logprobs,
                finish_reason=g.finish_reason(st.finish_reason) if chunk.finished else None,
            )],
            usage=reply.usage_now(),
        ))

    def response(self, reply, states):
        return CompletionResponse(
            id=reply.rid, created=reply.created, model=reply.model,
            choices=[
                CompletionChoice(
                    index=s.index, text=self.echo_text.get(s.index, "") + s.text,
                    logprobs=_logprobs(self.tokenizer, self._entries(s, s.logprobs, True), 0)[0]
                    if self.logprobs else None,
                    finish_reason=g.finish_reason(s.finish_reason))
                for s in states
            ],
            usage=reply.usage_total(),
        )


@router.post("/v1/completions", response_model=CompletionResponse, responses=serving.GENERATION_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request):
    state = request.app.state.gw
    model = serving.check_request(state, body)
    prompts = await _prompts(state, body)
    if len(prompts) * body.n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices per request (prompts x n)", param="n")
    engine = state.engine
    rid = new_id("cmpl")
    plan = serving.Plan(rid, [], {}, sum(len(ids) for ids, _ in prompts))
    echo_text: dict[int, str] = {}
    echo_ids: dict[int, list[int]] = {}
    # vLLM's server: echo with logprobs returns the prompt's logprobs too (vLLM computes them in the prefill)
    prompt_logprobs = body.logprobs if body.echo else None
    for p_idx, (ids, text) in enumerate(prompts):
        max_tokens = g.resolve_max_tokens(engine.max_model_len, len(ids), body.max_tokens, "max_tokens")
        for i in range(body.n):
            index = p_idx * body.n + i
            sampling = g.build_sampling(body, max_tokens, i, body.logprobs, prompt_logprobs)
            plan.jobs.append(g.Job(index, ids, sampling, f"{rid}-{index}"))
            plan.states[index] = g.ChoiceState(index=index)
            if body.echo:
                echo_text[index] = text if text is not None else engine.tokenizer.decode(ids)
                echo_ids[index] = ids
    endpoint = _Completions(echo_text, echo_ids, body.logprobs is not None, engine.tokenizer)
    return await serving.serve(request, body, model, plan, endpoint)
