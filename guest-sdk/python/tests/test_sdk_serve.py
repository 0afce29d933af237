"""berth.serve and berth.testing.call: what a client gets from a handler."""

import asyncio
import unittest

import berth
from berth import HttpError, Request, Response, http
from berth.testing import FakeHost, call


class CallTest(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost().install()
        self.addCleanup(self.host.uninstall)

    def test_a_response_is_passed_through(self):
        response = call(lambda req: Response.text(req.path), Request("GET", "/p"))
        self.assertEqual(response.text_body(), "/p")
        self.assertEqual(self.host.logs, [])

    def test_http_errors_become_their_status(self):
        def handle(req):
            raise HttpError(409, "order already paid")

        response = call(handle, Request())
        self.assertEqual(
            (response.status, response.json_body()), (409, {"error": "order already paid"})
        )
        self.assertEqual(self.host.logs, [])  # a 4xx is the client's business

    def test_invalid_json_from_the_client_is_a_400(self):
        def handle(req):
            return Response.json(req.json())

        response = call(handle, Request("POST", "/", body="{oops"))
        self.assertEqual(response.status, 400)
        self.assertIn("request body is not valid JSON", response.json_body()["error"])

    def test_an_uncaught_fetch_error_is_a_502_and_logged(self):
        def handle(req):
            return http.get("http://nowhere.test/")

        response = call(handle, Request())
        self.assertEqual(response.status, 502)
        self.assertIn("denied by the host", response.json_body()["error"])
        self.assertEqual(len(self.host.log_messages("error")), 1)

    def test_other_exceptions_are_a_500_with_the_traceback_in_the_log_only(self):
        def handle(req):
            return {"a": 1}["b"]

        response = call(handle, Request())
        self.assertEqual(
            (response.status, response.json_body()), (500, {"error": "internal error"})
        )
        (line,) = self.host.logs
        self.assertEqual(line.level, "error")
        self.assertIn("Traceback", line.message)
        self.assertIn("KeyError: 'b'", line.message)
        self.assertEqual(line.context, __name__)

    def test_a_handler_must_return_a_response(self):
        response = call(lambda req: {"message": "hi"}, Request())
        self.assertEqual(response.status, 500)
        self.assertIn("returned dict, not a berth.Response", self.host.logs[0].message)

    def test_an_http_error_with_a_bad_status_is_a_500(self):
        def handle(req):
            raise HttpError(1000, "odd")

        response = call(handle, Request())
        self.assertEqual((response.status, response.json_body()), (500, {"error": "odd"}))

    def test_async_handlers(self):
        self.host.on_fetch("http://a/", Response.text("A"))

        async def handle(req):
            answer, _ = await asyncio.gather(http.get_async("http://a/"), asyncio.sleep(0))
            return Response.text(answer.text_body())

        self.assertEqual(call(handle, Request()).text_body(), "A")


class ServeTest(unittest.TestCase):
    def test_serve_gives_the_class_componentize_py_exports(self):
        def handle(req):
            return Response.text("hi")

        IncomingHandler = berth.serve(handle)
        self.assertIs(IncomingHandler.handler, handle)
        with self.assertRaisesRegex(RuntimeError, "berth.testing.call"):
            IncomingHandler().handle(None, None)

    def test_serve_takes_a_function(self):
        with self.assertRaisesRegex(TypeError, "handler function"):
            berth.serve("handle")


if __name__ == "__main__":
    unittest.main()
