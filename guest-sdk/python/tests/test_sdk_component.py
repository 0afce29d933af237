"""The SDK inside WebAssembly: builds tests/component/app.py with
componentize-py, serves it with the berth binary, and checks over HTTP what
only a real host shows (the wasi:http plumbing, the async loop, logs with
request ids, metrics, the outbound policy).

Skipped unless componentize-py (on PATH, beside this Python, or named by
$COMPONENTIZE_PY) and a berth binary ($BERTH_BIN, else the repository's
target/release or target/debug build) are there. Takes about 30 s: two
builds and one compile.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

SDK = Path(__file__).resolve().parent.parent
REPO = SDK.parent.parent
WIT = REPO / "guest-sdk" / "wit"
COMPONENT = Path(__file__).resolve().parent / "component"


def componentize_py() -> str | None:
    for candidate in (
        os.environ.get("COMPONENTIZE_PY"),
        shutil.which("componentize-py"),
        str(Path(sys.executable).parent / "componentize-py"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def berth_binary() -> str | None:
    for candidate in (
        os.environ.get("BERTH_BIN"),
        str(REPO / "target" / "release" / "berth"),
        str(REPO / "target" / "debug" / "berth"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def build(tool: str, app: str, out: Path) -> subprocess.CompletedProcess[str]:
    # From copies: componentize-py writes bytecode beside what it imports,
    # and the SDK's folder is embedded into the host by host/build.rs (a
    # new file there would rebuild the host).
    src = out.parent / "src"
    if not src.exists():
        shutil.copytree(SDK / "berth", src / "berth")
        shutil.copytree(COMPONENT, src / "component")
    return subprocess.run(
        [
            tool,
            "-d",
            str(WIT),
            "-w",
            "berth:sdk/service",
            "componentize",
            app,
            "-p",
            str(src / "component"),
            "-p",
            str(src),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


class Upstream(BaseHTTPRequestHandler):
    """GET /slow?d=SECONDS answers after that long; POST /echo echoes the
    body, saying in x-seen which x-test header it got."""

    def do_GET(self) -> None:
        delay = float(parse_qs(urlsplit(self.path).query).get("d", ["0"])[0])
        time.sleep(delay)
        self.answer(200, f"slow {delay}".encode(), {})

    def do_POST(self) -> None:
        # Without content-length the request would be chunked, which this
        # server does not read: the SDK must send the length.
        body = self.rfile.read(int(self.headers["content-length"]))
        self.answer(200, body, {"x-seen": self.headers.get("x-test", "")})

    def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:
            pass  # the caller gave up (the timeout test does)

    def log_message(self, *args: object) -> None:
        pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@unittest.skipUnless(
    componentize_py() and berth_binary(), "needs componentize-py and a berth binary"
)
class ComponentTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = Path(tempfile.mkdtemp(prefix="berth-sdk-"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.tool = componentize_py()
        built = build(cls.tool, "app", cls.tmp / "sdk_test.wasm")
        if built.returncode != 0:
            raise AssertionError(f"componentize-py failed:\n{built.stdout}{built.stderr}")

        cls.upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        threading.Thread(target=cls.upstream.serve_forever, daemon=True).start()
        cls.addClassCleanup(cls.upstream.server_close)
        cls.addClassCleanup(cls.upstream.shutdown)
        up = f"http://127.0.0.1:{cls.upstream.server_address[1]}"
        cls.refused = f"http://127.0.0.1:{closed_port()}"

        cache = cls.tmp / "cache"
        cache.mkdir(mode=0o700)
        (cls.tmp / "berth.toml").write_text(
            f"""
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[runtime]
modules_dir = "{cls.tmp}"
cache_dir = "{cache}"
[shutdown]
drain_delay = "0s"
[modules.sdk]
file = "sdk_test.wasm"
route = "/sdk"
allowed_outbound_hosts = ["{up}", "{cls.refused}"]
outbound = {{ retries = 0 }}
[modules.sdk.config]
upstream = "{up}"
[modules.sdk.secrets]
token = "t0p"
"""
        )
        cls.berth = subprocess.Popen(
            [berth_binary(), "serve", "-c", str(cls.tmp / "berth.toml")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        cls.addClassCleanup(cls.stop_berth)
        cls.lines: list[str] = []
        cls.addresses: dict[str, str] = {}
        threading.Thread(target=cls.read_log, daemon=True).start()
        deadline = time.monotonic() + 180
        while not cls.ready():
            if cls.berth.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("berth did not get ready:\n" + "\n".join(cls.lines[-20:]))
            time.sleep(0.2)

    @classmethod
    def stop_berth(cls) -> None:
        cls.berth.terminate()
        try:
            cls.berth.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cls.berth.kill()
            cls.berth.wait()

    @classmethod
    def read_log(cls) -> None:
        for line in cls.berth.stdout:
            cls.lines.append(line.rstrip("\n"))
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "listening":
                cls.addresses[entry["listener"]] = entry["addr"]

    @classmethod
    def ready(cls) -> bool:
        admin = cls.addresses.get("admin")
        if admin is None or "traffic" not in cls.addresses:
            return False
        try:
            with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def request(self, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
        url = f"http://{self.addresses['traffic']}/sdk{path}"
        req = urllib.request.Request(
            url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def guest_lines(self, request_id: str) -> list[dict]:
        # Lines come from the host's stdout a moment after the response.
        deadline = time.monotonic() + 5
        while True:
            found = [
                json.loads(line)
                for line in list(self.lines)
                if f'"request_id":"{request_id}"' in line
            ]
            found = [e for e in found if e.get("target") == "guest"]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.addresses['admin']}/metrics", timeout=5) as r:
            return r.read().decode()

    def test_large_bodies_round_trip(self):
        body = os.urandom(1_000_000)
        status, headers, answer = self.request(
            "/echo", body, {"content-type": "application/x-test", "x-request-id": "echo-1"}
        )
        self.assertEqual((status, len(answer)), (200, len(body)))
        self.assertEqual(answer, body)
        self.assertEqual(headers["content-type"], "application/x-test")
        self.assertIn(
            'berth_guest_sdk_body_bytes_bucket{module="sdk",le="100000"} 0', self.metrics()
        )
        warnings = [e["message"] for e in self.guest_lines("echo-1") if e["level"] == "WARN"]
        self.assertEqual(warnings, ["response header 'connection' dropped: forbidden"])

    def test_async_calls_run_at_once_and_time_out(self):
        status, _, answer = self.request("/fan-out")
        self.assertEqual(status, 200, answer)
        result = json.loads(answer)
        self.assertEqual((result["a"], result["b"]), ("slow 0.3", "slow 0.3"))
        self.assertLess(result["elapsed"], 0.55)  # two 0.3 s calls at once
        self.assertTrue(result["timed_out"])

    def test_invalid_json_is_a_400(self):
        status, _, answer = self.request("/json", b"{oops")
        self.assertEqual(status, 400)
        self.assertIn("request body is not valid JSON", json.loads(answer)["error"])
        self.assertEqual(self.request("/json", b'{"a": [1]}')[2], b'{"a":[1]}')

    def test_an_exception_is_a_500_with_the_traceback_in_the_log(self):
        status, _, answer = self.request("/raise", headers={"x-request-id": "raise-1"})
        self.assertEqual((status, json.loads(answer)), (500, {"error": "internal error"}))
        (line,) = self.guest_lines("raise-1")
        self.assertEqual((line["level"], line["context"], line["module"]), ("ERROR", "app", "sdk"))
        self.assertIn("RuntimeError: kaboom", line["message"])

    def test_config_secrets_and_labelled_gauges(self):
        status, _, answer = self.request("/config")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(answer)["token"], "t0p")
        self.assertIn('berth_guest_sdk_depth{module="sdk",queue="a"} 2.5', self.metrics())

    def test_stdlib_logging_reaches_the_host(self):
        self.request("/stdlib-logging", headers={"x-request-id": "logging-1"})
        (line,) = self.guest_lines("logging-1")
        self.assertEqual(
            (line["level"], line["context"], line["message"]),
            ("WARN", "component", "via stdlib logging"),
        )

    def test_outbound_bodies_are_sent_with_their_length(self):
        status, _, answer = self.request("/post")
        self.assertEqual(status, 200, answer)
        self.assertEqual(json.loads(answer), {"status": 200, "length": 300_000, "seen": "1"})

    def test_outbound_failures(self):
        status, _, answer = self.request("/fetch?url=http://127.0.0.1:9/")
        self.assertEqual(status, 502)
        self.assertIn("denied by the host", json.loads(answer)["error"])
        status, _, answer = self.request(f"/fetch?url={self.refused}/")
        self.assertEqual(
            (status, json.loads(answer)["error"]),
            (502, f"outbound request to {self.refused}/ failed: connection refused"),
        )
        status, _, answer = self.request("/fetch?url=nohost")
        self.assertEqual(status, 500)
        self.assertIn("has no scheme", json.loads(answer)["error"])

    def test_host_calls_at_import_time_fail_the_build_clearly(self):
        built = build(self.tool, "import_time", self.tmp / "import_time.wasm")
        self.assertNotEqual(built.returncode, 0)
        self.assertIn("config.get('greeting') at import time", built.stdout + built.stderr)


if __name__ == "__main__":
    unittest.main()
