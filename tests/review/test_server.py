"""The review server: page and JSON API, path traversal, host check, concurrent writers, crash safety, ports."""

import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from finetune.cli import cli
from finetune.review.server import ReviewServer, _gui_browser, bind

REPO = Path(__file__).resolve().parents[2]


def rows(run, table="ratings"):
    with sqlite3.connect(run / "feedback.sqlite") as con:
        return con.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def test_page_is_self_contained(server, http):
    status, page = http(server.url, "GET", "/")
    assert status == 200 and b"finetune review" in page
    # Works offline: nothing is fetched from another host (the CSP forbids it as well).
    assert not re.search(rb"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert b"http:" not in page and b"https:" not in page


def test_api_lists_images_and_serves_them(server, http, fake_run):
    status, data = http(server.url, "GET", "/api/images")
    assert status == 200 and data["run"] == "run" and len(data["images"]) == 6
    img = data["images"][0]
    assert img["path"] == "samples/step-000100/0-1.png" and img["verdict"] is None
    keys = ("prompt", "seed", "scale", "checkpoint")
    assert [img[k] for k in keys] == ["a photo of ohwx person", 1, 1.0, "step-000100"]
    assert [s["image"] for s in data["skipped"]] == ["gallery/grid.png", "gallery/20250101-120000/p01/sheet.png"]
    assert data["progress"] == {"total": 6, "rated": 0, "favourites": 0, "rejects": 0,
                                "pairs_compared": 0, "pairs_total": 7}
    status, body = http(server.url, "GET", "/img/samples/step-000100/0-1.png")
    assert status == 200 and body == (fake_run / "samples/step-000100/0-1.png").read_bytes()


def test_nothing_outside_the_run_is_served(server, http, fake_run, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    os.symlink(secret, fake_run / "samples" / "leak.png")
    os.symlink("/", fake_run / "samples" / "root")
    (fake_run / "config.json").write_text("{}")
    server.rescan()
    for path in ["/../../etc/passwd", "/img/../../etc/passwd", "/img/..%2f..%2f..%2fetc%2fpasswd",
                 "/img/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/img/samples/..%2f..%2f..%2f..%2fetc/passwd",
                 "/img//etc/passwd", "/img/%2fetc%2fpasswd", "/img/samples/root/etc/passwd",
                 "/img/samples/leak.png", "/img/config.json", "/img/feedback.sqlite", "/img/samples%00.png",
                 "/etc/passwd", "/img/samples\\..\\..\\x"]:
        status, body = http(server.url, "GET", path)
        assert status in (403, 404), path
        assert b"root:" not in body and body != secret.read_bytes(), path
    # An image swapped for a link to outside after the scan is refused too.
    target = fake_run / "gallery/20250101-120000/p01/scale-0_8-seed1.png"
    target.unlink()
    os.symlink(secret, target)
    assert http(server.url, "GET", "/img/gallery/20250101-120000/p01/scale-0_8-seed1.png")[0] == 403


def test_requests_for_another_host_are_refused(server, http):
    # What a DNS-rebinding page would send: our address, someone else's host name.
    status, data = http(server.url, "GET", "/api/images", headers={"Host": f"evil.example:{server.port}"})
    assert status == 403 and "answers requests for" in data["error"]
    assert http(server.url, "GET", "/", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_rating_via_api(server, http, fake_run):
    path = "samples/step-000100/0-1.png"
    status, data = http(server.url, "POST", "/api/rate", body={"image": path, "verdict": "favourite"})
    assert status == 200 and data["ok"] and data["progress"]["rated"] == 1 and data["progress"]["favourites"] == 1
    assert [(r[3], r[-1]) for r in rows(fake_run)] == [(path, "favourite")]
    status, data = http(server.url, "POST", "/api/compare",
                        body={"a": path, "b": "samples/step-000100/0-2.png", "winner": "b"})
    assert status == 200 and data["progress"]["pairs_compared"] == 1
    # Wrong input: an answer naming the problem, and nothing written.
    bad = [("/api/rate", {"image": path, "verdict": "love"}, 400, "'love' is not one of"),
           ("/api/rate", {"image": "../../etc/passwd", "verdict": "reject"}, 400, "is not an image of this run"),
           ("/api/rate", {"verdict": "reject"}, 400, "give the image's path"),
           ("/api/compare", {"a": path, "b": "samples/step-000100/1-1.png", "winner": "a"}, 400, "different prompts"),
           ("/api/rate", b"{not json", 400, "Expecting property name"),
           ("/api/rate", [1, 2], 400, "must be a JSON object"),
           ("/api/nope", {}, 404, "no such endpoint")]
    for route, body, want, message in bad:
        status, data = http(server.url, "POST", route, body=body)
        assert status == want and message in data["error"], (route, body, data)
    status, data = http(server.url, "POST", "/api/rate", body=b'{"image": "x"}', headers={"Content-Type": "text/plain"})
    assert status == 415
    assert len(rows(fake_run)) == 1 and len(rows(fake_run, "comparisons")) == 1


def test_pairs_come_from_one_prompt_until_all_are_compared(server, http):
    status, first = http(server.url, "GET", "/api/pair")
    a, b = first["pair"]["a"], first["pair"]["b"]
    assert a["prompt"] == b["prompt"] == first["pair"]["prompt"] and a["path"] != b["path"]
    skip = f'["{a["path"]}|{b["path"]}"]'
    status, other = http(server.url, "GET", f"/api/pair?skip={skip}")
    assert {other["pair"]["a"]["path"], other["pair"]["b"]["path"]} != {a["path"], b["path"]}
    seen = set()
    while (pair := http(server.url, "GET", "/api/pair")[1]["pair"]) is not None:
        key = frozenset((pair["a"]["path"], pair["b"]["path"]))
        assert key not in seen
        seen.add(key)
        status, data = http(server.url, "POST", "/api/compare", body={"a": pair["a"]["path"], "b": pair["b"]["path"],
                                                                     "winner": "a"})
        assert status == 200
    assert len(seen) == 7 and data["progress"]["pairs_compared"] == data["progress"]["pairs_total"] == 7
    assert http(server.url, "GET", "/api/pair?skip=nonsense")[0] == 400


def test_concurrent_writers_lose_nothing(server, http, fake_run):
    # Two servers on one run (two `finetune review` processes) and two tabs on each, all writing at once.
    second = ReviewServer(fake_run, 0)
    threading.Thread(target=second.serve_forever, args=(0.05,), daemon=True).start()
    paths = [img.path for img in server.scan.images]
    verdicts = ("favourite", "reject", "neutral")
    acked, errors = [], []

    def writer(url, n):
        for i in range(25):
            try:
                status, data = http(url, "POST", "/api/rate",
                                    body={"image": paths[(n + i) % len(paths)], "verdict": verdicts[(n + i) % 3]})
                assert status == 200, data
                acked.append(data["id"])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(url, n)) for n, url in enumerate([server.url, second.url] * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second.shutdown()
    second.server_close()
    assert errors == []
    assert len(acked) == 100 and sorted(r[0] for r in rows(fake_run)) == sorted(acked)


def test_port_in_use_picks_another_and_says_so(fake_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv, note = bind(fake_run, port)
        srv.server_close()
    assert srv.port != port and note == f"port {port} is in use; using {srv.port} instead"


def test_run_without_samples_is_one_line_error(tmp_path):
    (tmp_path / "empty" / "samples").mkdir(parents=True)
    res = CliRunner().invoke(cli, ["review", str(tmp_path / "empty"), "--no-browser"])
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert res.output.startswith(f"error: nothing to review in {tmp_path / 'empty'}: no sample images under samples/")
    assert not (tmp_path / "empty" / "feedback.sqlite").exists()
    res = CliRunner().invoke(cli, ["review", str(tmp_path / "missing"), "--no-browser"])
    assert res.exit_code == 1 and res.output == f"error: run folder {tmp_path / 'missing'} not found: give an " \
                                               "outputs/<run> folder written by `finetune train`\n"


def test_no_browser_without_a_display(monkeypatch):
    for var in ("BROWSER", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    if sys.platform.startswith("linux"):
        assert _gui_browser() is False


class Review:
    """`python -m finetune review RUN` as a child process, its output read line by line."""

    def __init__(self, run, port=0):
        self.proc = subprocess.Popen([sys.executable, "-m", "finetune", "review", str(run), "--no-browser",
                                      "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def wait_for(self, pattern, timeout=30):
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            seen.append(line)
            if m := re.search(pattern, line):
                return m, seen
        raise AssertionError(f"no line matching {pattern!r} in {seen}")


def test_killed_server_keeps_acknowledged_ratings(fake_run, http):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        first = Review(fake_run, port)
        try:
            m, seen = first.wait_for(r"at (http://127\.0\.0\.1:(\d+)/)")
            assert f"port {port} is in use; using {m.group(2)} instead\n" in seen
            paths = [img["path"] for img in http(m.group(1), "GET", "/api/images")[1]["images"]]
            for path, verdict in zip(paths[:5], ["favourite", "reject", "favourite", "neutral", "reject"]):
                assert http(m.group(1), "POST", "/api/rate", body={"image": path, "verdict": verdict})[0] == 200
            pair = {"a": paths[0], "b": paths[1], "winner": "a"}
            assert http(m.group(1), "POST", "/api/compare", body=pair)[0] == 200
        finally:
            first.proc.kill()  # SIGKILL: no clean-up, no checkpoint of the WAL
            first.proc.wait()
    assert first.proc.returncode == -signal.SIGKILL
    second = Review(fake_run)
    try:
        m, _ = second.wait_for(r"\((\d+) rated\) at (http://\S+)")
        assert m.group(1) == "5"
        images = http(m.group(2), "GET", "/api/images")[1]["images"]
        assert [img["verdict"] for img in images[:5]] == ["favourite", "reject", "favourite", "neutral", "reject"]
        second.proc.send_signal(signal.SIGINT)
        assert second.wait_for(r"stopped: 5 of 6 rated, 1 pair compared")
        assert second.proc.wait(timeout=10) == 0
    finally:
        second.proc.kill()
    assert len(rows(fake_run)) == 5 and len(rows(fake_run, "comparisons")) == 1


def test_sigterm_stops_with_the_summary_and_exit_143(fake_run):
    server = Review(fake_run)
    try:
        server.wait_for(r"at http://127\.0\.0\.1:\d+/")
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_for(r"stopped: 0 of 6 rated, 0 pairs compared")
        assert server.proc.wait(timeout=10) == 143
    finally:
        server.proc.kill()


def _interrupted(self):
    raise KeyboardInterrupt


def test_skipped_pngs_are_said_once_per_reason(fake_run, monkeypatch):
    """Each `finetune sample` leaves a contact sheet per prompt: a run sampled a few times printed a line
    (and a page paragraph) per sheet, the same reason each time. Now one line per reason names a few."""
    import shutil

    from finetune.review import server as review_server
    from finetune.review.images import skipped_lines

    sheet = fake_run / "gallery" / "20250101-120000" / "p01" / "sheet.png"
    for n in range(2, 6):
        (sheet.parent.parent / f"p{n:02d}").mkdir()
        shutil.copy(sheet, sheet.parent.parent / f"p{n:02d}" / "sheet.png")
    reason = "a contact sheet of several images (`finetune sample` writes each image on its own too)"
    monkeypatch.setattr(review_server.ReviewServer, "serve_forever", _interrupted)
    said = []
    review_server.review(fake_run, open_browser=False, echo=said.append)
    assert [line for line in said if line.startswith("skipped")] == [
        "skipped 1 PNG, no generation settings (no A1111 `parameters` text chunk): gallery/grid.png",
        f"skipped 5 PNGs, {reason}: gallery/20250101-120000/p01/sheet.png, gallery/20250101-120000/p02/sheet.png, "
        "gallery/20250101-120000/p03/sheet.png and 2 more"]
    assert skipped_lines([]) == []


def test_the_page_gets_the_skipped_lines(server, http):
    status, data = http(server.url, "GET", "/api/images")
    assert status == 200 and data["skipped_lines"] == [
        "skipped 1 PNG, no generation settings (no A1111 `parameters` text chunk): gallery/grid.png",
        "skipped 1 PNG, a contact sheet of several images (`finetune sample` writes each image on its own too): "
        "gallery/20250101-120000/p01/sheet.png"]
    page = (REPO / "finetune" / "review" / "page.html").read_text()
    assert "say(r.skipped_lines.join" in page
