"""Drives the gateway with the official openai SDK against an upstream of another format
(Anthropic or Gemini, scripted by the test): tools with an image, a streamed tool call with
usage, and a plain stream. Usage: sdk_translated_openai.py BASE_URL API_KEY MODEL"""
import json
import sys

import openai

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="

chat = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "Answer with tools."},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather where this photo was taken?"},
            {"type": "image_url", "image_url": {"url": image}},
        ]},
    ],
    tools=tools,
    max_tokens=300,
)
choice = chat.choices[0]
assert choice.finish_reason == "tool_calls", chat
call = choice.message.tool_calls[0]
assert call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"city": "Paris"}, call
assert choice.message.content == "Checking.", chat
assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (25, 7), chat.usage

calls = {}
text = []
usage = None
finishes = []
for chunk in client.chat.completions.create(
    model=model,
    messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function",
            "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "{\"temp\": 21}"},
    ],
    tools=tools,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            text.append(c.delta.content)
        for tc in c.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
            if tc.id:
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                entry["args"] += tc.function.arguments
        if c.finish_reason:
            finishes.append(c.finish_reason)
assert "".join(text) == "Let me check.", text
assert len(calls) == 1 and calls[0]["name"] == "get_weather", calls
assert json.loads(calls[0]["args"]) == {"city": "Paris"}, calls
assert finishes == ["tool_calls"], finishes
assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (25, 7), usage

pieces = []
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "stream me"}], stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
assert "".join(pieces).endswith("You said: stream me"), pieces
assert len(pieces) > 3, pieces

print("translated sdk ok")
