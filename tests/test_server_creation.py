"""Creating the C server fails cleanly when the process has no descriptor left for its epoll
set or wake-up eventfd: a clear OSError, no crash, and the process goes on (lmw_server_new
checks every step and frees what it made; issue 10, "errors never silent").
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, resource
    from lowmemws import Config
    from lowmemws._c_server import CServer, c_config

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    held = []
    while True:  # use up every descriptor
        try:
            held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    server = CServer()
    try:
        server.open(c_config(Config(max_connections=8), auto_upgrade=True))
    except OSError as exc:
        print("refused:", exc)
    else:
        print("created")
    for fd in held[:4]:  # with room again, the same call works
        os.close(fd)
    CServer().open(c_config(Config(max_connections=8), auto_upgrade=True))
    print("created with room")
    """
)


def test_no_descriptor_left_is_a_clear_oserror_and_the_process_goes_on() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: lowmemws: could not create the server"), lines
    assert lines[1] == "created with room"
