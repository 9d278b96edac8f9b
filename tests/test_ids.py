"""Record ids: random version-4 UUIDs, unique, and never shared with a forked worker."""

from __future__ import annotations

import os
import uuid

from shadowproxy.models import Exchange, random_ids


def test_ids_are_version_4_uuids_in_text_and_bytes() -> None:
    for _ in range(1100):  # past two refills of the buffer
        new_id = random_ids.next()
        assert isinstance(new_id, uuid.UUID)
        assert new_id.version == 4 and new_id.variant == uuid.RFC_4122
        assert uuid.UUID(str(new_id)) == new_id == uuid.UUID(bytes=new_id.bytes)


def test_ids_do_not_repeat() -> None:
    ids = [random_ids.next() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)


def test_exchange_request_id_is_its_id_unless_the_client_sent_one() -> None:
    ex = Exchange("r", 0.0, "GET", "/", "", [], None, None)
    assert ex.request_id == str(ex.id)
    assert Exchange("r", 0.0, "GET", "/", "", [], None, "abc").request_id == "abc"


def test_a_forked_child_does_not_reuse_the_parents_buffered_ids() -> None:
    random_ids.next()  # the buffer now holds ids the parent will hand out next
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        try:
            os.write(write, random_ids.next().bytes)
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    upcoming = {random_ids.next().bytes for _ in range(600)}
    assert len(child) == 16 and child not in upcoming
