"""The request event loop (berth._loop.PollLoop), with fake pollables on a
fake clock in place of wasi:io/poll."""

import asyncio
import unittest

from berth._loop import PollLoop


class Clock:
    def __init__(self):
        self.now = 0.0


class FakePollable:
    """Ready once the clock reaches `at`; records its drop."""

    def __init__(self, clock, at, name=""):
        self.clock, self.at, self.name = clock, at, name
        self.dropped = False

    def ready(self):
        return self.clock.now >= self.at

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        assert not self.dropped, f"{self.name} dropped twice"
        self.dropped = True


class Harness:
    def __init__(self):
        self.clock = Clock()
        self.polls = []
        self.errors = []
        self.loop = PollLoop(self.poll, self.timer, lambda: self.clock.now, self.errors.append)

    def poll(self, pollables):
        assert pollables, "poll with nothing to wait for"
        assert not any(p.dropped for p in pollables), "poll on a dropped pollable"
        self.polls.append(len(pollables))
        # Time passes a little on each poll, and jumps to the first pollable
        # that gets ready when none is.
        self.clock.now += 0.001
        if not any(p.ready() for p in pollables):
            self.clock.now = min(p.at for p in pollables)
        return [i for i, p in enumerate(pollables) if p.ready()]

    def timer(self, seconds):
        return FakePollable(self.clock, self.clock.now + seconds, "timer")

    def pollable(self, at, name=""):
        return FakePollable(self.clock, at, name)


class PollLoopTest(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.loop = self.h.loop
        self.addCleanup(self.loop.close)

    def test_waits_run_concurrently_and_drop_their_pollables(self):
        a, b = self.h.pollable(5, "a"), self.h.pollable(3, "b")

        async def waiter(p, result):
            await self.loop.wait(p)
            return (result, self.h.clock.now)

        async def main():
            return await asyncio.gather(waiter(a, "a"), waiter(b, "b"))

        (ra, ta), (rb, tb) = self.loop.run_until_complete(main())
        self.assertEqual((ra, rb), ("a", "b"))
        self.assertGreaterEqual(ta, 5)
        self.assertGreaterEqual(tb, 3)
        self.assertLess(ta, 5.1)  # both waited at once: 5 s, not 8
        self.assertTrue(a.dropped and b.dropped)
        self.assertFalse(self.loop.is_running())

    def test_sleep_and_the_running_loop(self):
        async def main():
            self.assertIs(asyncio.get_running_loop(), self.loop)
            await asyncio.sleep(2)
            return self.loop.time()

        self.assertGreaterEqual(self.loop.run_until_complete(main()), 2)
        with self.assertRaises(RuntimeError):
            asyncio.get_running_loop()

    def test_timeouts_cancel_the_wait_and_drop_the_pollable(self):
        slow = self.h.pollable(10, "slow")

        async def main():
            await asyncio.wait_for(self.loop.wait(slow), timeout=1)

        with self.assertRaises(asyncio.TimeoutError):
            self.loop.run_until_complete(main())
        self.assertTrue(slow.dropped)
        self.assertLess(self.h.clock.now, 2)

    def test_a_task_that_keeps_yielding_does_not_starve_a_wait(self):
        p = self.h.pollable(0.01, "p")
        done = []

        async def spinner():
            while not done:
                await asyncio.sleep(0)

        async def waiter():
            await self.loop.wait(p)
            done.append(True)

        async def main():
            await asyncio.gather(spinner(), waiter())

        self.loop.run_until_complete(main())
        self.assertTrue(p.dropped)

    def test_tasks_left_running_are_cancelled_and_unwound(self):
        forever = self.h.pollable(float("inf"), "forever")
        unwound = []

        async def background():
            try:
                await self.loop.wait(forever)
            finally:
                unwound.append(True)

        async def main():
            asyncio.get_running_loop().create_task(background())
            await asyncio.sleep(0)
            return "answer"

        self.assertEqual(self.loop.run_until_complete(main()), "answer")
        self.assertEqual(unwound, [True])
        self.assertTrue(forever.dropped)

    def test_exceptions_propagate(self):
        async def main():
            await asyncio.sleep(0)
            raise ValueError("bad")

        with self.assertRaisesRegex(ValueError, "bad"):
            self.loop.run_until_complete(main())

    def test_waiting_for_what_never_comes_is_an_error_not_a_hang(self):
        async def main():
            await asyncio.get_running_loop().create_future()

        with self.assertRaisesRegex(RuntimeError, "can never happen"):
            self.loop.run_until_complete(main())

    def test_failing_callbacks_reach_the_error_handler(self):
        def fail():
            raise KeyError("x")

        async def main():
            self.loop.call_soon(fail)
            await asyncio.sleep(0)
            await asyncio.sleep(0)

        self.loop.run_until_complete(main())
        (context,) = self.h.errors
        self.assertIsInstance(context["exception"], KeyError)

    def test_cancelled_timers_do_not_run(self):
        ran = []

        async def main():
            handle = self.loop.call_later(1, ran.append, "early")
            self.loop.call_later(2, ran.append, "late")
            handle.cancel()
            await asyncio.sleep(3)

        self.loop.run_until_complete(main())
        self.assertEqual(ran, ["late"])

    def test_a_closed_loop_refuses_to_run(self):
        self.loop.close()
        coro = asyncio.sleep(0)
        with self.assertRaisesRegex(RuntimeError, "closed"):
            self.loop.run_until_complete(coro)
        coro.close()


if __name__ == "__main__":
    unittest.main()
