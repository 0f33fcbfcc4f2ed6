"""The handler wrapper without Ray: loading, concurrency rules, result conversion, errors."""
from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import threading
import time

import pytest

from rayfleet.waiting import eventually_async
from rayfleet_runtime import Response
from rayfleet_runtime.replica.admission import Limiter
from rayfleet_runtime.replica.handler import HandlerLoadError, HandlerRunner, PayloadTooLarge, Request, load_handler, to_http


@pytest.fixture
def handler_module(tmp_path, monkeypatch):
    """Write a module into a temp dir on sys.path; returns a function (name, source) -> name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(name, None)
        return name

    yield write


def req(path: str = "/", body: bytes = b"", method: str = "GET") -> Request:
    return Request(method, path, {"q": "1"}, {"X-A": "b"}, body)


def run(coro):
    return asyncio.run(coro)


def test_class_is_instantiated_once_with_handler_args(handler_module):
    mod = handler_module("h_class", """
        class H:
            instances = 0
            def __init__(self, greeting):
                H.instances += 1
                self.greeting = greeting
            async def __call__(self, request):
                return f"{self.greeting} {request.path}"
    """)
    h = load_handler(f"{mod}:H", {"greeting": "hi"})
    runner = HandlerRunner(h)
    assert runner.is_async
    assert run(runner.handle(req("/a/b")))[2] == b"hi /a/b"
    assert run(runner.handle(req("/c")))[2] == b"hi /c"
    assert type(h).instances == 1


def test_function_handler_called_directly(handler_module):
    mod = handler_module("h_func", """
        def handle(request):
            return {"method": request.method, "q": request.query["q"], "body": request.json()}
    """)
    runner = HandlerRunner(load_handler(f"{mod}:handle"))
    assert not runner.is_async
    status, headers, body = run(runner.handle(req("/", b'{"x": 1}', "POST")))
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"method": "POST", "q": "1", "body": {"x": 1}}


def test_handler_args_for_function_is_init_error(handler_module):
    mod = handler_module("h_func2", "def handle(request):\n    return 'x'\n")
    with pytest.raises(HandlerLoadError) as err:
        load_handler(f"{mod}:handle", {"a": 1})
    assert err.value.reason == "HandlerInitError"


def test_import_error_names_the_module(handler_module):
    mod = handler_module("h_broken", "import rayfleet_definitely_missing_dep\n")
    with pytest.raises(HandlerLoadError) as err:
        load_handler(f"{mod}:handle")
    assert err.value.reason == "HandlerImportError"
    assert err.value.message.startswith("h_broken: ModuleNotFoundError:")
    assert "rayfleet_definitely_missing_dep" in err.value.message
    assert "Traceback" in err.value.traceback


def test_missing_module_and_attribute(handler_module):
    with pytest.raises(HandlerLoadError) as err:
        load_handler("rayfleet_no_such_module_xyz:H")
    assert err.value.reason == "HandlerImportError" and "rayfleet_no_such_module_xyz" in err.value.message
    mod = handler_module("h_noattr", "X = 1\n")
    with pytest.raises(HandlerLoadError) as err:
        load_handler(f"{mod}:Missing")
    assert err.value.reason == "HandlerImportError" and err.value.message.startswith("h_noattr: AttributeError")
    with pytest.raises(HandlerLoadError):
        load_handler("no_colon_here")


def test_constructor_error_is_init_error(handler_module):
    mod = handler_module("h_init", """
        class H:
            def __init__(self):
                raise RuntimeError("no model file")
            def __call__(self, request):
                return "x"
    """)
    with pytest.raises(HandlerLoadError) as err:
        load_handler(f"{mod}:H")
    assert err.value.reason == "HandlerInitError"
    assert err.value.message == "h_init: RuntimeError: no model file"


def test_return_types():
    assert to_http("hé") == (200, {"Content-Type": "text/plain; charset=utf-8"}, "hé".encode())
    assert to_http(b"\x00") == (200, {"Content-Type": "application/octet-stream"}, b"\x00")
    assert to_http([1, 2]) == (200, {"Content-Type": "application/json"}, b"[1, 2]")
    assert to_http(None)[2] == b"null"
    status, headers, body = to_http(Response({"a": 1}, status=201, headers={"X-Y": "z"}))
    assert status == 201 and headers == {"X-Y": "z", "Content-Type": "application/json"} and body == b'{"a": 1}'
    status, headers, _ = to_http(Response("<p>", content_type="text/html"))
    assert headers["Content-Type"] == "text/html"
    assert to_http(Response(b"x", headers={"content-type": "image/png"}))[1] == {"content-type": "image/png"}


def test_exception_gives_500_with_type_and_runner_keeps_serving():
    async def handler(request):
        if request.path == "/boom":
            raise ValueError("secret detail")
        return "ok"

    runner = HandlerRunner(handler, debug_tracebacks=False)

    async def main():
        status, _, body = await runner.handle(req("/boom"))
        assert status == 500 and b"ValueError" in body
        assert b"secret detail" not in body and b"Traceback" not in body
        assert await runner.handle(req("/")) == (200, {"Content-Type": "text/plain; charset=utf-8"}, b"ok")

    run(main())
    assert runner.errors == 1 and runner.last_error == "ValueError: secret detail" and runner.total_requests == 2


def test_malformed_json_body_is_the_clients_400_not_a_handler_error():
    async def handler(request):
        return {"got": request.json()}

    runner = HandlerRunner(handler)
    status, _, body = run(runner.handle(req("/", body=b'{"a": ')))
    assert status == 400 and body.startswith(b"400 Bad Request: request body is not valid JSON")
    status, _, body = run(runner.handle(req("/", body=b"\xff")))  # not even UTF-8
    assert status == 400
    assert run(runner.handle(req("/", body=b'{"a": 1}')))[2] == b'{"got": {"a": 1}}'
    assert runner.errors == 0 and runner.last_error is None


def test_unserialisable_return_is_500():
    runner = HandlerRunner(lambda request: object())
    assert run(runner.handle(req()))[0] == 500


def test_async_handlers_run_concurrently_up_to_max_concurrency():
    active, peak, ended, ended_before_start = 0, 0, 0, []

    async def handler(request):
        nonlocal active, peak, ended
        active += 1
        peak = max(peak, active)
        ended_before_start.append(ended)
        await asyncio.sleep(0.2)
        active -= 1
        ended += 1
        return "ok"

    runner = HandlerRunner(handler, max_concurrency=3, max_queued=10)

    async def main():
        return await asyncio.gather(*(runner.handle(req()) for _ in range(6)))

    results = run(main())
    assert all(r[0] == 200 for r in results)
    assert peak == 3  # three at once, never more
    assert ended_before_start[:3] == [0, 0, 0] and all(n >= 1 for n in ended_before_start[3:])  # two waves


def test_overload_is_503_at_once():
    async def handler(request):
        await asyncio.sleep(0.5)
        return "ok"

    runner = HandlerRunner(handler, max_concurrency=2, max_queued=1)

    async def main():
        tasks = [asyncio.ensure_future(runner.handle(req())) for _ in range(3)]
        await eventually_async(lambda: (runner.in_flight, runner.queued) == (2, 1),  # the queue is full
                               what="two running, one queued")
        status, headers, _ = await runner.handle(req())
        assert status == 503 and headers["Retry-After"] == "1"
        assert (runner.in_flight, runner.queued) == (2, 1)  # answered without waiting for a slot to free
        assert [r[0] for r in await asyncio.gather(*tasks)] == [200, 200, 200]

    run(main())
    assert runner.rejected == 1


def test_sync_handler_runs_one_at_a_time_off_the_event_loop():
    active, peak = 0, 0
    lock = threading.Lock()
    threads = set()

    def handler(request):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        threads.add(threading.get_ident())
        time.sleep(0.1)
        with lock:
            active -= 1
        return "ok"

    runner = HandlerRunner(handler, max_concurrency=10)

    async def main():
        ticks = 0

        async def ticker():  # the loop stays responsive while the handler blocks
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick = asyncio.ensure_future(ticker())
        t = time.monotonic()
        results = await asyncio.gather(*(runner.handle(req()) for _ in range(4)))
        elapsed = time.monotonic() - t
        tick.cancel()
        return elapsed, results, ticks

    elapsed, results, ticks = run(main())
    assert all(r[0] == 200 for r in results)
    assert peak == 1 and elapsed >= 0.4
    assert threading.get_ident() not in threads
    assert ticks > 10


def test_sync_threads_opt_in_pool():
    def handler(request):
        time.sleep(0.2)
        return "ok"

    runner = HandlerRunner(handler, max_concurrency=10, sync_threads=4)

    async def main():
        t = time.monotonic()
        await asyncio.gather(*(runner.handle(req()) for _ in range(4)))
        return time.monotonic() - t

    assert run(main()) < 0.6


def test_check_health_sync_async_and_false():
    class H:
        def __init__(self, ok):
            self.ok = ok

        def __call__(self, request):
            return "x"

        def check_health(self):
            return self.ok

    class A:
        async def __call__(self, request):
            return "x"

        async def check_health(self):
            raise RuntimeError("db down")

    run(HandlerRunner(H(True)).check_health())
    with pytest.raises(RuntimeError, match="returned False"):
        run(HandlerRunner(H(False)).check_health())
    with pytest.raises(RuntimeError, match="db down"):
        run(HandlerRunner(A()).check_health())
    run(HandlerRunner(lambda r: "x").check_health())  # no check_health: healthy


def test_sync_check_health_is_not_queued_behind_user_to_thread_work():
    class H:
        async def __call__(self, request):
            return "x"

        def check_health(self):
            return True

    async def main():
        import concurrent.futures

        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        started, release = threading.Event(), threading.Event()

        def block():  # the handler's own blocking work, holding the default executor's one thread
            started.set()
            release.wait(10)

        busy = asyncio.ensure_future(asyncio.to_thread(block))
        while not started.is_set():
            await asyncio.sleep(0.001)
        try:
            await asyncio.wait_for(HandlerRunner(H()).check_health(), 2)
        finally:
            release.set()
            await busy

    run(main())


def test_limiter_cancelled_waiter_frees_its_place():
    async def main():
        lim = Limiter(1, 2)
        assert await lim.acquire()
        waiter = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(0)
        assert lim.queued == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert lim.queued == 0
        lim.release()
        assert lim.in_flight == 0

    run(main())


def test_a_sync_handlers_queue_is_bounded_and_visible():
    """Past its threads and a small queue a sync handler answers 503 at once, not 504 a minute later."""
    release = threading.Event()

    def handler(request):
        release.wait(5)
        return "ok"

    runner = HandlerRunner(handler, max_concurrency=100, sync_threads=1, max_queued=2)

    async def main():
        tasks = [asyncio.ensure_future(runner.handle(req())) for _ in range(3)]
        await eventually_async(lambda: (runner.in_flight, runner.queued) == (1, 2),  # one busy, two waiting
                               what="one running, two queued")
        status, headers, _ = await runner.handle(req())
        assert status == 503 and headers["Retry-After"] == "1"
        release.set()
        assert [r[0] for r in await asyncio.gather(*tasks)] == [200, 200, 200]

    run(main())


def test_a_request_is_read_only_once_admitted():
    async def handler(request):
        await asyncio.sleep(0.3)
        return request.body

    runner = HandlerRunner(handler, max_concurrency=1, max_queued=0)
    reads = []

    async def reader():
        reads.append(1)
        return req(body=b"payload")

    async def main():
        first = asyncio.ensure_future(runner.handle(reader))
        await eventually_async(lambda: runner.in_flight == 1, what="the request to be admitted")
        assert (await runner.handle(reader))[0] == 503  # refused without reading its body
        assert len(reads) == 1
        assert await first == (200, {"Content-Type": "application/octet-stream"}, b"payload")

    run(main())


def test_a_body_over_the_limit_is_413_not_a_handler_error():
    async def handler(request):
        raise AssertionError("never called")

    async def reader():
        raise PayloadTooLarge.over(10)

    runner = HandlerRunner(handler)
    status, _, body = run(runner.handle(reader))
    assert status == 413 and b"maxRequestBodyBytes" in body
    assert runner.in_flight == 0 and runner.last_error is None and runner.errors == 0


def test_a_disconnected_clients_async_handler_is_cancelled():
    seen = []

    async def handler(request):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    runner = HandlerRunner(handler)

    async def main():
        task = asyncio.ensure_future(runner.handle(req()))
        await eventually_async(lambda: runner.in_flight == 1, what="the request to be admitted")
        task.cancel()  # what aiohttp does when the connection is lost
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert seen == ["cancelled"] and runner.cancelled == 1 and runner.in_flight == 0


def test_a_cancelled_sync_handler_keeps_its_thread_slot_until_it_returns():
    release, started = threading.Event(), threading.Event()

    def handler(request):
        started.set()
        release.wait(5)
        return "ok"

    runner = HandlerRunner(handler, sync_threads=1, max_queued=0)

    async def main():
        task = asyncio.ensure_future(runner.handle(req()))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        assert runner.in_flight == 1  # its thread still runs: no second request may start beside it
        assert (await runner.handle(req()))[0] == 503
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.in_flight == 0

    run(main())


def test_an_async_generator_handler_is_async_and_streams_concurrently():
    between = 0  # streams past their first chunk and not at their second yet
    seen_between = []

    async def handler(request):  # the natural way to write a stream: the handler itself yields
        nonlocal between
        yield "a"
        between += 1
        seen_between.append(between)
        await asyncio.sleep(0.2)
        between -= 1
        yield b"b"

    runner = HandlerRunner(handler, max_concurrency=10, sync_threads=1)
    assert runner.is_async and runner.limiter.limit == 10  # not a sync handler run one at a time

    async def consume():
        status, headers, stream = await runner.handle(req())
        try:
            return status, headers["Content-Type"], b"".join([chunk async for chunk in stream])
        finally:
            await stream.aclose()

    async def main():
        return await asyncio.gather(*(consume() for _ in range(3)))

    results = run(main())
    assert results == [(200, "text/plain; charset=utf-8", b"ab")] * 3
    assert max(seen_between) == 3 and runner.in_flight == 0  # three streams at once, every slot given back


def test_a_stream_yielding_something_else_than_text_or_bytes_is_a_counted_handler_error():
    async def handler(request):
        yield "fine"
        yield 5  # bytes(5) would be five NULs

    runner = HandlerRunner(handler)

    async def main():
        _, _, stream = await runner.handle(req())
        chunks = []
        with pytest.raises(TypeError):
            async for chunk in stream:
                chunks.append(chunk)
        await stream.aclose()
        return chunks

    assert run(main()) == [b"fine"]
    assert runner.errors == 1 and "TypeError" in runner.last_error and runner.cancelled == 0 and runner.in_flight == 0


def test_an_autoscaled_replica_queues_what_an_overlapping_reload_sends():
    from rayfleet_api.desired import Autoscaling, DesiredState
    from rayfleet_runtime.replica.admission import replica_max_queued

    fixed = DesiredState(handler="a:b", max_concurrency=10)
    assert replica_max_queued(fixed) == 10  # min(maxConcurrency, 16), as before
    scaled = DesiredState(handler="a:b", max_concurrency=10, autoscaling=Autoscaling(max_replicas=4))
    assert replica_max_queued(scaled) == 20
