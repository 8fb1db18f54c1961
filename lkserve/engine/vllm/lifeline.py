"""A vLLM child process (the engine core, its workers) exits when the process that started it dies.

Why: vLLM stops its engine core from the frontend (`AsyncLLM.shutdown`, or weakref finalizers at interpreter exit).
When the frontend dies without running them (SIGKILL, the OOM killer, a SIGTERM with the default action) nothing tells
the engine core: it is re-parented to init and keeps the model's memory and its cores busy (seen: 60-75 % CPU per
process, until killed by hand). Its workers watch the engine core (vLLM's death pipe); the engine core watches nobody.

`start()` runs in every vLLM process (the plugin entry point); in a multiprocessing child it starts a daemon thread
that polls the parent pid. When the parent is gone, the thread sends SIGTERM to its own process (vLLM's handler: the
engine core stops its busy loop and its executor, which stops the workers) and exits hard if that has not finished
within `grace_s`. Polling, not PR_SET_PDEATHSIG: that signal fires when the *thread* that forked us exits, and a
frontend may start vLLM from a thread that ends long before the process does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

logger = logging.getLogger("lkserve.engine")

_lock = threading.Lock()
_thread: threading.Thread | None = None


def start(poll_s: float = 1.0, grace_s: float = 15.0) -> bool:
    """Watch the parent from this process (once). False in a process no multiprocessing parent started (the
    frontend: `lkserve serve`, a test process), which its own supervisor is responsible for, or with
    LKSERVE_DISABLE_LIFELINE=1 (to show what happens without it)."""
    global _thread
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None or os.environ.get("LKSERVE_DISABLE_LIFELINE", "0") == "1":
        return False
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_watch, args=(parent.pid, poll_s, grace_s), daemon=True,
                                       name="lkserve-lifeline")
            _thread.start()
    return True


def _watch(parent_pid: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent_pid:  # re-parented (to init or a subreaper) once the parent has died
        time.sleep(poll_s)
    logger.warning("lkserve: parent process %d is gone; stopping %s (pid %d)", parent_pid,
                   multiprocessing.current_process().name, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    logger.warning("lkserve: pid %d did not stop within %.0fs of SIGTERM; exiting", os.getpid(), grace_s)
    os._exit(1)
