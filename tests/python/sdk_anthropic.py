"""Drives the gateway with the official anthropic SDK against an OpenAI-compatible
upstream (scripted by the test): messages.create with tools, messages.stream with tools and
get_final_message(), count_tokens, and an error. Usage: sdk_anthropic.py BASE_URL API_KEY MODEL"""
import sys

import anthropic

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(
    base_url=base_url,
    api_key=api_key,
    max_retries=0,
    default_headers={"anthropic-beta": "fine-grained-tool-streaming-2025-05-14"},
)
tools = [{
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]

msg = client.messages.create(
    model=model,
    max_tokens=500,
    system="Answer with tools.",
    messages=[{"role": "user", "content": "Weather in Paris?"}],
    tools=tools,
)
assert msg.stop_reason == "tool_use", msg
kinds = [b.type for b in msg.content]
assert kinds == ["text", "tool_use"], msg
assert msg.content[0].text == "Checking.", msg
tool = msg.content[1]
assert tool.name == "get_weather" and tool.input == {"city": "Paris"}, tool
assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (20, 5, 7), msg.usage

texts = []
with client.messages.stream(
    model=model,
    max_tokens=500,
    messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": tool.id, "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "21 degrees"}]},
    ],
    tools=tools,
) as stream:
    for text in stream.text_stream:
        texts.append(text)
    final = stream.get_final_message()
assert "".join(texts) == "Let me check.", texts
assert [b.type for b in final.content] == ["text", "tool_use"], final
assert final.content[1].input == {"city": "Paris"}, final
assert final.stop_reason == "tool_use", final
assert final.usage.output_tokens == 7, final.usage

count = client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "How many tokens is this?"}])
assert count.input_tokens > 0, count

try:
    client.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body

print("anthropic sdk ok")
