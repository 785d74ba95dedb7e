"""Streams through the gateway for DURATION seconds, C at a time: most run to their end,
every third is abandoned after its first event (the client leaves mid-stream).
Prints how many completed, were abandoned and failed.
Usage: soak_streams.py HOST PORT KEY DURATION CONCURRENCY"""
import asyncio
import json
import sys
import time


async def one(host, port, request, abandon):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        seen = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 30)
            if not chunk:
                return "failed"
            seen += chunk
            if abandon and b"data:" in seen:
                return "abandoned"
            if b"data: [DONE]" in seen:
                return "completed" if seen.startswith(b"HTTP/1.1 200") else "failed"
    except (OSError, asyncio.TimeoutError):
        return "failed"
    finally:
        writer.close()


async def worker(host, port, request, deadline, counts, n):
    i = n
    while time.monotonic() < deadline:
        i += 1
        result = await one(host, port, request, abandon=(i % 3 == 0))
        counts[result] = counts.get(result, 0) + 1


async def main():
    host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    duration, concurrency = float(sys.argv[4]), int(sys.argv[5])
    body = json.dumps({"model": "bench", "stream": True,
                       "messages": [{"role": "user", "content": "stream please"}]}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    counts = {}
    deadline = time.monotonic() + duration
    await asyncio.gather(*(worker(host, port, request, deadline, counts, n) for n in range(concurrency)))
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))


asyncio.run(main())
