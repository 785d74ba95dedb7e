"""A client set up the way LiteLLM's documentation sets one up: the openai SDK with the
proxy's root as its base URL (no /v1) and a LiteLLM virtual key. Usage:
sdk_litellm_client.py BASE_URL API_KEY MODEL"""
import sys

import openai

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}])
assert chat.choices[0].message.content.endswith("You said: ping"), chat

pieces = []
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "stream me"}], stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
assert "".join(pieces).endswith("You said: stream me"), pieces

assert model in [m.id for m in client.models.list()]
print("litellm client ok")
