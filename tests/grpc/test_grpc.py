"""gRPC services from guests, called by a real gRPC client (grpcio, whose
core is gRPC's own C++ stack) over h2c against the real berth binary: the
example `grpc-greeter` (built on the SDK's `grpc` feature) with one method
of each kind of RPC, the statuses a guest sets, and the host's own answers
in gRPC's terms."""
import importlib.util
import os
import queue
import sys
import tempfile
import threading
import time

import grpc
import pytest
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROTO_DIR = os.path.join(ROOT, "examples", "grpc-greeter", "proto")

# The observability tests' process helpers (a berth on free ports).
_spec = importlib.util.spec_from_file_location(
    "berth_observe_support", os.path.join(ROOT, "tests", "observe", "conftest.py"))
support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(support)


@pytest.fixture(scope="module")
def greeter():
    """The Python stubs of the example's own .proto, made by protoc."""
    out = tempfile.mkdtemp(prefix="berth-grpc-stubs-")
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
                      f"--grpc_python_out={out}", os.path.join(PROTO_DIR, "greeter.proto")])
    assert rc == 0, "protoc failed on greeter.proto"
    sys.path.insert(0, out)
    import greeter_pb2
    import greeter_pb2_grpc
    return greeter_pb2, greeter_pb2_grpc


def config(timeout="10s", max_body="1MiB"):
    return f"""
[server]
http2 = true

[modules.greeter]
file = "{support.wasm('grpc_greeter')}"
route = "/greeter.Greeter"
config = {{ greeting = "Hej" }}
limits = {{ timeout = "{timeout}", max_body = "{max_body}" }}
"""


@pytest.fixture
def berth():
    b = support.Berth(config()).wait_ready()
    yield b
    b.stop()


def stub(berth, greeter):
    channel = grpc.insecure_channel(f"127.0.0.1:{berth.port}")
    return greeter[1].GreeterStub(channel)


def test_all_four_kinds_of_rpc(berth, greeter):
    pb, _ = greeter
    s = stub(berth, greeter)
    assert s.SayHello(pb.HelloRequest(name="Ada"), timeout=10).message == "Hej, Ada!"
    assert [r.n for r in s.Count(pb.CountRequest(to=5), timeout=10)] == [1, 2, 3, 4, 5]
    total = s.Sum(iter([pb.Number(value=v) for v in range(1, 101)]), timeout=10)
    assert (total.sum, total.count) == (5050, 100)
    replies = s.Chat(iter([pb.HelloRequest(name=n) for n in ["Ada", "Bo"]]), timeout=10)
    assert [r.message for r in replies] == ["Hej, Ada!", "Hej, Bo!"]


def test_a_server_stream_arrives_message_by_message(berth, greeter):
    pb, _ = greeter
    arrivals = []
    for reply in stub(berth, greeter).Count(pb.CountRequest(to=4, interval_ms=300), timeout=20):
        arrivals.append((reply.n, time.monotonic()))
    assert [n for n, _ in arrivals] == [1, 2, 3, 4]
    # Three 300 ms pauses lie between the first and the last message: a
    # host that gathered the stream would deliver them together.
    assert arrivals[-1][1] - arrivals[0][1] >= 0.8, arrivals


def test_a_bidirectional_stream_is_a_conversation(berth, greeter):
    """Each name is sent only after the reply to the one before has
    arrived, so a host that buffers either direction deadlocks (and the
    call's deadline ends the test)."""
    pb, _ = greeter
    names = ["Ada", "Bo", "Cy"]
    outbox = queue.Queue()

    def requests():
        while (name := outbox.get()) is not None:
            yield pb.HelloRequest(name=name)

    outbox.put(names[0])
    got = []
    for reply in stub(berth, greeter).Chat(requests(), timeout=15):
        got.append(reply.message)
        outbox.put(names[len(got)] if len(got) < len(names) else None)
    assert got == ["Hej, Ada!", "Hej, Bo!", "Hej, Cy!"]


def code_of(call):
    with pytest.raises(grpc.RpcError) as e:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    return e.value.code(), e.value.details()


def test_guest_statuses_reach_the_client(berth, greeter):
    pb, _ = greeter
    s = stub(berth, greeter)
    assert code_of(lambda: s.SayHello(pb.HelloRequest(name=""), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "name is empty")
    assert code_of(lambda: s.Count(pb.CountRequest(to=5000), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "count to 1000 at most")
    big = [pb.Number(value=2**62), pb.Number(value=2**62)]
    assert code_of(lambda: s.Sum(iter(big), timeout=10)) == (
        grpc.StatusCode.OUT_OF_RANGE, "the sum overflows an int64")
    # A bidirectional stream ends with the guest's error after what it sent.
    replies = s.Chat(iter([pb.HelloRequest(name="Ada"), pb.HelloRequest(name="")]), timeout=10)
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for r in replies:
            got.append(r.message)
    assert got == ["Hej, Ada!"]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_methods_are_unimplemented(berth, greeter):
    pb, _ = greeter
    channel = grpc.insecure_channel(f"127.0.0.1:{berth.port}")
    ser, de = pb.HelloRequest.SerializeToString, pb.HelloReply.FromString
    # A method the module does not have: the SDK's router answers.
    nope = channel.unary_unary("/greeter.Greeter/Nope", request_serializer=ser,
                               response_deserializer=de)
    code, details = code_of(lambda: nope(pb.HelloRequest(name="x"), timeout=10))
    assert (code, details) == (grpc.StatusCode.UNIMPLEMENTED,
                               "unknown method /greeter.Greeter/Nope")
    # A service no module serves: the host answers.
    other = channel.unary_unary("/other.Service/Call", request_serializer=ser,
                                response_deserializer=de)
    code, _ = code_of(lambda: other(pb.HelloRequest(name="x"), timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_the_module_timeout_ends_a_stream_as_deadline_exceeded(greeter):
    pb, _ = greeter
    b = support.Berth(config(timeout="1s")).wait_ready()
    try:
        got = []
        with pytest.raises(grpc.RpcError) as e:
            for r in stub(b, greeter).Count(pb.CountRequest(to=100, interval_ms=100), timeout=20):
                got.append(r.n)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
        assert 1 <= len(got) < 100, got
    finally:
        b.stop()


def test_a_message_over_the_body_limit_is_resource_exhausted(greeter):
    pb, _ = greeter
    b = support.Berth(config(max_body="64KiB")).wait_ready()
    try:
        s = stub(b, greeter)
        code, _ = code_of(lambda: s.SayHello(pb.HelloRequest(name="x" * 200_000), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The connection and the module still serve.
        assert s.SayHello(pb.HelloRequest(name="Ada"), timeout=10).message == "Hej, Ada!"
    finally:
        b.stop()


HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"""


@pytest.fixture(scope="module")
def health():
    """Stubs of the standard health service (grpc/grpc's health.proto)."""
    out = tempfile.mkdtemp(prefix="berth-grpc-health-")
    with open(os.path.join(out, "health.proto"), "w") as f:
        f.write(HEALTH_PROTO)
    rc = protoc.main(["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}",
                      os.path.join(out, "health.proto")])
    assert rc == 0, "protoc failed on health.proto"
    sys.path.insert(0, out)
    import health_pb2
    import health_pb2_grpc
    return health_pb2, health_pb2_grpc


class Watch:
    """A health Watch read on a thread of its own: the statuses as they
    come, and how the stream ended."""

    def __init__(self, berth, health, service):
        pb, grpc_stubs = health
        channel = grpc.insecure_channel(f"127.0.0.1:{berth.port}")
        self.call = grpc_stubs.HealthStub(channel).Watch(
            pb.HealthCheckRequest(service=service), timeout=60)
        self.names = pb.HealthCheckResponse.ServingStatus.Name
        self.seen, self.ended = [], None
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        try:
            for r in self.call:
                self.seen.append(self.names(r.status))
            self.ended = "OK"
        except grpc.RpcError as e:
            self.ended = e.code().name

    def wait_for(self, status, limit=15):
        deadline = time.time() + limit
        while not self.seen or self.seen[-1] != status:
            assert time.time() < deadline, f"waited for {status}; saw {self.seen}, ended {self.ended}"
            time.sleep(0.05)


def test_health_watch_follows_reloads_and_the_drain(greeter, health):
    b = support.Berth(config() + '\n[shutdown]\ndrain_delay = "2s"\ngrace_period = "60s"\n').wait_ready()
    try:
        host, module, nobody = (Watch(b, health, name) for name in ("", "greeter", "nobody"))
        host.wait_for("SERVING")
        module.wait_for("SERVING")
        nobody.wait_for("SERVICE_UNKNOWN")
        # The module goes with a reload: its watch says so, and stays open.
        with open(b.config) as f:
            text = f.read()
        with open(b.config, "w") as f:
            f.write(text.replace("[modules.greeter]", "[modules.greeter2]"))
        assert b.reload()[0] == 200
        module.wait_for("SERVICE_UNKNOWN")
        assert module.ended is None
        # SIGTERM: every watch says NOT_SERVING, then ends, so a watch
        # never holds the shutdown up for its 60 s grace period.
        b.proc.send_signal(support.signal.SIGTERM)
        host.wait_for("NOT_SERVING")
        for w in (host, module, nobody):
            w.thread.join(timeout=30)
            assert w.ended == "UNAVAILABLE", (w.seen, w.ended)
        assert b.proc.wait(timeout=30) == 0, "the shutdown waited for the grace period"
        assert host.seen == ["SERVING", "NOT_SERVING"], host.seen
    finally:
        b.stop()


def handled(berth, service, method, code):
    """The value of berth_grpc_server_handled_total for these labels."""
    _, page = support.http(berth.admin + "/metrics")
    want = (f'{{grpc_code="{code}",grpc_method="{method}",grpc_service="{service}",'
            f'module="greeter"}} ')
    for line in page.splitlines():
        if line.startswith("berth_grpc_server_handled_total" + want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_each_method_and_status(berth, greeter):
    pb, _ = greeter
    s = stub(berth, greeter)
    s.SayHello(pb.HelloRequest(name="Ada"), timeout=10)
    s.SayHello(pb.HelloRequest(name="Bo"), timeout=10)
    code_of(lambda: s.SayHello(pb.HelloRequest(name=""), timeout=10))
    list(s.Count(pb.CountRequest(to=3), timeout=10))
    channel = grpc.insecure_channel(f"127.0.0.1:{berth.port}")
    for name in ("Nope", "Nada"):
        call = channel.unary_unary(f"/greeter.Greeter/{name}",
                                   request_serializer=pb.HelloRequest.SerializeToString,
                                   response_deserializer=pb.HelloReply.FromString)
        code_of(lambda: call(pb.HelloRequest(name="x"), timeout=10))
    # A client that cancels a stream after its first message.
    stream = s.Count(pb.CountRequest(to=100, interval_ms=100), timeout=20)
    assert next(stream).n == 1
    stream.cancel()
    deadline = time.time() + 15
    while handled(berth, "greeter.Greeter", "Count", "CANCELLED") != 1:
        assert time.time() < deadline, "the cancelled stream was never counted"
        time.sleep(0.1)
    assert handled(berth, "greeter.Greeter", "SayHello", "OK") == 2
    assert handled(berth, "greeter.Greeter", "SayHello", "INVALID_ARGUMENT") == 1
    assert handled(berth, "greeter.Greeter", "Count", "OK") == 1
    # The host's own trailers-only answer (over max_body) is counted by its code.
    code, _ = code_of(lambda: s.SayHello(pb.HelloRequest(name="x" * 2_000_000), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
    assert handled(berth, "greeter.Greeter", "SayHello", "RESOURCE_EXHAUSTED") == 1
    _, page = support.http(berth.admin + "/metrics")
    took = [l for l in page.splitlines() if l.startswith(
        'berth_grpc_server_handling_seconds_sum{grpc_method="SayHello"')]
    assert took and float(took[0].rsplit(" ", 1)[1]) > 0, took
    # Methods the module does not have share one series.
    assert handled(berth, "other", "other", "UNIMPLEMENTED") == 2
    _, page = support.http(berth.admin + "/metrics")
    assert 'grpc_method="Nope"' not in page
    # The HTTP view of the same calls: every gRPC answer is a 200.
    assert 'berth_http_server_requests_total{method="POST",module="greeter",route="/greeter.Greeter",status="200"' in page


class UpstreamGreeter:
    """A gRPC server of grpcio's own (C-core, HTTP/2 only) behind a guest:
    the Greeter again, recording the metadata and time left of each call."""

    def __init__(self, greeter):
        from concurrent import futures
        pb, stubs = greeter
        self.pb, self.calls = pb, []
        outer = self

        class Servicer(stubs.GreeterServicer):
            def SayHello(self, request, context):
                outer.record("SayHello", context)
                if not request.name:
                    context.abort(grpc.StatusCode.NOT_FOUND, "nobody by that name upstream")
                return pb.HelloReply(message=f"Upstream, {request.name}!")

            def Count(self, request, context):
                outer.record("Count", context)
                for n in range(1, request.to + 1):
                    yield pb.CountReply(n=n)
                if request.interval_ms == 7:
                    # A status after messages: it can only travel in trailers.
                    context.abort(grpc.StatusCode.DATA_LOSS, "cut after the last")

            def Sum(self, request_iterator, context):
                outer.record("Sum", context)
                values = [n.value for n in request_iterator]
                return pb.Total(sum=sum(values), count=len(values))

            def Chat(self, request_iterator, context):
                outer.record("Chat", context)
                for r in request_iterator:
                    yield pb.HelloReply(message=f"Upstream, {r.name}!")

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        stubs.add_GreeterServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def record(self, method, context):
        self.calls.append((method, dict(context.invocation_metadata()), context.time_remaining()))

    def stop(self):
        self.server.stop(grace=None)


def hop_config(up, extra=""):
    return f"""
[server]
http2 = true

[upstreams."127.0.0.1:{up.port}"]
h2c = true

[modules.proxy]
file = "{support.wasm('stream_proxy')}"
route = "/greeter.Greeter"
allowed_outbound_hosts = ["http://127.0.0.1:{up.port}"]
limits = {{ timeout = "5s" }}
{extra}
"""


@pytest.fixture
def hop(greeter):
    """A grpcio client -> berth (h2c) -> the stream-proxy guest -> berth's
    outbound HTTP/2 by prior knowledge -> a grpcio server."""
    up = UpstreamGreeter(greeter)
    b = support.Berth(hop_config(up)).wait_ready()
    yield b, up
    b.stop()
    up.stop()


def created(berth, module):
    """berth_instances_created_total of `module`."""
    _, page = support.http(berth.admin + "/metrics")
    for line in page.splitlines():
        if line.startswith(f'berth_instances_created_total{{module="{module}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_grpc_reaches_an_upstream_through_a_guest_with_trailers_deadline_and_trace(hop, greeter):
    b, up = hop
    pb, _ = greeter
    s = stub(b, greeter)
    md = [("x-upstream", f"127.0.0.1:{up.port}"),
          ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01")]
    # All four kinds, over HTTP/2 on both sides of the guest.
    assert s.SayHello(pb.HelloRequest(name="Ada"), timeout=30, metadata=md).message == "Upstream, Ada!"
    assert [r.n for r in s.Count(pb.CountRequest(to=3), timeout=30, metadata=md)] == [1, 2, 3]
    total = s.Sum(iter([pb.Number(value=v) for v in range(10)]), timeout=30, metadata=md)
    assert (total.sum, total.count) == (45, 10)
    outbox = queue.Queue()
    outbox.put("Ada")

    def requests():
        while (name := outbox.get()) is not None:
            yield pb.HelloRequest(name=name)

    got = []
    for reply in s.Chat(requests(), timeout=30, metadata=md):
        got.append(reply.message)
        outbox.put("Bo" if len(got) == 1 else None)
    assert got == ["Upstream, Ada!", "Upstream, Bo!"]

    # The upstream's statuses come back: trailers-only, and after messages.
    assert code_of(lambda: s.SayHello(pb.HelloRequest(name=""), timeout=30, metadata=md)) == (
        grpc.StatusCode.NOT_FOUND, "nobody by that name upstream")
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for r in s.Count(pb.CountRequest(to=2, interval_ms=7), timeout=30, metadata=md):
            got.append(r.n)
    assert got == [1, 2]
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.DATA_LOSS, "cut after the last")

    assert [c[0] for c in up.calls] == ["SayHello", "Count", "Sum", "Chat", "SayHello", "Count"]
    for method, metadata, left in up.calls:
        # The client allowed 30 s; the module's 5 s is what is left, and
        # the host carried it onward as the upstream's deadline.
        assert left is not None and left <= 5.0, (method, left)
        # One trace across the hop: the client's trace id, with the host's
        # outbound span as the parent the upstream sees.
        version, trace_id, parent, _ = metadata["traceparent"].split("-")
        assert (version, trace_id) == ("00", TRACE_ID), metadata
        assert parent != "00f067aa0ba902b7", "the host's own span is the parent"


def test_a_reused_instance_serves_call_after_call(greeter):
    pb, _ = greeter
    b = support.Berth(config() + 'instances = { max_requests = 1000, idle_timeout = "60s" }\n').wait_ready()
    try:
        s = stub(b, greeter)
        for name in ["Ada", "Bo", "Cy"]:
            assert s.SayHello(pb.HelloRequest(name=name), timeout=10).message == f"Hej, {name}!"
        assert [r.n for r in s.Count(pb.CountRequest(to=3), timeout=10)] == [1, 2, 3]
        total = s.Sum(iter([pb.Number(value=v) for v in range(5)]), timeout=10)
        assert (total.sum, total.count) == (10, 5)
        # A guest's error status leaves the instance serving.
        assert code_of(lambda: s.SayHello(pb.HelloRequest(name=""), timeout=10))[0] == \
            grpc.StatusCode.INVALID_ARGUMENT
        replies = s.Chat(iter([pb.HelloRequest(name=n) for n in ["Ada", "Bo"]]), timeout=10)
        assert [r.message for r in replies] == ["Hej, Ada!", "Hej, Bo!"]
        assert created(b, "greeter") == 1, "eight calls, one instance"
    finally:
        b.stop()


def test_a_reused_instance_carries_each_calls_own_deadline_onward(greeter):
    """The deadline an outbound call carries is the current request's, not
    the one the reused instance first served."""
    pb, _ = greeter
    up = UpstreamGreeter(greeter)
    b = support.Berth(hop_config(up, 'instances = { max_requests = 100, idle_timeout = "60s" }')).wait_ready()
    try:
        s = stub(b, greeter)
        md = [("x-upstream", f"127.0.0.1:{up.port}")]
        for name in ["Ada", "Bo"]:
            assert s.SayHello(pb.HelloRequest(name=name), timeout=30, metadata=md).message \
                == f"Upstream, {name}!"
            time.sleep(3)
        assert created(b, "proxy") == 1
        (_, _, first), (_, _, second) = up.calls
        # Each call had the module's 5 s; a stale deadline would leave the
        # second less than 2 s.
        assert 3.5 < first <= 5.0 and 3.5 < second <= 5.0, (first, second)
    finally:
        b.stop()
        up.stop()


def p3_config(timeout="10s", extra=""):
    return f"""
[server]
http2 = true

[modules.greeter3]
file = "{support.wasm('p3_grpc')}"
route = "/greeter.Greeter"
config = {{ greeting = "Hej" }}
limits = {{ timeout = "{timeout}", max_body = "64KiB" }}
{extra}
"""


@pytest.fixture
def p3_greeter():
    """The same service from a WASI 0.3 module on the SDK's async router."""
    b = support.Berth(p3_config()).wait_ready()
    yield b
    b.stop()


def test_a_wasi_0_3_module_serves_all_four_kinds_and_its_statuses(p3_greeter, greeter):
    pb, _ = greeter
    s = stub(p3_greeter, greeter)
    assert s.SayHello(pb.HelloRequest(name="Ada"), timeout=10).message == "Hej from p3, Ada!"
    assert [r.n for r in s.Count(pb.CountRequest(to=4), timeout=10)] == [1, 2, 3, 4]
    total = s.Sum(iter([pb.Number(value=v) for v in range(1, 101)]), timeout=10)
    assert (total.sum, total.count) == (5050, 100)
    assert code_of(lambda: s.SayHello(pb.HelloRequest(name=""), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "name is empty")
    big = [pb.Number(value=2**62), pb.Number(value=2**62)]
    assert code_of(lambda: s.Sum(iter(big), timeout=10)) == (
        grpc.StatusCode.OUT_OF_RANGE, "the sum overflows an int64")
    channel = grpc.insecure_channel(f"127.0.0.1:{p3_greeter.port}")
    nope = channel.unary_unary("/greeter.Greeter/Nope",
                               request_serializer=pb.HelloRequest.SerializeToString,
                               response_deserializer=pb.HelloReply.FromString)
    assert code_of(lambda: nope(pb.HelloRequest(name="x"), timeout=10)) == (
        grpc.StatusCode.UNIMPLEMENTED, "unknown method /greeter.Greeter/Nope")
    # Over the module's body limit while the guest reads it.
    code, _ = code_of(lambda: s.Sum(iter([pb.Number(value=1)] * 20_000), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
    # Messages stream out as sent: the timer between them is the guest's.
    arrivals = [time.monotonic() for _ in s.Count(pb.CountRequest(to=3, interval_ms=400), timeout=10)]
    assert arrivals[-1] - arrivals[0] >= 0.6, arrivals


def test_a_wasi_0_3_instance_holds_two_conversations_at_once(p3_greeter, greeter):
    """Two bidirectional calls open together, each answered turn by turn:
    each call is a task of its own whose head leaves at once, so neither
    waits for its own end or for the other's. (Whether wasmtime gives the
    second call the first one's instance is its scheduler's choice.)"""
    pb, _ = greeter
    s = stub(p3_greeter, greeter)
    boxes = [queue.Queue(), queue.Queue()]

    def requests(box):
        while (name := box.get()) is not None:
            yield pb.HelloRequest(name=name)

    calls = [s.Chat(requests(box), timeout=15) for box in boxes]
    for turn in ["Ada", "Bo"]:
        for i, (box, call) in enumerate(zip(boxes, calls)):
            box.put(f"{turn}{i}")
            assert next(call).message == f"Hej from p3, {turn}{i}!"
    for box, call in zip(boxes, calls):
        box.put(None)
        assert list(call) == []


def test_a_wasi_0_3_call_at_its_deadline_always_ends_deadline_exceeded(greeter):
    """Calls whose clients stall mid-request run into the module's
    timeout; however the host ends them (the response's own deadline, or
    the worker tearing the instance down), each ends DEADLINE_EXCEEDED,
    never as a stream that merely stopped."""
    pb, _ = greeter
    b = support.Berth(p3_config(timeout="2s")).wait_ready()
    try:
        s = stub(b, greeter)

        def stalled():
            yield pb.Number(value=1)
            time.sleep(30)

        codes = []
        calls = [s.Sum.future(stalled(), timeout=20) for _ in range(6)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call.result()
            codes.append((e.value.code(), e.value.details()))
        assert codes == [(grpc.StatusCode.DEADLINE_EXCEEDED, "the module ran over its deadline")] * 6
    finally:
        b.stop()


def test_max_concurrent_counts_wasi_0_3_calls_that_are_still_streaming(greeter):
    """A WASI 0.3 handler returns its head at once and streams from a task
    of its own; `max_concurrent` still counts the call until its stream
    ends, so a third open conversation gets an instance of its own."""
    pb, _ = greeter
    b = support.Berth(p3_config(extra='instances = { max_concurrent = 2, idle_timeout = "30s" }')).wait_ready()
    try:
        s = stub(b, greeter)
        boxes, calls = [], []
        for i in range(3):
            box = queue.Queue()
            box.put(f"n{i}")

            def requests(box=box):
                while (name := box.get()) is not None:
                    yield pb.HelloRequest(name=name)

            call = s.Chat(requests(), timeout=20)
            assert next(call).message == f"Hej from p3, n{i}!"
            boxes.append(box)
            calls.append(call)
        assert created(b, "greeter3") >= 2, "three open calls on one instance of max_concurrent 2"
        for box, call in zip(boxes, calls):
            box.put(None)
            assert list(call) == []
    finally:
        b.stop()


def open_watches(berth):
    _, page = support.http(berth.admin + "/metrics")
    for line in page.splitlines():
        if line.startswith("berth_grpc_health_watches "):
            return float(line.split()[1])
    raise AssertionError("berth_grpc_health_watches is missing")


def test_a_cancelled_watch_gives_its_slot_back(greeter, health):
    b = support.Berth(config()).wait_ready()
    try:
        watches = [Watch(b, health, "greeter") for _ in range(3)]
        for w in watches:
            w.wait_for("SERVING")
        assert open_watches(b) == 3
        for w in watches[:2]:
            w.call.cancel()
        deadline = time.time() + 10
        while open_watches(b) != 1:
            assert time.time() < deadline, f"{open_watches(b)} watches still held"
            time.sleep(0.1)
        watches[2].call.cancel()
        deadline = time.time() + 10
        while open_watches(b) != 0:
            assert time.time() < deadline, f"{open_watches(b)} watches still held"
            time.sleep(0.1)
    finally:
        b.stop()
