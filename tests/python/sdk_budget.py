"""The openai Python SDK against a key whose budget is spent: the 402 surfaces as an
error the SDK does not retry (default max_retries=2). Usage: sdk_budget.py BASE_URL KEY"""
import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key)  # the SDK's default retries

try:
    client.chat.completions.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected a 402")
except openai.APIStatusError as e:
    assert e.status_code == 402, e.status_code
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body)
    assert err["code"] == "budget_exceeded", body
    assert err["type"] == "insufficient_quota", body
print("sdk budget ok")
