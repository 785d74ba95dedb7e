"""Opens N SSE streams through a proxy, waits until each got its first event, reports,
then holds them open until stdin closes. Usage: hold_streams.py N HOST PORT PATH BODY [HEADER...]"""
import asyncio
import sys


async def one(host, port, request, ready, hold):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    seen = b""
    while b"data:" not in seen:
        chunk = await reader.read(4096)
        if not chunk:
            raise RuntimeError("stream closed before its first event: " + seen[:200].decode(errors="replace"))
        seen += chunk
    ready.append(1)
    await hold.wait()
    writer.close()


async def main():
    n, host, port, path, body = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].encode()
    headers = "".join(h + "\r\n" for h in sys.argv[6:])
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    ).encode() + body
    ready, hold = [], asyncio.Event()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(host, port, request, ready, hold)))
        if i % 250 == 249:
            await asyncio.sleep(0.05)
    while len(ready) < n:
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            raise failed[0].exception()
        await asyncio.sleep(0.1)
    print(f"open {n}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    hold.set()
    await asyncio.gather(*tasks, return_exceptions=True)


asyncio.run(main())
