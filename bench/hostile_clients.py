"""The fault scenarios' hostile and unlucky clients: keep-alive connections left idle across a change,
slowloris and slow POSTs, oversized uploads, and POSTers with unique ids that count double executions.

Each speaks HTTP/1.1 on its own socket or ``http.client`` connection, so what it sees is what a real client
would: an error on a connection that looked open, an early 413, a server that closes first.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import http.client
import select
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

POST_CLIENTS = 4  # concurrent POSTers in kill-replica (each POST stays in flight bench.handlers.POST_S)
SLOWLORIS = 200  # connections sending their headers one byte at a time
SLOWLORIS_BYTE_EVERY_S = 0.5
SLOW_POSTS = 20  # connections sending a 1 MiB body at ~10 KiB/s
SLOW_POST_BYTES = 1 << 20
SLOW_POST_PIECE, SLOW_POST_EVERY_S = 1024, 0.1  # 1 KiB per 0.1 s = 10 KiB/s
BIG_BODY = 100 << 20  # declared by the Content-Length uploads: over any sane limit
BIG_CHUNKED_BODY = (64 << 20) + 1  # chunked uploads: one byte over the replica's current hard cap (64 MiB)
BIG_UPLOADS, BIG_CHUNKED_UPLOADS, UPLOAD_PARALLEL = 20, 5, 5
UPLOAD_PIECE = 64 << 10


def split_url(url: str) -> tuple[str, int, str]:
    """``http://host:port/path`` -> (host, port, "/path")."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port), "/" + path


def get_answer(conn: http.client.HTTPConnection, path: str) -> str:
    """GET ``path`` on ``conn``: the 2xx status, the error's type, or a non-2xx with who sent it."""
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    if 200 <= resp.status < 300:
        return str(resp.status)
    # who answered an error tells its cause apart: the proxy's own page, or the replica's
    return f"{resp.status} {resp.getheader('Server', '')} {body[:60].decode(errors='replace').strip()!r}"


def get_after_idle(conn: http.client.HTTPConnection, path: str) -> str:
    """The second request on an idle keep-alive connection. One the server closed while it sat idle (FIN
    already here) is told apart: every HTTP client expects that and reconnects; an error on a connection
    that looked open, or a non-2xx, is what a client can't tell from a failed request."""
    sock = conn.sock
    if sock is not None and select.select([sock], [], [], 0)[0]:
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                return "closed while idle"
        except OSError:
            return "closed while idle"
    return get_answer(conn, path)


async def slowloris_and_slow_posts(host: str, port: int, path: str, until: float) -> tuple[list, list]:
    """``SLOWLORIS`` connections trickling their headers and ``SLOW_POSTS`` trickling a body, until ``until``
    (monotonic): each one's (what happened, seconds), the slowloris ones first."""
    head = f"GET {path} HTTP/1.1\r\nHost: bench\r\nX-Slow: ".encode()
    post_head = (f"POST {path}/upload HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Length: {SLOW_POST_BYTES}\r\n\r\n").encode()
    loris = [_trickle(host, port, head, b"a", SLOWLORIS_BYTE_EVERY_S, until) for _ in range(SLOWLORIS)]
    posts = [_trickle(host, port, post_head, b"x" * SLOW_POST_PIECE, SLOW_POST_EVERY_S, until,
                      limit=len(post_head) + SLOW_POST_BYTES) for _ in range(SLOW_POSTS)]
    res = await asyncio.gather(*loris, *posts)
    return res[:SLOWLORIS], res[SLOWLORIS:]


async def _trickle(host: str, port: int, head: bytes, piece: bytes, every: float, until: float,
                   limit: int | None = None) -> tuple[str, float]:
    """Send ``head``, then ``piece`` every ``every`` s until the server answers or closes, ``limit`` bytes
    are sent, or time is up; returns (what happened, seconds after connecting)."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return f"connect {type(exc).__name__}", 0.0
    answer = asyncio.ensure_future(reader.read(200))
    sent, data = 0, head
    what = "still open at the end"
    try:
        while time.monotonic() < until and not answer.done():
            if limit is None or sent < limit:
                writer.write(data)
                await writer.drain()
                sent += len(data)
                data = piece
            await asyncio.wait([answer], timeout=every)
    except OSError as exc:
        what = f"send {type(exc).__name__}"
    if answer.done():
        try:
            got = answer.result()
            what = got.split(b"\r\n", 1)[0].decode(errors="replace") if got else "closed without an answer"
        except OSError as exc:
            what = f"read {type(exc).__name__}"
    else:
        answer.cancel()
    writer.close()
    return what, time.monotonic() - t0


def trickle_summary(results: list[tuple[str, float]]) -> str:
    by: dict[str, list[float]] = collections.defaultdict(list)
    for what, secs in results:
        by[what].append(secs)
    return "; ".join(f"{len(ts)} {what}" + ("" if what == "still open at the end" else f" after ~{statistics.median(ts):.1f} s")
                     for what, ts in sorted(by.items(), key=lambda kv: -len(kv[1])))


def oversized_uploads(host: str, port: int, path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``BIG_UPLOADS`` POSTs declaring ``BIG_BODY`` and ``BIG_CHUNKED_UPLOADS`` chunked ones of ``BIG_CHUNKED_BODY``,
    ``UPLOAD_PARALLEL`` at a time: (the Content-Length ones' results, the chunked ones')."""
    jobs = [(BIG_BODY, False)] * BIG_UPLOADS + [(BIG_CHUNKED_BODY, True)] * BIG_CHUNKED_UPLOADS
    with concurrent.futures.ThreadPoolExecutor(UPLOAD_PARALLEL) as pool:
        results = list(pool.map(lambda job: upload(host, port, path, *job), jobs))
    return results[:BIG_UPLOADS], results[BIG_UPLOADS:]


def upload(host: str, port: int, path: str, size: int, chunked: bool) -> dict[str, Any]:
    """One big POST; stops sending as soon as the server answers (a 413 before the body is read) or stalls."""
    t0 = time.monotonic()
    sent, status = 0, ""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    piece = b"x" * UPLOAD_PIECE
    try:
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
                      f"{framing}\r\n\r\n".encode())
            try:
                while sent < size:
                    readable, writable, _ = select.select([s], [s], [], 10)
                    if readable or not writable:
                        break  # answered early, or stalled for 10 s: read whatever it says
                    n = min(UPLOAD_PIECE, size - sent)
                    s.sendall(f"{n:x}\r\n".encode() + piece[:n] + b"\r\n" if chunked else piece[:n])
                    sent += n
                if chunked and sent == size:
                    s.sendall(b"0\r\n\r\n")
            except OSError as exc:  # the server answered and closed while we sent: its answer may be here
                status = f"send {type(exc).__name__}"
            line = s.makefile("rb").readline(200)
            if len(line.split()) > 1:
                status = line.split()[1].decode()
            status = status or "closed without an answer"
    except OSError as exc:
        status = f"{status + ', ' if status else ''}read {type(exc).__name__}"
    return {"status": status, "answer_s": round(time.monotonic() - t0, 2), "sent_mib": round(sent / 2**20, 1)}


def upload_summary(results: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict]] = collections.defaultdict(list)
    for r in results:
        by[str(r["status"])].append(r)
    return "; ".join(f"{what} x{len(rs)} in ~{statistics.median(r['answer_s'] for r in rs):.2f} s after "
                     f"~{statistics.median(r['sent_mib'] for r in rs):.0f} MiB sent" for what, rs in by.items())


class PostClients:
    """``POST_CLIENTS`` threads, each POSTing one unique id after the other on a keep-alive connection
    (reconnecting after an error), to count failures and double executions around a replica kill."""

    def __init__(self, url: str, prefix: str):
        self.host, self.port, self.path = split_url(url)
        self.prefix = prefix
        self.results: dict[str, str] = {}  # id -> status or error type
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(POST_CLIENTS)]

    def __enter__(self) -> "PostClients":
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for th in self._threads:
            th.join()

    def _run(self, worker: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        seq = 0
        while not self._stop.is_set():
            request_id = f"{self.prefix}-{worker}-{seq}"
            seq += 1
            try:
                conn.request("POST", f"{self.path}?id={request_id}", body=b"x")
                resp = conn.getresponse()
                resp.read()
                self.results[request_id] = str(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                self.results[request_id] = type(exc).__name__
                conn.close()  # http.client reconnects on the next request

    def verdict(self, record_dir: Path) -> dict[str, Any]:
        """Join what the clients saw with what the replicas recorded."""
        runs: collections.Counter = collections.Counter()
        for log in record_dir.glob("*.log"):
            runs.update(line for line in log.read_text().splitlines() if line.startswith(self.prefix + "-"))
        failed = {i: r for i, r in self.results.items() if not r.startswith("2")}
        return {"sent": len(self.results), "failed": len(failed),
                "failed_kinds": dict(collections.Counter(failed.values())),
                "twice": sum(1 for i in self.results if runs[i] > 1),
                "failed_but_ran": sum(1 for i in failed if runs[i] == 1),
                "ok_but_never_ran": sum(1 for i, r in self.results.items() if r.startswith("2") and runs[i] == 0)}
