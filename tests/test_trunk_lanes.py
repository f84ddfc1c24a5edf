"""The trunk's scheduler (trunk.py, Scheduling) on real sockets: a light stream's frame overtakes
the bulk frames queued before it while the kernel refuses more, and no stream's bytes are ever
reordered.  A sending Trunk on a socketpair whose far end the test reads (or not) by hand with
the mux decoder; plain socketpairs for the streams; a real Loop.  Bounded in passes and time.
"""

from __future__ import annotations

import os
import socket

from anywhere import mux
from anywhere.loop import Loop
from anywhere.trunk import Stream, Trunk

from looptest import drive


def test_a_light_stream_overtakes_queued_bulk_and_no_stream_is_reordered():
    loop = Loop()
    a, far = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    far.setblocking(False)
    trunk = Trunk(loop, a, b"", name="lanes")
    bulk_near, bulk_far = socket.socketpair()
    light_near, light_far = socket.socketpair()
    for s in (bulk_far, light_far):
        s.setblocking(False)
    bulk, light = Stream(trunk, 1, name="bulk"), Stream(trunk, 3, name="light")
    bulk.attach(bulk_near, read_now=False)
    light.attach(light_near, read_now=False)
    blob = os.urandom(900 * 1024)  # within the first window: no credit needed
    fed = [0]

    def feed() -> None:
        if fed[0] < len(blob):
            try:
                fed[0] += bulk_far.send(blob[fed[0]:fed[0] + 262144])
            except BlockingIOError:
                return
            if fed[0] == len(blob):
                bulk_far.shutdown(socket.SHUT_WR)
    try:
        # nobody reads the trunk: the kernel refuses, the bulk lane fills
        drive(loop, lambda: trunk.backlogged and len(trunk.out) >= 2, "a backlogged trunk with bulk queued", feed=feed)
        in_lane = sum(len(frame) - mux.HEADER_SIZE for frame in trunk.out)
        handed = bulk.nbytes_in - in_lane  # bulk payload handed to TLS before the light bytes come
        light_far.sendall(b"keystroke")
        drive(loop, lambda: light.nbytes_in == 9, "the light stream to read its bytes")
        assert trunk.urgent, "the light stream's frame went to the bulk lane"

        decoder = mux.MuxDecoder()
        got: dict[int, bytearray] = {1: bytearray(), 3: bytearray()}
        bulk_before_light = None

        def read_some() -> None:
            nonlocal bulk_before_light
            try:
                data = far.recv(262144)
            except BlockingIOError:
                return
            for kind, sid, payload in decoder.feed(memoryview(data)):
                if kind == mux.DATA:
                    if sid == 3 and bulk_before_light is None:
                        bulk_before_light = len(got[1])
                    got[sid] += payload
        drive(loop, lambda: bulk_before_light is not None, "the light frame to arrive", feed=read_some)
        # FIFO would have delivered every bulk byte queued before it first
        assert bulk_before_light <= handed < bulk.nbytes_in, (bulk_before_light, handed, bulk.nbytes_in)
        assert bytes(got[3]) == b"keystroke"

        drive(loop, lambda: len(got[1]) == len(blob), "every bulk byte", seconds=30,
               feed=lambda: (feed(), read_some()))
        assert bytes(got[1]) == blob  # in order, nothing lost
    finally:
        trunk.close("test over")
        loop.close()
        for s in (far, bulk_far, light_far):
            s.close()


def test_a_stream_stays_small_after_what_server_and_agent_set_on_it():
    """Memory per idle tunneled connection (bench metric f) is mostly its two Streams.  CPython keeps
    an instance's attributes in a compact table shared with its class up to a limit (29 here);
    one attribute more and every stream's __dict__ grows from about 0.3 KiB to 1.5 KiB: metric f
    went from 3.3 to 4.2-5.2 KiB per connection.  New per-stream state belongs on the class, in
    an existing attribute, or in __slots__, not in one more instance attribute."""
    import sys

    loop = Loop()
    a, far = socket.socketpair()
    near, plain_far = socket.socketpair()
    try:
        trunk = Trunk(loop, a, b"", name="size")
        stream = Stream(trunk, trunk.new_stream_id(), name="client 127.0.0.1:1")
        stream.on_ready, stream.on_fail = (lambda: None), (lambda reason: None)  # the server's
        stream.on_first_byte, stream.dialer = (lambda s: None), None  # the server's, the agent's
        stream.send_window = mux.EARLY_WINDOW
        stream.attach(near, read_now=False)
        plain_far.sendall(b"x" * 100)
        drive(loop, lambda: stream.nbytes_in == 100, "the stream to read its client's bytes")
        size = sys.getsizeof(stream.__dict__)
        assert size < 1024, f"a Stream's __dict__ is {size} bytes with {len(stream.__dict__)} attributes"
        trunk.close("test over")
    finally:
        loop.close()
        for s in (far, plain_far, near):
            s.close()


def test_a_slow_trunk_keeps_its_short_queue_and_its_urgent_lane_when_the_kernel_takes_everything():
    """A trunk found slow (its far end reads at ~2 MB/s) keeps its short queue limits once its queue
    has emptied, and a keystroke then still takes the urgent lane.  Before: an empty queue meant
    the fast limits (a 1 MiB queue) and light streams only counted as light while the kernel
    refused, so the keystroke took the bulk lane and waited behind up to 1 MiB (metric h: echo p99
    of 0.4-0.8 s on a 40 Mbit/s link).  Mechanism, not timing: the lanes are what is asserted."""
    import time

    from anywhere.trunk import HIGH

    loop = Loop()
    a, far = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    far.setblocking(False)
    trunk = Trunk(loop, a, b"", name="slow")
    bulk_near, bulk_far = socket.socketpair()
    light_near, light_far = socket.socketpair()
    bulk_far.setblocking(False)
    bulk, light = Stream(trunk, 1, name="bulk"), Stream(trunk, 3, name="light")
    bulk.attach(bulk_near, read_now=False)
    light.attach(light_near, read_now=False)
    blob = os.urandom(800 * 1024)  # within the first window
    fed, drained, paced = [0], [0], [time.monotonic()]

    def feed() -> None:
        if fed[0] < len(blob):
            try:
                fed[0] += bulk_far.send(blob[fed[0]:fed[0] + 65536])
            except BlockingIOError:
                pass

    def read_paced() -> None:  # about 2 MB/s: a slow link
        now = time.monotonic()
        if now - paced[0] >= 0.01:
            paced[0] = now
            try:
                drained[0] += len(far.recv(20000))
            except BlockingIOError:
                pass

    def read_all() -> None:
        try:
            while True:
                drained[0] += len(far.recv(262144))
        except BlockingIOError:
            pass
    try:
        drive(loop, lambda: trunk.slow, "the trunk to find itself slow", seconds=10,
              feed=lambda: (feed(), read_paced()))
        drive(loop, lambda: fed[0] == len(blob) and not trunk.out_bytes and not trunk.backlogged,
              "the queue to empty", seconds=30, feed=lambda: (feed(), read_all()))
        assert trunk.slow
        assert trunk.high < HIGH, f"an empty queue gave the slow trunk the fast limits again ({trunk.high})"
        light_far.sendall(b"keystroke")
        drive(loop, lambda: light.nbytes_in == 9, "the light stream to read its bytes", feed=read_all)
        assert light.bulk_mark == 0, "the keystroke took the bulk lane"
    finally:
        trunk.close("test over")
        loop.close()
        for s in (far, bulk_far, light_far):
            s.close()
