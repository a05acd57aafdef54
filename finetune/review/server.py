"""`finetune review RUN`: a local web page to rate a run's sample images, ratings kept in SQLite.

Standard library only (http.server, one thread per request). The server listens on 127.0.0.1, answers only
requests addressed to that host (so a web page elsewhere cannot reach it through DNS rebinding), takes
writes only as JSON (which a cross-site form cannot send), and serves nothing but the page and the run's
review images.

API (JSON):
  GET  /api/images                     {"run", "images": [image + "verdict"], "skipped", "progress"}
  GET  /api/pair?skip=["a|b", ...]     {"pair": {"prompt", "a", "b"} or null, "progress"}
  GET  /api/progress                   {"total", "rated", "favourites", "rejects", "pairs_compared", "pairs_total"}
  POST /api/rate     {"image", "verdict": favourite|reject|neutral}   -> {"ok", "id", "progress"}
  POST /api/compare  {"a", "b", "winner": a|b|tie}                    -> {"ok", "id", "progress"}
  GET  /img/<path in the run>          the PNG
A rating is answered only after it is committed to disk.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import random
import signal
import sys
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from finetune.errors import FinetuneError, Stopped
from finetune.review.images import REVIEW_DIRS, ReviewImage, Scan, scan_run, skipped_lines
from finetune.ratings import DB_NAME, Store, progress
from finetune.words import plural

HOST = "127.0.0.1"
MAX_BODY = 64 * 1024


class ReviewServer(ThreadingHTTPServer):
    """The review site of one run; `serve_forever()` answers requests until shut down."""

    daemon_threads = True

    def __init__(self, run: Path, port: int = 0):
        self.run = Path(run).resolve()
        self._cache: dict = {}
        self._lock = threading.Lock()
        scan = self.rescan()
        if not scan.images:
            extra = (f" ({plural(len(scan.skipped), 'PNG')} without generation settings, e.g. {scan.skipped[0][0]})"
                     if scan.skipped else "")
            raise FinetuneError(f"nothing to review in {run}: no sample images under samples/ or gallery/{extra}; "
                                f"training writes them every sample.every steps, or make some with `finetune sample {run}`")
        self.store = Store(self.run / DB_NAME)
        self.page = files("finetune.review").joinpath("page.html").read_bytes()
        super().__init__((HOST, port), Handler)
        self.port = self.server_address[1]
        self.url = f"http://{HOST}:{self.port}/"
        self.hosts = {f"{HOST}:{self.port}", f"localhost:{self.port}"}

    def rescan(self) -> Scan:
        """Look at the run again (samples are added while training goes on); unchanged files are not re-read."""
        with self._lock:
            self.scan = scan_run(self.run, self._cache)
            self.by_path = {img.path: img for img in self.scan.images}
            return self.scan

    def image(self, path) -> ReviewImage:
        """The image at `path` (relative to the run) as it is on disk now; ValueError if it is not one to review."""
        if not isinstance(path, str):
            raise ValueError("give the image's path in the run, e.g. samples/step-000100/0-1.png")
        img = self.by_path.get(path)
        if img is not None:
            try:
                st = os.stat(self.run / path)
                changed = self._cache.get(path, (None, None))[:2] != (st.st_mtime_ns, st.st_size)
            except OSError:
                changed = True
        if img is None or changed:  # new since the last scan, or rewritten: rate what is on disk now
            self.rescan()
            img = self.by_path.get(path)
        if img is None:
            raise ValueError(f"{path!r} is not an image of this run to review")
        return img

    def progress(self, scan: Scan | None = None) -> dict:
        return progress((scan or self.scan).images, self.store.verdicts(), self.store.compared())

    def next_pair(self, skip: set[frozenset]) -> dict | None:
        """An uncompared pair of images of one prompt, favouring images compared least so far."""
        scan = self.rescan()
        compared = self.store.compared()
        counts: dict[tuple, int] = {}
        for pair in compared:
            for key in pair:
                counts[key] = counts.get(key, 0) + 1
        by_prompt: dict[str, list[ReviewImage]] = {}
        for img in scan.images:
            by_prompt.setdefault(img.prompt, []).append(img)
        best, best_score = [], None
        for group in by_prompt.values():
            for i, a in enumerate(group):
                for b in group[i + 1:]:
                    ka, kb = (a.path, a.sha256), (b.path, b.sha256)
                    if frozenset({ka, kb}) in compared or frozenset({a.path, b.path}) in skip:
                        continue
                    score = counts.get(ka, 0) + counts.get(kb, 0)
                    if best_score is None or score < best_score:
                        best, best_score = [(a, b)], score
                    elif score == best_score:
                        best.append((a, b))
        if not best:
            return None
        a, b = random.choice(best)
        if random.random() < 0.5:  # no side bias from folder order
            a, b = b, a
        return {"prompt": a.prompt, "a": a.to_json(), "b": b.to_json()}


class Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "finetune-review"

    def log_message(self, format, *args):  # the terminal shows the URL and errors, not every request
        pass

    # ------------------------------------------------------------ responses
    def send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, obj, status: int = 200):
        self.send(status, json.dumps(obj).encode(), "application/json")

    def fail(self, status: HTTPStatus, message: str):
        self.send_json({"error": message}, status)

    def allowed_host(self) -> bool:
        host = self.headers.get("Host")
        if host is None or host in self.server.hosts:
            return True
        self.fail(HTTPStatus.FORBIDDEN, f"this server answers requests for {self.server.url} only")
        return False

    # ------------------------------------------------------------ GET
    def do_GET(self):
        if not self.allowed_host():
            return
        url = urlsplit(self.path)
        route = url.path
        if route in ("/", "/index.html"):
            self.send(200, self.server.page, "text/html; charset=utf-8", {
                # Inline script and style only: the page loads nothing from anywhere else.
                "Content-Security-Policy": "default-src 'none'; img-src 'self'; connect-src 'self'; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'"})
        elif route == "/api/images":
            scan = self.server.rescan()
            verdicts = self.server.store.verdicts()
            images = [{**img.to_json(), "verdict": verdicts.get((img.path, img.sha256))} for img in scan.images]
            self.send_json({"run": self.server.run.name, "images": images,
                            "skipped": [{"image": p, "reason": r} for p, r in scan.skipped],
                            "skipped_lines": skipped_lines(scan.skipped),
                            "progress": self.server.progress(scan)})
        elif route == "/api/progress":
            self.send_json(self.server.progress(self.server.rescan()))
        elif route == "/api/pair":
            try:
                skip = {frozenset(s.split("|", 1)) for s in json.loads(parse_qs(url.query).get("skip", ["[]"])[0])}
            except (ValueError, TypeError, AttributeError):
                return self.fail(HTTPStatus.BAD_REQUEST, 'skip must be a JSON list of "path|path" strings')
            pair = self.server.next_pair(skip)
            self.send_json({"pair": pair, "progress": self.server.progress()})
        elif route.startswith("/img/"):
            self.send_image(unquote(route[len("/img/"):]))
        else:
            self.fail(HTTPStatus.NOT_FOUND, f"no such page: {route}")

    do_HEAD = do_GET

    def send_image(self, rel: str):
        # Decide on the decoded path: `..%2f` arrives here as `../`.
        norm = posixpath.normpath(rel) if rel else ""
        if "\x00" in rel or "\\" in rel or norm.startswith(("/", "..")) or norm.split("/")[0] not in REVIEW_DIRS:
            return self.fail(HTTPStatus.FORBIDDEN, "only the run's samples/ and gallery/ images are served")
        if norm not in self.server.by_path:
            return self.fail(HTTPStatus.NOT_FOUND, f"no image {norm} to review in this run")
        target = (self.server.run / norm).resolve()
        if not target.is_relative_to(self.server.run):  # a link swapped in after the scan
            return self.fail(HTTPStatus.FORBIDDEN, "only the run's samples/ and gallery/ images are served")
        try:
            body = target.read_bytes()
        except OSError:
            return self.fail(HTTPStatus.NOT_FOUND, f"image {norm} is gone")
        self.send(200, body, "image/png")

    # ------------------------------------------------------------ POST
    def do_POST(self):
        if not self.allowed_host():
            return
        if self.headers.get_content_type() != "application/json":
            return self.fail(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send ratings as application/json")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self.fail(HTTPStatus.BAD_REQUEST, f"a JSON body of 1 to {MAX_BODY} bytes is required")
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            route = urlsplit(self.path).path
            if route == "/api/rate":
                row = self.server.store.rate(self.server.image(body.get("image")), body.get("verdict"))
            elif route == "/api/compare":
                a, b = self.server.image(body.get("a")), self.server.image(body.get("b"))
                row = self.server.store.compare(a, b, body.get("winner"))
            else:
                return self.fail(HTTPStatus.NOT_FOUND, f"no such endpoint: {route}")
        except ValueError as e:  # json.JSONDecodeError is one too
            return self.fail(HTTPStatus.BAD_REQUEST, str(e))
        self.send_json({"ok": True, "id": row, "progress": self.server.progress()})


# ---------------------------------------------------------------- the command


def bind(run: Path, port: int = 0) -> tuple[ReviewServer, str | None]:
    """A server for `run` on `port`, or on a free port (and a note saying so) when that one is taken."""
    try:
        return ReviewServer(run, port), None
    except OSError as e:
        if port == 0 or e.errno not in (errno.EADDRINUSE, errno.EACCES):
            raise FinetuneError(f"cannot listen on {HOST}:{port}: {e.strerror}") from e
        server = ReviewServer(run, 0)
        why = "is in use" if e.errno == errno.EADDRINUSE else "is not allowed"
        return server, f"port {port} {why}; using {server.port} instead"


def _gui_browser() -> bool:
    """Whether webbrowser would open a graphical browser (never a text one that takes over the terminal)."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        return type(webbrowser.get()) is not webbrowser.GenericBrowser  # GenericBrowser: lynx, w3m, ...
    except webbrowser.Error:
        return False


def review(run: Path, *, port: int = 0, open_browser: bool = True, echo=print) -> None:
    """Serve the review page for `run` until Ctrl+C; ratings go to `run`/feedback.sqlite."""
    run = Path(run)
    if not run.is_dir():
        raise FinetuneError(f"run folder {run} not found: give an outputs/<run> folder written by `finetune train`")
    from finetune import runs

    if (run / runs.CONFIG).is_file() and (unfinished := runs.unfinished_note(run)) is not None:
        echo(f"warning: {unfinished}")
    server, note = bind(run, port)
    if note:
        echo(note)
    # SIGTERM (a service manager, `kill`) stops it as Ctrl+C does, with the summary, then exits 143.
    # Installed before the address is printed: whoever reads that line may send it at once.
    terminated = []

    def on_term(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        p = server.progress()
        echo(f"reviewing {plural(p['total'], 'image')} of {run} ({p['rated']} rated) at {server.url}")
        for line in skipped_lines(server.scan.skipped):
            echo(line)
        echo(f"ratings are saved to {server.store.path} as you go; Ctrl+C stops")
        if open_browser and _gui_browser():
            webbrowser.open(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        p = server.progress()
        echo(f"stopped: {p['rated']} of {p['total']} rated, {plural(p['pairs_compared'], 'pair')} compared")
    finally:
        server.server_close()
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if terminated:
        raise Stopped(signal.SIGTERM)
