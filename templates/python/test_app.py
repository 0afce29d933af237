"""Unit tests of app.py, on your machine: `python -m unittest`.

berth.testing.FakeHost stands in for the host: it serves config from a
dict, records log lines and metrics, and answers outbound calls with the
responses (or errors) a test gives it.
"""

import pathlib
import sys
import unittest

# The SDK is vendored rather than installed: let `import berth` find it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "vendor" / "berth-sdk"))

import berth  # noqa: E402
from berth.testing import FakeHost  # noqa: E402

import app  # noqa: E402

UPSTREAM = "https://upstream.test/"


class AppTest(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost(config={"greeting": "Hi", "upstream_url": UPSTREAM}).install()
        self.addCleanup(self.host.uninstall)

    def get(self, path: str) -> berth.Response:
        return app.handle(berth.Request("GET", app.ROUTE + path))

    def test_greets_by_name_with_the_configured_greeting(self):
        response = self.get("?name=Ada")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(response.json_body(), {"message": "Hi, Ada!"})
        self.assertEqual(self.host.log_messages("info"), ["greeted Ada"])
        self.assertEqual(self.host.counter("greetings"), 1)

    def test_greets_the_world_with_hello_by_default(self):
        self.host.config.clear()
        self.assertEqual(self.get("").json_body(), {"message": "Hello, world!"})

    def test_upstream_answer_is_wrapped(self):
        self.host.on_fetch(UPSTREAM, berth.Response.text("pong", status=201))
        response = self.get("/upstream")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json_body(), {"status": 201, "body": "pong"})
        self.assertEqual([r.url for r in self.host.requests], [UPSTREAM])

    def test_upstream_failure_is_a_502(self):
        self.host.on_fetch(UPSTREAM, berth.http.UpstreamError(UPSTREAM, "connection refused"))
        response = self.get("/upstream")
        self.assertEqual(response.status, 502)
        self.assertEqual(
            response.json_body(),
            {"error": f"outbound request to {UPSTREAM} failed: connection refused"},
        )

    def test_upstream_not_allowed_is_a_502(self):
        # The FakeHost refuses a URL it has no answer for, as the host
        # refuses one outside allowed_outbound_hosts.
        response = self.get("/upstream")
        self.assertEqual(response.status, 502)
        self.assertIn("allowed_outbound_hosts", response.json_body()["error"])

    def test_upstream_unset_is_a_503(self):
        del self.host.config["upstream_url"]
        response = self.get("/upstream")
        self.assertEqual(
            (response.status, response.json_body()), (503, {"error": "upstream_url is not set"})
        )

    def test_other_paths_are_not_found(self):
        response = self.get("/nope")
        self.assertEqual((response.status, response.json_body()), (404, {"error": "not found"}))


if __name__ == "__main__":
    unittest.main()
