"""berth.metrics: what reaches the host, and what is refused early."""

import unittest

from berth.metrics import Counter, Gauge, Histogram
from berth.testing import FakeHost


class MetricsTest(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost().install()
        self.addCleanup(self.host.uninstall)

    def test_counter(self):
        orders = Counter("orders")
        orders.inc()
        orders.add(2)
        orders.add(5, labels={"kind": "book"})
        orders.add(0)
        self.assertEqual(self.host.counter("orders"), 3)
        self.assertEqual(self.host.counter("orders", {"kind": "book"}), 5)
        self.assertEqual(self.host.counter("orders", {"kind": "pen"}), 0)

    def test_counter_refuses_what_is_not_a_count(self):
        c = Counter("orders")
        with self.assertRaisesRegex(ValueError, "only goes up"):
            c.add(-1)
        with self.assertRaisesRegex(ValueError, "only goes up"):
            c.add(2**64)
        for bad in (1.5, True, "1"):
            with self.assertRaises(TypeError):
                c.add(bad)
        self.assertEqual(self.host.metrics, [])

    def test_gauge(self):
        g = Gauge("queue_depth")
        g.set(3)
        g.set(1.5)
        g.set(7, labels={"queue": "a"})
        self.assertEqual(self.host.gauge("queue_depth"), 1.5)
        self.assertEqual(self.host.gauge("queue_depth", {"queue": "a"}), 7.0)
        self.assertIsNone(self.host.gauge("other"))
        with self.assertRaisesRegex(TypeError, "value must be a number"):
            g.set("3")

    def test_histogram_tells_its_buckets_once_per_host(self):
        h = Histogram("order_items", buckets=[1, 5, 25])
        h.observe(3)
        h.observe(30, labels={"kind": "bulk"})
        self.assertEqual(self.host.buckets, {"order_items": [1.0, 5.0, 25.0]})
        self.assertEqual(self.host.observations("order_items"), [3.0])
        self.assertEqual(self.host.observations("order_items", {"kind": "bulk"}), [30.0])
        with FakeHost() as other:
            h.observe(1)
            self.assertEqual(other.buckets, {"order_items": [1.0, 5.0, 25.0]})
        plain = Histogram("lookup_seconds")
        plain.observe(0.01)
        self.assertNotIn("lookup_seconds", self.host.buckets)

    def test_bad_buckets_fail_at_definition(self):
        for bad in ([], [2, 1], [1, 1], [1, float("inf")], list(range(65)), ["1"]):
            with self.assertRaises((ValueError, TypeError), msg=bad):
                Histogram("h", buckets=bad)

    def test_names_and_labels_are_checked(self):
        for bad in ("", "9lives", "with-dash", "a b"):
            with self.assertRaisesRegex(ValueError, "invalid metric name"):
                Counter(bad)
        with self.assertRaises(TypeError):
            Gauge(None)
        c = Counter("ok_name")
        with self.assertRaisesRegex(TypeError, "labels must be a dict"):
            c.inc([("kind", "book")])
        with self.assertRaisesRegex(TypeError, "label 'code' must be str, not int"):
            c.inc({"code": 200})
        with self.assertRaisesRegex(ValueError, "invalid label name"):
            c.inc({"bad-name": "x"})
        self.assertEqual(self.host.metrics, [])


if __name__ == "__main__":
    unittest.main()
