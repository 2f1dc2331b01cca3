"""Run as a script (no package imports): `python launch.py PARENT_PID -- COMMAND...`.

Asks the kernel to send SIGTERM to the training process when the serving worker that started it
dies (PR_SET_PDEATHSIG), then execs the training command. So a worker killed with `kill -9`
never leaves a training job running unsupervised: the job becomes `interrupted` on restart.
"""
import ctypes
import os
import signal
import sys


def main() -> None:
    parent = int(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1 :]
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(143)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
