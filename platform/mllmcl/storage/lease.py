"""One driver per run: a lease file (``lease.json`` in the run folder) names the driver that
holds the run, and is renewed while it runs.

A second driver on the same run id is refused, naming the holder (host, PID, since when),
instead of both training and writing the same run. A lease whose driver is gone is taken
over: at once when the holder was on this host and its process no longer exists (a driver
killed with SIGKILL and resubmitted here), else once it has not been renewed for
``ttl_s`` seconds (a driver on a node that died). The lease is written, then read back
after a moment: of two drivers starting at once only the one whose lease stayed proceeds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from mllmcl.errors import ConfigError
from mllmcl.storage import fs
from mllmcl.storage.layout import RunLayout

log = logging.getLogger(__name__)

SETTLE_S = 0.2  # between writing the lease and reading it back


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class RunLease:
    def __init__(self, layout: RunLayout, ttl_s: float = 60.0):
        self.uri = layout.path("lease.json")
        self.run_id = layout.run_id
        self.ttl_s = ttl_s
        self.me = {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                   "since": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _held_by_other(self) -> dict | None:
        """The lease of another driver that still holds the run, else None."""
        if not fs.exists(self.uri):
            return None
        try:
            lease = fs.read_json(self.uri)
        except (ValueError, OSError):  # a torn or vanished file: nobody's
            return None
        if lease.get("holder") == self.me["holder"]:
            return None
        if time.time() > float(lease.get("expires", 0)):
            log.warning("run %s: taking over the lease of %s:%s (not renewed for %.0f s)", self.run_id,
                        lease.get("host"), lease.get("pid"), time.time() - float(lease.get("renewed", 0)))
            return None
        if lease.get("host") == self.me["host"] and not _alive(int(lease.get("pid", -1))):
            log.warning("run %s: taking over the lease of PID %s on this host (the process is gone)", self.run_id,
                        lease.get("pid"))
            return None
        return lease

    def _write(self) -> None:
        now = time.time()
        fs.write_json(self.uri, {**self.me, "renewed": now, "expires": now + self.ttl_s})

    def _refuse(self, lease: dict) -> None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("since", 0))))
        raise ConfigError([f"run {self.run_id!r} is held by another driver: PID {lease.get('pid')} on "
                           f"{lease.get('host')} since {since} (lease {self.uri}, renewed every "
                           f"{self.ttl_s / 3:.0f} s). Wait for it to finish, stop it, or use another run.id; a lease "
                           f"of a driver that died is taken over once it is {self.ttl_s:.0f} s old (at once on the "
                           f"same host)"])

    def acquire(self) -> "RunLease":
        if self.ttl_s <= 0:
            return self
        other = self._held_by_other()
        if other is not None:
            self._refuse(other)
        self._write()
        time.sleep(SETTLE_S)
        now = fs.read_json(self.uri)
        if now.get("holder") != self.me["holder"]:  # another driver wrote after us: it holds the run
            self._refuse(now)
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                other = self._held_by_other()
                if other is not None:
                    log.error("run %s: the lease was taken over by PID %s on %s while this driver ran (it was not "
                              "renewed in time); two drivers may now write this run", self.run_id, other.get("pid"),
                              other.get("host"))
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - storage unreachable for a while: try again next period
                log.warning("run %s: lease not renewed (%s: %s)", self.run_id, type(e).__name__, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.ttl_s <= 0:
            return
        try:
            if self._held_by_other() is None and fs.exists(self.uri) and \
                    fs.read_json(self.uri).get("holder") == self.me["holder"]:
                fs.delete(self.uri)
        except (ValueError, OSError) as e:  # the storage is down (what ended the run, likely): the lease
            # is taken over at once from this host, and by any other once it has expired
            log.warning("run %s: lease not released (%s: %s)", self.run_id, type(e).__name__, e)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
