"""Reads config at import time, which runs at build time: the build must
fail with a message that says so."""

import berth
from berth import Response, config

GREETING = config.get_or("greeting", "Hello")


def handle(request):
    return Response.text(GREETING)


IncomingHandler = berth.serve(handle)
