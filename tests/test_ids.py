"""Record ids: time-ordered version-7 UUIDs, unique, and never shared with a forked worker."""

from __future__ import annotations

import os
import time
import uuid

from shadowproxy.models import Exchange, record_ids


def test_ids_are_version_7_uuids_carrying_the_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [record_ids.next() for _ in range(1100)]  # past two refills of the buffer
    after = time.time_ns() // 1_000_000
    for new_id in ids:
        assert isinstance(new_id, uuid.UUID)
        assert new_id.version == 7 and new_id.variant == uuid.RFC_4122
        assert uuid.UUID(str(new_id)) == new_id == uuid.UUID(bytes=new_id.bytes)
        assert before <= int.from_bytes(new_id.bytes[:6], "big") <= after


def test_ids_made_a_millisecond_apart_sort_in_time_order() -> None:
    first = record_ids.next()
    time.sleep(0.002)
    second = record_ids.next()
    assert first < second and str(first) < str(second)


def test_ids_do_not_repeat() -> None:
    ids = [record_ids.next() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)


def test_exchange_request_id_is_its_id_unless_the_client_sent_one() -> None:
    ex = Exchange("r", 0.0, "GET", "/", "", [], None, None)
    assert ex.request_id == str(ex.id)
    assert Exchange("r", 0.0, "GET", "/", "", [], None, "abc").request_id == "abc"


def test_a_forked_child_does_not_reuse_the_parents_buffered_ids() -> None:
    record_ids.next()  # the buffer now holds ids the parent will hand out next
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        try:
            os.write(write, record_ids.next().bytes)
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    upcoming = {record_ids.next().bytes for _ in range(600)}
    assert len(child) == 16 and child not in upcoming
