"""One run per client at a time: the lock, on SQLite (a file beside the store) and PostgreSQL
(an advisory lock), and that it dies with its process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from convsync.locks import Busy, client_lock
from convsync.store import Store


def test_a_second_run_of_a_client_is_refused_and_another_client_is_not(url: str) -> None:
    with Store.open(url) as store, Store.open(url) as other:
        with client_lock(store, "acme", "push"):
            with pytest.raises(Busy, match=r"acme|advisory"), client_lock(other, "acme", "push"):
                pass
            with client_lock(other, "zeta", "push"), client_lock(other, "acme", "pull"):
                pass
        with client_lock(other, "acme", "push"):  # released when the first run ended
            pass


def test_the_lock_dies_with_a_killed_process(url: str) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from convsync.locks import client_lock
        from convsync.store import Store
        with Store.open({url!r}) as store, client_lock(store, "acme", "push"):
            print("held", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with Store.open(url) as store:
            with pytest.raises(Busy), client_lock(store, "acme", "push"):
                pass
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10)
            deadline = time.monotonic() + 10
            while True:  # PostgreSQL notices the dead session within moments
                try:
                    with client_lock(store, "acme", "push"):
                        break
                except Busy:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
    finally:
        holder.kill()
        holder.wait(timeout=10)
