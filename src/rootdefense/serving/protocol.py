"""The OpenAI request and response formats: a request body checked field by field (a bad
field is a 400 that names it), and the completion objects and stream chunks sent back.

The ``rootdefense`` extension (the openai client's ``extra_body``) asks for the per-token
trace and may make the defense stricter (a lower ``tau``); weakening it (``defense:
"none"``, a higher ``tau``) is refused unless the operator allowed it. Each answer carries
``rootdefense: {defense, replaced, rollbacks, max_harm, finish_reason}`` (streams: in the
chunk that ends the answer).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..decoding.trace import Trace
from ..models.chat import ROLES
from .errors import bad

# accepted and ignored: they change nothing a defended local model does
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier"}
# accepted at their neutral value only
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "logit_bias": None, "echo": False,
           "best_of": 1, "suffix": None, "tools": None, "tool_choice": None, "functions": None,
           "function_call": None, "response_format": None, "top_logprobs": None, "modalities": None,
           "reasoning_effort": None, "audio": None, "prediction": None}
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
          "rootdefense"}
FIELDS = {"chat": COMMON | {"messages", "max_completion_tokens"}, "completion": COMMON | {"prompt"}}
ASK_FIELDS = {"trace", "defense", "tau"}
MAX_STOPS = 4


@dataclass
class DefenseAsk:
    """What a request asks of the defense (the ``rootdefense`` object)."""

    trace: bool = False
    defense: str | None = None  # None: the server's
    tau: float | None = None  # None: the server's


@dataclass
class Ask:
    """One checked request."""

    kind: str  # "chat" or "completion"
    model: str | None
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    defense: DefenseAsk = field(default_factory=DefenseAsk)


def _number(body, name, lo, hi, default, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(f"'{name}' must be a number, got {type(v).__name__}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' must lie in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _integer(body, name, lo, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {v!r}", name)
    if v < lo:
        raise bad(f"'{name}' must be at least {lo}, got {v}", name)
    return v


def _flag(obj, name, param):
    v = obj.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{param}' must be true or false, got {v!r}", param)
    return v


def _content(content, i: int) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                          f"messages[{i}].content[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad("a message's content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise bad("each message must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise bad(f"role {role!r} is not supported; use one of {', '.join(ROLES)}", f"messages[{i}].role")
        if "content" not in m or m["content"] is None:
            raise bad("a message needs 'content'", f"messages[{i}].content")
        out.append({"role": role, "content": _content(m["content"], i)})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise bad("'messages' holds no non-empty user message", "messages")
    return out


def _stop(v) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' holds at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return list(stops)


def _defense_ask(v) -> DefenseAsk:
    if v is None:
        return DefenseAsk()
    if not isinstance(v, dict):
        raise bad("'rootdefense' must be an object: {trace, defense, tau}", "rootdefense")
    unknown = sorted(set(v) - ASK_FIELDS)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r} in 'rootdefense'; valid: {', '.join(sorted(ASK_FIELDS))}",
                  f"rootdefense.{unknown[0]}")
    defense = v.get("defense")
    if defense is not None and not isinstance(defense, str):
        raise bad("'rootdefense.defense' must be a string", "rootdefense.defense")
    tau = v.get("tau")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 < tau < 1):
        raise bad(f"'rootdefense.tau' must be a number strictly between 0 and 1, got {tau!r}", "rootdefense.tau")
    return DefenseAsk(trace=_flag(v, "trace", "rootdefense.trace"), defense=defense,
                      tau=None if tau is None else float(tau))


def parse(body, kind: str) -> Ask:
    """Check a request body (already JSON-decoded) field by field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name in body:
        if name in FIELDS[kind] or name in IGNORED:
            continue
        if name in NEUTRAL:
            if body[name] not in (NEUTRAL[name], None):
                raise bad(f"'{name}' is not supported by this server (only its default, {NEUTRAL[name]!r})", name)
            continue
        raise bad(f"unrecognized request argument '{name}'", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise bad(f"n={n} is not supported: this server returns one choice per request", "n")
    ask = Ask(kind=kind, model=model, temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
              top_p=_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True), seed=_integer(body, "seed", 0),
              stop=_stop(body.get("stop")), stream=_flag(body, "stream", "stream"),
              defense=_defense_ask(body.get("rootdefense")))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    ask.max_tokens = _integer(body, name, 1)
    options = body.get("stream_options")
    if options is not None:
        if not ask.stream:
            raise bad("'stream_options' is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise bad("'stream_options' must be an object: {include_usage}", "stream_options")
        ask.include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    if kind == "chat":
        if "messages" not in body:
            raise bad("'messages' is required", "messages")
        ask.messages = _messages(body["messages"])
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list):
            raise bad("one prompt per request: 'prompt' must be a string (or a list of one)", "prompt")
        if not isinstance(prompt, str) or not prompt:
            raise bad("'prompt' must be a non-empty string", "prompt")
        ask.prompt = prompt
    return ask


# ---------------------------------------------------------------------- responses

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def finish_reason(reason: str) -> str:
    """OpenAI's finish reason for the engine's (the engine's own goes in the extension): a
    withheld answer (the defense's correction failed, see correction.hook) is OpenAI's
    ``content_filter``."""
    if reason == "withheld":
        return "content_filter"
    return "length" if reason in ("length", "timeout") else "stop"


def defense_report(defense: str, trace: Trace, reason: str, with_trace: bool) -> dict:
    s = trace.summary()
    out = {"defense": defense, "replaced": s["replaced"], "rollbacks": s["rollbacks"],
           "max_harm": None if s["max_harm"] is None else round(s["max_harm"], 4), "finish_reason": reason}
    if with_trace:
        out["trace"] = {"events": trace.events, "gate": trace.gate}
    return out


def token_view(step) -> dict:
    """One token of the per-token trace as a client sees it."""
    return {"token": step.token, "harm": None if step.harm is None else round(step.harm, 4),
            "replaced": step.replaced, "original": step.original if step.replaced else None,
            "original_harm": None if step.original_harm is None else round(step.original_harm, 4),
            "source": step.source}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(ask: Ask, rid: str, model: str, text: str, reason: str, report: dict, use: dict,
               tokens: list | None) -> dict:
    """The whole answer, not streamed."""
    if tokens is not None:
        report = {**report, "tokens": tokens}
    if ask.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason(reason)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": use, "rootdefense": report}


def chunk(ask: Ask, rid: str, model: str, created: int, text: str | None = None, *, role: bool = False,
          reason: str | None = None, report: dict | None = None, tokens: list | None = None) -> dict:
    """One stream chunk: a piece of text, the opening role, or the end of the answer."""
    if ask.kind == "chat":
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    extra = dict(report or {})
    if tokens:
        extra["tokens"] = tokens
    if extra:
        out["rootdefense"] = extra
    return out


def usage_chunk(ask: Ask, rid: str, model: str, created: int, use: dict) -> dict:
    obj = "chat.completion.chunk" if ask.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
