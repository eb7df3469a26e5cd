"""Exec shim: `python -I -S _pdeathsig.py PARENT_PID BINARY ARGS...`.

Asks the kernel to SIGKILL this process when the thread that spawned it dies (PR_SET_PDEATHSIG), then
execs llama-server in place (same pid; the setting survives exec). This is the "no orphans" guarantee
when the wrapper itself is SIGKILLed, which no handler in the wrapper can catch.

The death signal reaches only this one process. A LLAMA_SERVER_BIN that is a launcher script without
`exec` runs llama-server as its own child, which outlived a `kill -9` of the wrapper and kept the port
(issue 15 item 17). So before the exec a tiny watcher is forked into the same process group: its own
death signal fires when the exec'd process dies, however it dies, and it then SIGKILLs the whole group.

Why a shim and not `preexec_fn`: preexec_fn runs Python between fork and exec, which can deadlock when
other threads hold locks at fork time (CPython documents it as unsafe with threads), and the wrapper
always has threads (log readers, status server). The shim runs in a fresh single-threaded interpreter.
Stdlib only and `-S`, so it starts in milliseconds.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# The watcher's death signal: one nothing else sends it, so only its parent's death can wake it.
_WATCH_SIGNAL = signal.SIGUSR2


def _arm(libc: ctypes.CDLL, sig: int) -> None:
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        sys.stderr.write(f"wrapper: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}\n")


def _watch(libc: ctypes.CDLL, parent: int) -> None:
    """In the forked watcher: wait for the exec'd process to die, then kill what is left of its group."""
    # The group's SIGTERM (a clean stop) and a terminal's signals are for llama-server, not for us.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {_WATCH_SIGNAL})
    # Hold none of the child's pipes: the wrapper's log readers end when the child's output ends.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, 1024)
    _arm(libc, int(_WATCH_SIGNAL))
    if os.getppid() == parent:  # else it died before the death signal was armed
        signal.sigwait({_WATCH_SIGNAL})
    os.killpg(0, signal.SIGKILL)  # ourselves included


def main() -> None:
    parent, argv = int(sys.argv[1]), sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    _arm(libc, int(signal.SIGKILL))
    if os.getppid() != parent:
        # The wrapper died between fork and prctl: the death signal was armed too late to fire.
        os._exit(1)
    me = os.getpid()
    if os.fork() == 0:
        try:
            _watch(libc, me)
        finally:
            os._exit(0)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
