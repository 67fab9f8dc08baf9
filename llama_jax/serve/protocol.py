"""The OpenAI request parameters the server accepts, checked one by one: each has its type and range, the API's
parameters this server does not implement are refused by name (unless given their neutral value), and any other
name is refused as unknown. Every problem is one BadRequest naming the parameter; api.py turns it into OpenAI's
error object."""

from __future__ import annotations

import json
import numbers

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_BODY = 8 << 20  # bytes of a request body


class BadRequest(Exception):
    """A request the server refuses: OpenAI's error object with this message, the parameter it names, the HTTP
    status and an error code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def number(body, name, default, low=None, high=None, low_open=False):
    """body[name] as a float in [low, high] ((low, high] with low_open); default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise BadRequest(f"{name} must be a number, got {json.dumps(v)[:40]}", name)
    if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise BadRequest(f"{name}={v} is out of range {bounds}", name)
    return float(v)


def integer(body, name, default, low=None, high=None):
    """body[name] as an int in [low, high] (a bool is not one); default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequest(f"{name} must be an integer, got {json.dumps(v)[:40]}", name)
    if (low is not None and v < low) or (high is not None and v > high):
        raise BadRequest(f"{name}={v} must be " + (f">= {low}" if high is None else f"in [{low}, {high}]"), name)
    return v


def boolean(body, name, default=False):
    """body[name] as a bool; default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be true or false, got {json.dumps(v)[:40]}", name)
    return v


def stop(body) -> tuple[str, ...]:
    """The stop strings: one string or a list of up to MAX_STOP non-empty ones."""
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise BadRequest(f"stop: at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return tuple(stops)


# Parameters of the OpenAI API this server does not implement: refused unless given their neutral value.
UNSUPPORTED = {"suffix": None, "best_of": 1, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
               "tools": None, "tool_choice": None, "functions": None, "function_call": None, "response_format": None,
               "parallel_tool_calls": None, "audio": None, "modalities": None, "prediction": None}
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
          "top_k", "min_p", "repetition_penalty", "logprobs"}
KNOWN = {"completions": COMMON | {"prompt", "echo"},
         "chat": COMMON | {"messages", "top_logprobs", "max_completion_tokens", "store", "metadata"}}


def check_fields(body, kind: str) -> None:
    """Refuses unsupported and unknown parameters of a "completions" or "chat" request."""
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in (None, neutral, {}, []):
            raise BadRequest(f"{name} is not supported by this server", name, code="unsupported_parameter")
    unknown = sorted(set(body) - KNOWN[kind] - set(UNSUPPORTED))
    if unknown:
        raise BadRequest(f"unknown parameter: {unknown[0]}", unknown[0], code="unknown_parameter")


def sampling_fields(body) -> dict:
    """The sampling settings of a request, as engine.Request fields (top_k -1 and 0 both mean off)."""
    top_k = integer(body, "top_k", 0, -1)
    return {"temperature": number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            "top_k": 0 if top_k == -1 else top_k,
            "min_p": number(body, "min_p", 0.0, 0.0, 1.0),
            "repetition_penalty": number(body, "repetition_penalty", 1.0, 0.0, None, low_open=True),
            "seed": integer(body, "seed", None, -(1 << 63), (1 << 64) - 1),
            "stop": stop(body)}
