"""Exec shim: `python -I -S _pdeathsig.py PARENT_PID BINARY ARGS...`.

Asks the kernel to SIGKILL this process when the thread that spawned it dies (PR_SET_PDEATHSIG), then
execs llama-server in place (same pid; the setting survives exec). This is the "no orphans" guarantee
when the wrapper itself is SIGKILLed, which no handler in the wrapper can catch.

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


def main() -> None:
    parent, argv = int(sys.argv[1]), sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        sys.stderr.write(f"wrapper: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}\n")
    if os.getppid() != parent:
        # The wrapper died between fork and prctl: the death signal was armed too late to fire.
        os._exit(1)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
