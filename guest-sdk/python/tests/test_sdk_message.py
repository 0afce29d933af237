"""Request, Response and Headers, built by hand as a unit test would."""

import unittest

import berth
from berth import Headers, JsonError, Request, Response


class RequestTest(unittest.TestCase):
    def test_method_path_and_query_are_split_and_decoded(self):
        r = Request("get", "/x?name=J%C3%BCrgen+K&flag&a=1&a=2")
        self.assertEqual(r.method, "GET")
        self.assertEqual(r.path, "/x")
        self.assertEqual(r.query_string, "name=J%C3%BCrgen+K&flag&a=1&a=2")
        self.assertEqual(r.query, {"name": "Jürgen K", "flag": "", "a": "1"})
        self.assertEqual(r.query_items[-2:], [("a", "1"), ("a", "2")])
        self.assertNotIn("missing", r.query)

    def test_no_query_and_empty_path(self):
        r = Request("GET", "")
        self.assertEqual((r.path, r.query_string, r.query), ("/", "", {}))

    def test_segments_skip_empty_parts(self):
        self.assertEqual(Request("GET", "/api//items/7/").segments, ["api", "items", "7"])

    def test_json_body(self):
        r = Request("POST", "/orders", json={"sku": 42, "name": "ü"})
        self.assertEqual(r.json(), {"sku": 42, "name": "ü"})
        self.assertEqual(r.headers["Content-Type"], "application/json")
        self.assertEqual(r.body, '{"sku":42,"name":"ü"}'.encode())

    def test_invalid_json_body_is_a_400_json_error(self):
        with self.assertRaises(JsonError) as caught:
            Request("POST", "/", body="{not json").json()
        self.assertEqual(caught.exception.status, 400)
        self.assertIn("request body is not valid JSON", str(caught.exception))
        self.assertIsInstance(caught.exception, ValueError)

    def test_empty_and_non_utf8_bodies_are_json_errors(self):
        with self.assertRaisesRegex(JsonError, "request body is empty"):
            Request("POST", "/").json()
        with self.assertRaisesRegex(JsonError, "not valid JSON"):
            Request("POST", "/", body=b"\xff\xfe{}").json()

    def test_text_replaces_invalid_utf8(self):
        self.assertEqual(Request("POST", "/", body=b"caf\xc3\xa9 \xff").text(), "café \ufffd")

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "invalid method"):
            Request("GE T", "/")
        with self.assertRaises(TypeError):
            Request(None, "/")
        with self.assertRaisesRegex(TypeError, "url must be str"):
            Request("GET", b"/")
        with self.assertRaisesRegex(TypeError, "body must be bytes or str"):
            Request("POST", "/", body={"a": 1})
        with self.assertRaisesRegex(ValueError, "body or json"):
            Request("POST", "/", body="x", json={})


class HeadersTest(unittest.TestCase):
    def test_names_are_case_insensitive_and_values_ordered(self):
        h = Headers([("Accept", "a"), ("X-Tag", "1"), ("x-tag", "2")])
        self.assertEqual(h["ACCEPT"], "a")
        self.assertEqual(h.get("x-tag"), "1")
        self.assertEqual(h.get_all("X-TAG"), ["1", "2"])
        self.assertEqual(h.items(), [("accept", "a"), ("x-tag", "1"), ("x-tag", "2")])
        self.assertEqual(list(h), ["accept", "x-tag"])
        self.assertEqual(len(h), 2)
        self.assertIn("Accept", h)
        self.assertNotIn("missing", h)
        self.assertIsNone(h.get("missing"))
        self.assertEqual(h.get("missing", "d"), "d")

    def test_set_replaces_and_remove_deletes(self):
        h = Headers({"x-tag": "1"})
        h.add("X-Tag", "2")
        h["X-TAG"] = "3"
        self.assertEqual(h.get_all("x-tag"), ["3"])
        del h["x-tag"]
        self.assertNotIn("x-tag", h)
        with self.assertRaises(KeyError):
            del h["x-tag"]
        with self.assertRaises(KeyError):
            h["x-tag"]
        h.remove("never-there")

    def test_non_string_values_are_refused_with_the_header_name(self):
        with self.assertRaisesRegex(TypeError, r"header 'x-count': value must be str, not int"):
            Headers({"X-Count": 3})
        with self.assertRaisesRegex(TypeError, "header name must be str"):
            Headers({3: "x"})
        with self.assertRaisesRegex(TypeError, r"\(name, value\) pairs"):
            Headers(["x-a"])

    def test_injection_and_bad_names_are_refused(self):
        with self.assertRaisesRegex(ValueError, "line break"):
            Headers({"x-a": "1\r\nset-cookie: evil=1"})
        with self.assertRaisesRegex(ValueError, "invalid header name"):
            Headers({"bad name": "1"})
        with self.assertRaisesRegex(ValueError, "invalid header name"):
            Headers({"": "1"})


class ResponseTest(unittest.TestCase):
    def test_json_is_compact_utf8_with_its_content_type(self):
        r = Response.json({"message": "Hello, Jürgen!"}, status=201)
        self.assertEqual(r.status, 201)
        self.assertEqual(r.headers["content-type"], "application/json")
        self.assertEqual(r.body, '{"message":"Hello, Jürgen!"}'.encode())
        self.assertEqual(r.json_body(), {"message": "Hello, Jürgen!"})

    def test_a_given_content_type_is_kept(self):
        r = Response.json([], headers={"Content-Type": "application/problem+json"})
        self.assertEqual(r.headers.get_all("content-type"), ["application/problem+json"])

    def test_json_refuses_what_json_cannot_hold(self):
        with self.assertRaises(TypeError):
            Response.json({"when": object()})
        with self.assertRaises(ValueError):
            Response.json({"x": float("nan")})

    def test_text_error_and_not_found(self):
        t = Response.text("hi\n")
        self.assertEqual(
            (t.status, t.body, t.headers["content-type"]),
            (200, b"hi\n", "text/plain; charset=utf-8"),
        )
        self.assertEqual(t.text_body(), "hi\n")
        e = Response.error(418, "teapot")
        self.assertEqual((e.status, e.body), (418, b'{"error":"teapot"}'))
        self.assertEqual(Response.not_found().json_body(), {"error": "not found"})
        with self.assertRaises(TypeError):
            Response.text(b"bytes")

    def test_status_is_checked(self):
        for bad in (99, 600, -1):
            with self.assertRaisesRegex(ValueError, "100 to 599"):
                Response(status=bad)
        for bad in ("200", True, 200.0):
            with self.assertRaises(TypeError):
                Response(status=bad)
        r = Response()
        r.status = 204
        self.assertEqual(r.status, 204)
        self.assertFalse(Response(status=302).ok)
        self.assertTrue(Response(status=204).ok)

    def test_json_body_of_an_answer_that_is_not_json_is_a_502(self):
        with self.assertRaises(JsonError) as caught:
            Response("<html>").json_body()
        self.assertEqual(caught.exception.status, 502)
        self.assertIn("response body is not valid JSON", str(caught.exception))

    def test_equality(self):
        self.assertEqual(Response.text("a"), Response.text("a"))
        self.assertNotEqual(Response.text("a"), Response.text("a", status=201))
        self.assertIn("404", repr(Response.not_found()))

    def test_package_exports(self):
        for name in berth.__all__:
            self.assertTrue(hasattr(berth, name), name)


if __name__ == "__main__":
    unittest.main()
