"""berth.config and berth.log against a FakeHost, and without any host."""

import logging
import unittest

from berth import ConfigError, config, log
from berth.testing import FakeHost


class ConfigTest(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost(config={"greeting": "Hi"}, secrets={"api_key": "s3cret"}).install()
        self.addCleanup(self.host.uninstall)

    def test_values_defaults_and_secrets(self):
        self.assertEqual(config.get("greeting"), "Hi")
        self.assertIsNone(config.get("missing"))
        self.assertEqual(config.get_or("missing", "Hello"), "Hello")
        self.assertEqual(config.get_or("greeting", "Hello"), "Hi")
        self.assertEqual(config.get("api_key"), "s3cret")
        self.assertEqual(config.get_all(), [("greeting", "Hi"), ("api_key", "s3cret")])

    def test_a_key_must_be_text(self):
        with self.assertRaisesRegex(TypeError, "config key must be str"):
            config.get(42)

    def test_store_errors_name_the_key(self):
        self.host.config_error = "vault unreachable"
        with self.assertRaises(ConfigError) as caught:
            config.get_or("greeting", "Hello")
        self.assertEqual(caught.exception.key, "greeting")
        self.assertEqual(
            str(caught.exception), "config store failed reading 'greeting': vault unreachable"
        )
        with self.assertRaisesRegex(ConfigError, "listing the keys: vault unreachable"):
            config.get_all()

    def test_fake_config_values_are_text_like_the_hosts(self):
        with self.assertRaisesRegex(TypeError, "config 'port'.*int"):
            FakeHost(config={"port": 8080})


class NoHostTest(unittest.TestCase):
    def test_calls_without_a_host_say_how_to_test(self):
        with self.assertRaisesRegex(RuntimeError, "FakeHost"):
            config.get("greeting")
        with self.assertRaisesRegex(RuntimeError, "outside a Berth component"):
            log.info("x")

    def test_fakes_nest_and_restore(self):
        with FakeHost(config={"a": "outer"}):
            with FakeHost(config={"a": "inner"}) as inner:
                self.assertEqual(config.get("a"), "inner")
                with self.assertRaisesRegex(RuntimeError, "installed already"):
                    inner.install()
            self.assertEqual(config.get("a"), "outer")
        with self.assertRaises(RuntimeError):
            config.get("a")


class LogTest(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost().install()
        self.addCleanup(self.host.uninstall)

    def test_levels_and_the_callers_module_as_context(self):
        log.trace("t")
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.warning("w2")
        log.error(ValueError("boom"))
        self.assertEqual(
            [(line.level, line.message) for line in self.host.logs],
            [
                ("trace", "t"),
                ("debug", "d"),
                ("info", "i"),
                ("warn", "w"),
                ("warn", "w2"),
                ("error", "boom"),
            ],
        )
        self.assertEqual({line.context for line in self.host.logs}, {__name__})
        log.info("x", context="billing")
        self.assertEqual(self.host.logs[-1].context, "billing")
        self.assertEqual(self.host.log_messages("warn"), ["w", "w2"])

    def test_stdlib_logging_goes_to_the_host(self):
        logger = logging.getLogger("shop.orders")
        logger.propagate = False
        self.addCleanup(setattr, logger, "propagate", True)
        handler = log.install(logging.DEBUG, logger)
        self.addCleanup(logger.removeHandler, handler)
        self.assertIs(log.install(logging.DEBUG, logger), handler)  # once
        logger.debug("stock %d", 3)
        logger.info("ok")
        logger.warning("low")
        logger.critical("down")
        try:
            raise KeyError("sku")
        except KeyError:
            logger.exception("lookup failed")
        levels = [(line.level, line.context) for line in self.host.logs]
        self.assertEqual(
            levels,
            [
                ("debug", "shop.orders"),
                ("info", "shop.orders"),
                ("warn", "shop.orders"),
                ("critical", "shop.orders"),
                ("error", "shop.orders"),
            ],
        )
        self.assertEqual(self.host.logs[0].message, "stock 3")
        self.assertIn("Traceback", self.host.logs[-1].message)
        self.assertIn("KeyError: 'sku'", self.host.logs[-1].message)
        self.assertEqual(log.level_of(5), "trace")


if __name__ == "__main__":
    unittest.main()
