"""An aiohttp application served on 127.0.0.1 (a free port) from its own event loop in a background
thread, for tests that need a local HTTP server next to the synth subprocess they drive.

Subclasses implement `routes(app)`, and optionally `startup()` / `cleanup()` coroutines run inside
the server's loop (for example to open and close a client session)."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class LoopbackServer:
    def __init__(self) -> None:
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def startup(self) -> None:
        pass

    async def cleanup(self) -> None:
        pass

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(30), f"{type(self).__name__} did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        self.routes(app)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._loop.run_until_complete(self.startup())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.cleanup())
        self._loop.run_until_complete(runner.cleanup())
