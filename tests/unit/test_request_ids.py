"""Request ids made by the service: 32 hex digits, unique within a process and across forks."""

from __future__ import annotations

import os
import re

from app.api.middleware import new_request_id


def test_ids_are_32_hex_digits_and_never_repeat():
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_process_draws_its_own_ids():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent_ids = {new_request_id() for _ in range(3)}
    assert len(child_id) == 32 and child_id[:16] not in {value[:16] for value in parent_ids}
