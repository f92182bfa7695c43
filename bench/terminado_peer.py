"""terminado as a peer for bench/efficiency.py: a fresh PTY per websocket.

    .venv/bin/python bench/terminado_peer.py PORT RUNTIME HOME

Serves ``/websocket`` on 127.0.0.1:PORT with terminado's
``UniqueTermManager``: every connection gets its own PTY running the console
runtime's IPython with the argv of shellserver.sandbox.spec (the environment
is this process's, which efficiency.py sets to the spec's). Prints ``ready``
once listening. terminado is installed by ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import asyncio
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

import tornado.web  # noqa: E402
from terminado import TermSocket, UniqueTermManager  # noqa: E402

from shellserver.sandbox.spec import console_argv  # noqa: E402


async def serve(port: int, runtime: str, home: str) -> None:
    manager = UniqueTermManager(
        shell_command=list(console_argv(runtime)),
        term_settings={"type": os.environ.get("TERM", "xterm-256color"), "cwd": home})
    app = tornado.web.Application([(r"/websocket", TermSocket, {"term_manager": manager})])
    app.listen(port, address="127.0.0.1")
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await manager.shutdown()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
