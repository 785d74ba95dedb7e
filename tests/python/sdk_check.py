"""Drives the gateway with the official openai Python SDK: chat, streaming, embeddings,
the model list and an error. Usage: sdk_check.py BASE_URL API_KEY"""
import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "ping"}])
assert chat.choices[0].message.content.endswith("You said: ping"), chat
assert chat.usage.total_tokens > 0, chat

pieces = []
for chunk in client.chat.completions.create(
    model="demo", messages=[{"role": "user", "content": "stream me"}], stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
assert "".join(pieces).endswith("You said: stream me"), pieces
assert len(pieces) > 3, pieces

emb = client.embeddings.create(model="demo", input=["a", "b"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0, emb

models = [m.id for m in client.models.list()]
assert models == ["demo"], models

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
try:
    bad.models.list()
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError:
    pass

print("sdk ok")
