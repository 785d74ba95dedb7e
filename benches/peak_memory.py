"""Memory after a peak: opens N client connections that send half a request header,
holds them until the gateway has them all, closes them, and reports the gateway's RSS
before, at the peak and after. Usage: peak_memory.py PID HOST PORT N"""
import socket
import sys
import time


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid):
    import os
    return len(os.listdir(f"/proc/{pid}/fd"))


pid, host, port, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
before, fds0 = rss_kib(pid), fds(pid)
conns = []
for _ in range(n):
    s = socket.create_connection((host, port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    conns.append(s)
deadline = time.time() + 30
while fds(pid) < fds0 + n and time.time() < deadline:
    time.sleep(0.1)
peak = rss_kib(pid)
for s in conns:
    s.close()
deadline = time.time() + 30
while fds(pid) > fds0 + 2 and time.time() < deadline:
    time.sleep(0.1)
time.sleep(2)
after = rss_kib(pid)
print(f"connections={n} rss_before_kib={before} rss_peak_kib={peak} rss_after_kib={after} "
      f"per_connection_kib={(peak - before) / n:.1f} kept_kib={after - before}")
