"""A component that exercises the SDK inside WebAssembly, for
tests/test_sdk_component.py: bodies larger than one read or write,
concurrent outbound calls in an async handler, timeouts, errors and what
they become, stdlib logging, metrics with labels and buckets."""

import asyncio
import logging
import time

import berth
from berth import Request, Response, config, http
from berth.metrics import Gauge, Histogram

BODY_BYTES = Histogram("body_bytes", buckets=[10, 1000, 100000])
DEPTH = Gauge("depth")
berth.log.install()
LOGGER = logging.getLogger("component")


async def fan_out(upstream: str) -> Response:
    started = time.monotonic()
    a, b, _ = await asyncio.gather(
        http.get_async(f"{upstream}/slow?d=0.3"),
        http.get_async(f"{upstream}/slow?d=0.3"),
        asyncio.sleep(0.1),
    )
    elapsed = time.monotonic() - started
    try:
        await asyncio.wait_for(http.get_async(f"{upstream}/slow?d=3"), timeout=0.2)
        timed_out = False
    except asyncio.TimeoutError:
        timed_out = True
    return Response.json(
        {"a": a.text_body(), "b": b.text_body(), "elapsed": elapsed, "timed_out": timed_out}
    )


def handle(request: Request) -> Response:
    upstream = config.get_or("upstream", "")
    match request.segments[1:]:
        case ["echo"]:
            BODY_BYTES.observe(len(request.body))
            headers = {
                "content-type": request.headers.get("content-type", "application/octet-stream")
            }
            headers["connection"] = "close"  # forbidden: dropped with a warning
            return Response(request.body, headers=headers)
        case ["fan-out"]:
            return fan_out(upstream)
        case ["json"]:
            return Response.json(request.json())
        case ["raise"]:
            raise RuntimeError("kaboom")
        case ["config"]:
            DEPTH.set(2.5, labels={"queue": "a"})
            return Response.json(dict(config.get_all()))
        case ["stdlib-logging"]:
            LOGGER.warning("via stdlib %s", "logging")
            return Response.text("ok")
        case ["post"]:
            answer = http.post(f"{upstream}/echo", body=b"x" * 300_000, headers={"x-test": "1"})
            return Response.json(
                {
                    "status": answer.status,
                    "length": len(answer.body),
                    "seen": answer.headers.get("x-seen"),
                }
            )
        case ["fetch"]:
            return Response.json({"status": http.get(request.query["url"]).status})
    return Response.not_found()


IncomingHandler = berth.serve(handle)
