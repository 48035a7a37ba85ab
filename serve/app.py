"""The Flask application of `serve` (``create_app``): three pages, the JSON API they read, and its server.

Pages are Jinja templates (autoescaped) that their scripts (``static/*.js``) fill from the API, so a
script gets the answers the pages show: ``/`` (search), ``/video/<id>``, ``/queries``; the API is
``/api/status``, ``/api/search?q=&k=&mode=``, ``/api/video/<id>``, ``/api/queries`` and
``/api/thumbnail/<id>/<index>``. A bad request is a 400 (404 for an unknown video, thumbnail or page)
with one line saying why: ``{"error": ...}`` under ``/api/``, plain text elsewhere. Every answer
carries a content security policy allowing only this server's own scripts, styles and images.

The server is Werkzeug's threaded ``make_server`` (``make_app_server``; ``BackgroundServer`` runs it in a
thread for tests and benchmarks): a local, single-user tool, bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from flask import Flask, Response, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from core.errors import UsageError
from serve.engine import Engine, NotFoundError

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
log = logging.getLogger(__name__)


def create_app(engine: Engine) -> Flask:
    """The application answering from ``engine`` (templates and static files beside this module)."""
    app = Flask(__name__)
    app.json.sort_keys = False  # keep each answer's own order (results best first, ids before numbers)

    def one_line(message: str, status: int) -> Response:
        message = " ".join(str(message).split())
        if request.path.startswith("/api/"):
            return Response(json.dumps({"error": message}) + "\n", status, mimetype="application/json")
        return Response(message + "\n", status, mimetype="text/plain")

    @app.errorhandler(UsageError)
    def bad_request(exc: UsageError) -> Response:
        return one_line(str(exc), 400)

    @app.errorhandler(NotFoundError)
    def not_found(exc: NotFoundError) -> Response:
        return one_line(str(exc.args[0] if exc.args else exc), 404)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return one_line(f"{exc.code} {exc.name}: {request.path}" if exc.code == 404 else f"{exc.code} {exc.name}",
                        exc.code or 500)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("serve: %s %s failed", request.method, request.path)
        return one_line(f"internal error: {type(exc).__name__}: {exc}", 500)

    @app.after_request
    def secure(resp: Response) -> Response:
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def page(template: str, **context: Any) -> str:
        return render_template(template, status=engine.status(), has_queries=bool(len(engine.data.caption_ids)),
                               **context)

    def video_links(item: dict) -> dict:
        """``item`` (a result or a nearest video) with the URLs of its page and thumbnails."""
        known = item.pop("in_store", item.get("split") is not None)
        count = item.pop("thumbnails")
        vid = item["video_id"]
        item["url"] = url_for("video_page", video_id=vid) if known else None
        item["thumbnails"] = [url_for("api_thumbnail", video_id=vid, index=i) for i in range(count)]
        return item

    # -- pages ---------------------------------------------------------------------------------
    @app.get("/")
    def search_page() -> str:
        return page("search.html")

    @app.get("/video/<path:video_id>")
    def video_page(video_id: str) -> str:
        engine.row(video_id)
        return page("video.html", video_id=video_id)

    @app.get("/queries")
    def queries_page() -> str:
        if not len(engine.data.caption_ids):
            raise NotFoundError(f"split {engine.split!r} has no captions with a known video: no queries page")
        return page("queries.html")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return app.send_static_file("icon.svg")

    # -- the API -------------------------------------------------------------------------------
    @app.get("/api/status")
    def api_status() -> Any:
        return engine.status()

    @app.get("/api/search")
    def api_search() -> Any:
        args = request.args
        answer = engine.search(args.get("q", ""), args.get("k"), args.get("mode"))
        answer["results"] = [video_links(r) for r in answer["results"]]
        return answer

    @app.get("/api/video/<path:video_id>")
    def api_video(video_id: str) -> Any:
        answer = engine.video(video_id)
        for t in answer["thumbnails"]:
            t["url"] = url_for("api_thumbnail", video_id=video_id, index=t["index"])
        answer["nearest"] = [video_links(n) for n in answer["nearest"]]
        return answer

    @app.get("/api/queries")
    def api_queries() -> Any:
        answer = dict(engine.queries())
        answer["queries"] = [{**q, "video_url": url_for("video_page", video_id=q["video_id"]),
                              "search_url": url_for("search_page", q=q["text"]) if q["text"] else None}
                             for q in answer["queries"]]
        return answer

    @app.get("/api/thumbnail/<path:video_id>/<int:index>")
    def api_thumbnail(video_id: str, index: int) -> Response:
        resp = Response(engine.thumbnail(video_id, index), mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    return app


class QuietHandler(WSGIRequestHandler):
    """Werkzeug's request handler without a log line per request (tests, benchmarks)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def make_app_server(app: Flask, host: str = "127.0.0.1", port: int = 8080, quiet: bool = False) -> BaseWSGIServer:
    """Werkzeug's threaded server for ``app`` on ``host:port`` (port 0: a free one, ``server.port``)."""
    return make_server(host, port, app, threaded=True, request_handler=QuietHandler if quiet else None)


def server_url(server: BaseWSGIServer) -> str:
    host = server.host
    return f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}"


class BackgroundServer:
    """``app`` served on ``host`` (a free port by default) from a daemon thread until ``close()``; a context
    manager. ``url`` is where it answers."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> None:
        self.server = make_app_server(app, host, port, quiet=quiet)
        self.url = server_url(self.server)
        self.thread = threading.Thread(target=self.server.serve_forever, name="serve", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
