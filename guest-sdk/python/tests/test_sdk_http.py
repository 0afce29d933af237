"""berth.http: request checks, and outbound calls answered by a FakeHost."""

import asyncio
import unittest

import berth
from berth import Response, http
from berth.http import (
    Denied,
    FetchError,
    InvalidRequest,
    Timeout,
    Unavailable,
    UpstreamError,
    split_url,
)
from berth.testing import FakeHost


class SplitUrlTest(unittest.TestCase):
    def test_urls_split_into_parts(self):
        self.assertEqual(split_url("http://svc:8080/x/y?z=1"), ("http", "svc:8080", "/x/y?z=1"))
        self.assertEqual(split_url("https://example.com"), ("https", "example.com", "/"))
        self.assertEqual(split_url("http://h?q"), ("http", "h", "/?q"))
        self.assertEqual(split_url("HTTP://h/p#frag"), ("http", "h", "/p"))

    def test_bad_urls_are_invalid_requests(self):
        for url, why in [
            ("example.com/x", "no scheme"),
            ("localhost:8080/x", "no scheme"),
            ("://h/x", "no scheme"),
            ("http:///x", "no host"),
            ("http://h/a b", "whitespace"),
        ]:
            with self.assertRaisesRegex(InvalidRequest, why, msg=url) as caught:
                split_url(url)
            self.assertIsInstance(caught.exception, ValueError)
            self.assertEqual(caught.exception.status, 500)
        with self.assertRaises(TypeError):
            split_url(None)


class FetchTest(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost().install()
        self.addCleanup(self.host.uninstall)

    def test_a_request_reaches_the_host_as_built(self):
        self.host.on_fetch(
            "http://orders.svc:8080/orders?x=1", Response.json({"id": 7}, status=201)
        )
        answer = http.post(
            "http://orders.svc:8080/orders?x=1",
            json={"sku": 42},
            headers={"X-Trace": "t1"},
            timeout=1.5,
            connect_timeout=0.5,
        )
        self.assertEqual((answer.status, answer.json_body()), (201, {"id": 7}))
        (sent,) = self.host.requests
        self.assertEqual(sent.method, "POST")
        self.assertEqual(
            (sent.scheme, sent.authority, sent.path_with_query),
            ("http", "orders.svc:8080", "/orders?x=1"),
        )
        self.assertEqual(
            sent.headers.items(), [("x-trace", "t1"), ("content-type", "application/json")]
        )
        self.assertEqual(sent.body, b'{"sku":42}')
        self.assertEqual((sent.timeout, sent.connect_timeout), (1.5, 0.5))

    def test_methods_and_bodies(self):
        self.host.on_fetch(
            "http://h/", lambda req: Response.text(f"{req.method} {req.body.decode()}")
        )
        self.assertEqual(http.put("http://h/", body="a").text_body(), "PUT a")
        self.assertEqual(http.delete("http://h/").text_body(), "DELETE ")
        self.assertEqual(http.fetch("http://h/", method="patch", body=b"p").text_body(), "PATCH p")

    def test_bad_requests_fail_before_sending(self):
        cases = [
            (dict(headers={"x-n": 1}), "header 'x-n': value must be str"),
            (dict(headers={"x-a": "1\nx-b: 2"}), "line break"),
            (dict(method="GE T"), "invalid method"),
            (dict(body={"a": 1}), "body must be bytes or str"),
            (dict(body="x", json={}), "body or json"),
            (dict(timeout=0), "timeout must be a positive number"),
            (dict(connect_timeout="1s"), "connect_timeout must be a positive number"),
        ]
        for kwargs, why in cases:
            with self.assertRaisesRegex(InvalidRequest, why, msg=kwargs):
                http.fetch("http://h/", **kwargs)
        self.assertEqual(self.host.requests, [])

    def test_an_unknown_destination_is_denied_like_the_host_does(self):
        with self.assertRaises(Denied) as caught:
            http.get("https://example.com/")
        self.assertIn("not in this module's allowed_outbound_hosts", str(caught.exception))
        self.assertIn("on_fetch", str(caught.exception))
        self.assertEqual(caught.exception.status, 502)

    def test_errors_given_by_the_test_are_raised(self):
        url = "http://h/"
        for error, status in [
            (Denied(url), 502),
            (Timeout(url), 504),
            (Unavailable(url), 502),
            (UpstreamError(url, "connection refused"), 502),
        ]:
            self.host.on_fetch(url, error)
            with self.assertRaises(FetchError) as caught:
                http.get(url)
            self.assertIs(caught.exception, error)
            self.assertEqual(caught.exception.status, status)
            self.assertEqual(caught.exception.url, url)
        self.assertIsInstance(Timeout(url), TimeoutError)
        self.assertEqual(
            str(UpstreamError(url, "connection refused")),
            "outbound request to http://h/ failed: connection refused",
        )

    def test_answers_by_method_and_the_latest_wins(self):
        self.host.on_fetch("http://h/", Response.text("any"))
        self.host.on_fetch("http://h/", Response.text("posted"), method="post")
        self.assertEqual(http.get("http://h/").text_body(), "any")
        self.assertEqual(http.post("http://h/").text_body(), "posted")
        self.host.on_fetch("http://h/", Response.text("newer"))
        self.assertEqual(http.post("http://h/").text_body(), "newer")
        with self.assertRaises(TypeError):
            self.host.on_fetch("http://h/", "not an answer")

    def test_each_call_gets_its_own_copy(self):
        self.host.on_fetch("http://h/", Response.text("a"))
        first = http.get("http://h/")
        first.headers["x-changed"] = "1"
        self.assertNotIn("x-changed", http.get("http://h/").headers)

    def test_a_function_must_answer_with_a_response(self):
        self.host.on_fetch("http://h/", lambda req: {"not": "a response"})
        with self.assertRaisesRegex(TypeError, "not a berth.Response"):
            http.get("http://h/")

    def test_async_calls(self):
        self.host.on_fetch("http://a/", Response.text("A"))
        self.host.on_fetch("http://b/", Response.text("B"))

        async def both():
            return await asyncio.gather(
                http.get_async("http://a/"), http.post_async("http://b/", json=[1])
            )

        a, b = asyncio.run(both())
        self.assertEqual((a.text_body(), b.text_body()), ("A", "B"))
        self.assertEqual([r.method for r in self.host.requests], ["GET", "POST"])

    def test_fetch_errors_are_http_errors(self):
        self.assertTrue(issubclass(FetchError, berth.HttpError))


if __name__ == "__main__":
    unittest.main()


class ErrorTextTest(unittest.TestCase):
    """Error text reaches clients and logs: never a URL's userinfo or query."""

    def test_fetch_errors_hide_userinfo_query_and_fragment(self):
        from berth._errors import Denied, Timeout, UpstreamError

        url = "https://svc:hunter2@example.com:8443/v1/x?api_key=SECRET#frag"
        for err in (Denied(url), Timeout(url), UpstreamError(url, "refused")):
            text = str(err)
            self.assertIn("https://example.com:8443/v1/x", text)
            self.assertNotIn("SECRET", text)
            self.assertNotIn("hunter2", text)
            self.assertEqual(err.url, url)
