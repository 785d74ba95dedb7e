"""The OpenAI SDK uploads a prompt larger than the gateway's max_body_size: it must get the
413 (APIStatusError), not a broken pipe that it would retry. Usage: sdk_large_body.py BASE KEY"""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=2, timeout=30)
try:
    client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "x" * (12 << 20)}]
    )
except openai.APIStatusError as e:
    print(f"status {e.status_code}")
except openai.APIConnectionError as e:
    print(f"connection error: {e!r}")
