"""{{name}}: a Berth module in Python (WASI 0.2).

`berth dev` rebuilds and serves it on every change; `python -m unittest`
runs test_app.py on your machine, with berth.testing standing in for the
host. Module-level code runs once, at build time (componentize-py
snapshots it): read config, log and call out inside the handler.
"""

import berth
from berth import Request, Response, config, http, log
from berth.metrics import Counter

# `berth_guest_{{snake}}_greetings_total` on the host's /metrics.
GREETINGS = Counter("greetings")

# Where berth.toml routes this module.
ROUTE = "{{route}}"


def handle(request: Request) -> Response:
    rest = request.path.removeprefix(ROUTE)
    match rest.strip("/"):
        case "":
            name = request.query.get("name", "world")
            log.info(f"greeted {name}")
            GREETINGS.inc()
            return Response.json(greet(config.get_or("greeting", "Hello"), name))
        case "upstream":
            return upstream()
        case _:
            return Response.error(404, "not found")


def upstream() -> Response:
    """Calls `upstream_url`; the host allows only `allowed_outbound_hosts`."""
    url = config.get("upstream_url")
    if not url:
        return Response.error(503, "upstream_url is not set")
    try:
        answer = http.get(url)
    except http.FetchError as e:
        return Response.error(502, str(e))
    return Response.json({"status": answer.status, "body": answer.text_body()})


def greet(greeting: str, name: str) -> dict:
    return {"message": f"{greeting}, {name}!"}


# componentize-py serves the class `IncomingHandler` of this file.
IncomingHandler = berth.serve(handle)
