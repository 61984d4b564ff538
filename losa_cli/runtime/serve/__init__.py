"""``losa serve``: an OpenAI-compatible HTTP server on the lean decode path.

``server.py`` is the workflow (bind, load, serve), ``app.py`` the routes, ``worker.py`` the one thread
that generates (requests queue for it), ``protocol.py`` OpenAI's request and response shapes.  FastAPI
and uvicorn are imported here only, when a server is built.
"""

from .server import Server, ServeResult, bind, load_server

__all__ = ["ServeResult", "Server", "bind", "load_server"]
