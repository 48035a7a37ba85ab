"""`python cli.py serve` on the tiny synthetic world (its train split, where the tiny stage one finds some captions'
videos first): the real server on 127.0.0.1 answers searches with the
right video first, its ranks agree with an independent stage-one similarity, a headless Chromium shows the
results with every image loaded and toggles to exactly the API's order, a hostile caption and video id are
shown as text, bad requests are one line, and no request reads a file outside the store."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

import cli
from helpers import chrome_driver, run_cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_TEXT = '<script>window.pwned=1</script><img src=x onerror="window.pwned=1"> & "quoted"'
HOSTILE_ID = "syn_5<img src=y onerror=window.pwned=2>&'"
CANDIDATES = 3
SPLIT = "train"  # the tiny stage one (one epoch on the micro encoder's random features) ranks no test caption first


@pytest.fixture(scope="module")
def world(tiny_world: dict, tiny_runs: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny world's train split as a store of its own, with a hostile caption text and a hostile video
    id, laid out as a work dir (stores/, synthetic/manifest) so the server finds its manifest beside it.
    The store is extracted without its last video, indexed (``old-index``), then grown by it: that index
    no longer covers the store."""
    from manifests.schema import Manifest

    _, _, s1, s2 = tiny_runs
    root = tmp_path_factory.mktemp("serve_world")
    m = Manifest.read(tiny_world["manifest"]).split(SPLIT)
    vids, caps = m.videos, m.captions
    renamed = vids.column("video_id").to_pylist()[5]
    vids = vids.set_column(0, "video_id", pa.array([HOSTILE_ID if v == renamed else v
                                                    for v in vids.column("video_id").to_pylist()]))
    cv = [HOSTILE_ID if v == renamed else v for v in caps.column("video_id").to_pylist()]
    texts = caps.column("text").to_pylist()
    texts[0] = HOSTILE_TEXT
    caps = caps.set_column(caps.column_names.index("video_id"), "video_id", pa.array(cv))
    caps = caps.set_column(caps.column_names.index("text"), "text", pa.array(texts))
    last = vids.column("video_id").to_pylist()[-1]
    first = Manifest(vids.filter(pc.not_equal(vids.column("video_id"), last)),
                     caps.filter(pc.not_equal(caps.column("video_id"), last)), m.root, m.dataset, dict(m.source))
    store = root / "stores" / "synthetic-hostile.zarr"
    extract = ["extract", "--work-dir", root, "--encoder", "test-vit-micro", "--store", store, "--frames", "4",
               "--shard-size", "8", "--workers", "1", "--manifest"]
    run_cli(extract + [first.write(root / "manifest-before")])
    run_cli(["index", "build", "--store", store, "--stage-one", s1, "--split", SPLIT, "--work-dir",
             root / "serve-work", "--out", root / "old-index"])
    manifest = Manifest(vids, caps, m.root, m.dataset, dict(m.source)).write(root / "synthetic" / "manifest")
    run_cli(extract + [manifest])
    return {"root": root, "store": store, "manifest": manifest, "s1": s1, "s2": s2, "old_index": root / "old-index",
            "hostile_video": cv[0], "texts": dict(zip(caps.column("caption_id").to_pylist(), texts))}


@pytest.fixture(scope="module")
def served(world: dict):
    """The real server (Werkzeug's threaded one, 127.0.0.1, a free port) over an engine with the head,
    working in another work dir than the store's."""
    from serve.app import BackgroundServer, create_app
    from serve.engine import load_engine
    from workflows.workdir import WorkDir

    engine = load_engine(WorkDir(world["root"] / "serve-work"), str(world["store"]), world["s1"], world["s2"],
                         split=SPLIT, candidates=CANDIDATES, device="cpu")
    with BackgroundServer(create_app(engine)) as server:
        yield {"engine": engine, "url": server.url}


def get(url: str, path: str) -> tuple[int, str, str]:
    """``(status, content type, body)`` of GET ``path`` sent as given (no normalisation of the path)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def api(served: dict, path: str, **params) -> dict:
    status, kind, body = get(served["url"], path + ("?" + urllib.parse.urlencode(params) if params else ""))
    assert status == 200 and kind.startswith("application/json"), (status, body)
    return json.loads(body)


def stage_one_sim(world: dict, engine) -> np.ndarray:
    """The split's (C, V) stage-one similarity, computed apart from the server (``stage_one_scores``)."""
    from heads.evaluation.sources import stage_one_scores

    return stage_one_scores(str(world["s1"]), engine.data).sim


# ------------------------------------------------------------------------------------------ the API
def test_a_caption_finds_its_video_first_and_ranks_agree(world: dict, served: dict) -> None:
    engine = served["engine"]
    data = engine.data
    sim = stage_one_sim(world, engine)
    cv = np.asarray(data.caption_video)
    status = api(served, "/api/status")
    n = len(data.video_ids)
    assert status["videos"] == n == 14 and status["split"] == SPLIT and status["candidates"] == CANDIDATES
    assert status["texts"] and status["index_freshness"] is None and status["default_mode"] == "reranked"
    # stage one's ranks over the whole split, as the queries page gives them, are the similarity's
    queries = api(served, "/api/queries")["queries"]
    assert [q["caption_id"] for q in queries] == list(data.caption_ids)
    for c, q in enumerate(queries):
        assert q["stage_one_rank"] == 1 + int(np.sum(sim[c] > sim[c, cv[c]]))
        assert q["video_id"] == data.video_ids[cv[c]] and q["text"] == world["texts"][q["caption_id"]]
        assert 1 <= q["reranked_rank"] <= len(data.video_ids) and q["change"] == q["stage_one_rank"] - q["reranked_rank"]
        if q["stage_one_rank"] > CANDIDATES:  # re-ranking only permutes the top K
            assert q["reranked_rank"] == q["stage_one_rank"]
    firsts = [c for c in range(len(cv)) if int(np.argmax(sim[c])) == cv[c] and data.caption_ids[c] != data.caption_ids[0]]
    assert firsts, "no caption of the tiny world has its video first by stage one"
    c = firsts[0]
    text = world["texts"][data.caption_ids[c]]
    one = api(served, "/api/search", q=text, k=n, mode="stage-one")
    assert one["results"][0]["video_id"] == data.video_ids[cv[c]]
    assert [r["stage_one_rank"] for r in one["results"]] == list(range(1, n + 1))
    for r in one["results"]:  # the query encoded as the store encoded its caption: the same cosines
        assert r["stage_one_score"] == pytest.approx(float(sim[c, data.video_ids.index(r["video_id"])]), abs=1e-4)
        assert r["score"] == r["stage_one_score"] and r["split"] == SPLIT and len(r["thumbnails"]) == 3
    assert set(one["timings_ms"]) == {"text encoder", "index", "stage one", "re-ranking", "thumbnails", "total"}
    # re-ranked: the top K by cosine + head score, the rest in stage one's order; each rank stated
    rr = api(served, "/api/search", q=text, k=n, mode="reranked")
    assert [r["reranked_rank"] for r in rr["results"]] == list(range(1, n + 1))
    top = rr["results"][:CANDIDATES]
    assert sorted(r["stage_one_rank"] for r in top) == list(range(1, CANDIDATES + 1))
    assert [r["final_score"] for r in top] == sorted((r["final_score"] for r in top), reverse=True)
    for r in top:
        assert r["final_score"] == pytest.approx(r["stage_one_score"] + r["head_score"], abs=1e-5)
    assert [r["stage_one_rank"] for r in rr["results"][CANDIDATES:]] == list(range(CANDIDATES + 1, n + 1))
    by_id = {r["video_id"]: r for r in rr["results"]}
    assert all(by_id[r["video_id"]]["reranked_rank"] == r["reranked_rank"] for r in one["results"])
    assert rr["results"][0]["reranked_rank"] == 1 and one["results"][0]["stage_one_rank"] == 1
    # a video: its thumbnails (JPEGs from the store) with their times, its captions, its nearest videos
    vid = data.video_ids[cv[c]]
    video = api(served, f"/api/video/{urllib.parse.quote(vid, safe='')}")
    times = [t["time"] for t in video["thumbnails"]]
    assert len(times) == 3 and times == sorted(times) and all(t is not None for t in times)
    assert [x["caption_id"] for x in video["captions"]] == [data.caption_ids[i] for i in np.flatnonzero(cv == cv[c])]
    assert text in [x["text"] for x in video["captions"]]
    assert len(video["nearest"]) == 8 and vid not in [v["video_id"] for v in video["nearest"]]
    status, kind, body = get(served["url"], video["thumbnails"][0]["url"])
    assert status == 200 and kind == "image/jpeg"


def test_bad_requests_are_one_line_and_nothing_outside_the_store_is_read(served: dict, monkeypatch) -> None:
    engine = served["engine"]
    reads: list = []
    real = engine.store.thumbnails
    monkeypatch.setattr(engine.store, "thumbnails", lambda rows: reads.append(list(rows)) or real(rows))
    engine._thumbs.clear()
    cases = [("/api/search?q=", 400, "q: the query is empty"),
             ("/api/search?q=%20%20", 400, "q: the query is empty"),
             ("/api/search?q=a&k=ten", 400, "k: must be an integer from 1 to 100, got 'ten'"),
             ("/api/search?q=a&k=0", 400, "k: must be an integer from 1 to 100, got 0"),
             ("/api/search?q=a&k=101", 400, "got 101"),
             ("/api/search?q=a&mode=best", 400, "mode: must be one of stage-one, reranked, got 'best'"),
             ("/api/search?q=" + "a" * 1001, 400, "at most 1000"),
             ("/api/video/nope", 404, "no video 'nope' in split 'train'"),
             ("/video/nope", 404, "no video 'nope'"),
             ("/api/thumbnail/nope/0", 404, "no video 'nope'"),
             ("/api/thumbnail/..%2F..%2Fetc%2Fpasswd/0", 404, "no video '../../etc/passwd'"),
             ("/api/thumbnail/../../etc/passwd/0", 404, ""),
             ("/api/thumbnail/%2e%2e/%2e%2e/etc/passwd/0", 404, ""),
             ("/video/../../x", 404, ""),
             ("/static/../engine.py", 404, ""),
             ("/static/..%2Fengine.py", 404, ""),
             ("/api/nothing", 404, "404 Not Found")]
    for path, code, says in cases:
        status, kind, body = get(served["url"], path)
        assert status == code, (path, status, body)
        assert body.count("\n") == 1 and body.endswith("\n") and len(body) < 400, (path, body)
        assert "root:" not in body and "import" not in body, path
        line = json.loads(body)["error"] if kind.startswith("application/json") else body.strip()
        assert says in line, (path, line)
        if path.startswith("/api/"):
            assert kind.startswith("application/json"), path
    assert not reads, f"requests read thumbnails: {reads}"
    engine._thumbs.clear()  # and the spy sees a read that does happen
    assert get(served["url"], f"/api/thumbnail/{urllib.parse.quote(HOSTILE_ID, safe='')}/0")[0] == 200
    assert reads == [[int(engine.store_row[engine.row(HOSTILE_ID)])]]
    vid = engine.data.video_ids[1]
    status, _, body = get(served["url"], f"/api/thumbnail/{vid}/3")
    assert status == 404 and f"video {vid!r} has no thumbnail 3 (3 in the store)" in body
    conn = http.client.HTTPConnection(*urllib.parse.urlsplit(served["url"]).netloc.split(":"))
    conn.request("POST", "/api/search?q=a")
    resp = conn.getresponse()
    assert resp.status == 405 and resp.read().decode().count("\n") == 1
    conn.close()


def test_without_a_head_stage_one_alone(world: dict, served: dict) -> None:
    from serve.app import BackgroundServer, create_app
    from serve.engine import load_engine
    from workflows.workdir import WorkDir

    engine = load_engine(WorkDir(world["root"] / "serve-work"), str(world["store"]), world["s1"], split=SPLIT,
                         device="cpu")
    with BackgroundServer(create_app(engine)) as server:
        status, _, body = get(server.url, "/api/search?q=a+star&mode=reranked")
        assert status == 400 and "needs a stage-two head" in body
        answer = json.loads(get(server.url, "/api/search?q=a+star&k=4")[2])
        assert answer["mode"] == "stage-one" and len(answer["results"]) == 4
        assert all(r["reranked_rank"] is None and r["head_score"] is None for r in answer["results"])
        assert "re-ranking" not in answer["timings_ms"]
        with_head = api(served, "/api/search", q="a star", k=4, mode="stage-one")
        assert [r["video_id"] for r in answer["results"]] == [r["video_id"] for r in with_head["results"]]
        queries = json.loads(get(server.url, "/api/queries")[2])
        assert all(q["reranked_rank"] is None for q in queries["queries"])


def test_an_index_the_store_has_moved_on_from_still_answers_and_says_so(world: dict) -> None:
    from markupsafe import escape

    from serve.app import BackgroundServer, create_app
    from serve.engine import load_engine
    from workflows.workdir import WorkDir

    engine = load_engine(WorkDir(world["root"] / "serve-work"), str(world["store"]), world["s1"], split=SPLIT,
                         index=world["old_index"], device="cpu")
    with BackgroundServer(create_app(engine)) as server:
        line = json.loads(get(server.url, "/api/status")[2])["index_freshness"]
        assert line.startswith(f"index {world['old_index']} covers 13 of the store's 14 {SPLIT} videos")
        assert line.endswith(f"run `python cli.py index add --index {world['old_index']}`")
        status, _, html = get(server.url, "/")
        assert status == 200
        assert f'<p class="warning" id="freshness">{escape(line)}</p>' in html  # shown on every page
        answer = json.loads(get(server.url, "/api/search?q=a+star&k=20")[2])
        assert len(answer["results"]) == 13  # the index's videos
        new = next(v for v in engine.data.video_ids if v not in engine.index.video_ids)
        video = json.loads(get(server.url, f"/api/video/{urllib.parse.quote(new, safe='')}")[2])
        assert video["nearest"] == [] and not video["in_index"] and len(video["thumbnails"]) == 3


# ------------------------------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def browser(chromium: dict, tmp_path_factory: pytest.TempPathFactory):
    driver = chrome_driver(chromium, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, url: str) -> None:
    """Load ``url`` and wait until its script has drawn the API's answer (``body[data-state=done]``)."""
    driver.get(url)
    wait_done(driver)


def wait_done(driver, timeout: float = 60.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.state") in
                                         ("done", "error"))
    assert driver.execute_script("return document.body.dataset.state") == "done", \
        driver.execute_script("return document.getElementById('message').textContent")


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def shown_order(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('#results .card'))"
                                 ".map(c => c.dataset.videoId)")


def test_the_search_page_in_chromium(world: dict, served: dict, browser, tmp_path: Path) -> None:
    engine = served["engine"]
    texts = [world["texts"][c] for c in engine.data.caption_ids[1:]]
    answers = {}
    for text in texts:  # a query whose re-ranked order differs from stage one's
        answers = {m: [r["video_id"] for r in api(served, "/api/search", q=text, mode=m)["results"]]
                   for m in ("stage-one", "reranked")}
        if answers["stage-one"] != answers["reranked"]:
            break
    assert answers["stage-one"] != answers["reranked"], "the head re-orders no caption's top 3"
    open_page(browser, served["url"] + "/?" + urllib.parse.urlencode({"q": text}))
    assert browser.find_element("id", "q").get_attribute("value") == text
    assert shown_order(browser) == answers["reranked"]  # the default with a head
    state = browser.execute_script(
        "return Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, () => false)))"
        ".then(() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]))")
    assert len(state) == 3 * len(answers["reranked"]) == 3 * 10
    assert not [alt for alt, complete, width in state if not complete or width <= 0]
    cards = browser.execute_script("return Array.from(document.querySelectorAll('#results .card')).map(c => c.innerText)")
    assert "stage one #" in cards[0] and "re-ranked #1" in cards[0] and f"{SPLIT} · cosine " in cards[0]
    timings = browser.find_element("id", "timings").text
    assert "stage one" in timings and "re-ranking" in timings and "ms" in timings
    # the toggle: exactly the API's order of each mode
    for mode in ("stage-one", "reranked", "stage-one"):
        browser.execute_script("document.body.dataset.state = 'idle'")
        browser.find_element("css selector", f"#mode button[data-mode='{mode}']").click()
        wait_done(browser)
        assert shown_order(browser) == answers[mode], mode
        assert browser.find_element("css selector", f"#mode button[data-mode='{mode}']").get_attribute(
            "aria-pressed") == "true"
    assert "mode=stage-one" in browser.current_url
    assert browser.save_screenshot(str(tmp_path / "serve.png"))
    assert not console_errors(browser), console_errors(browser)
    png = (tmp_path / "serve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_hostile_captions_and_ids_are_text(world: dict, served: dict, browser) -> None:
    engine = served["engine"]
    for vid in (world["hostile_video"], HOSTILE_ID):
        open_page(browser, served["url"] + "/video/" + urllib.parse.quote(vid, safe=""))
        assert browser.execute_script("return typeof window.pwned") == "undefined"
        assert browser.find_element("id", "video-id").text == vid
        assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"], img[src=\"y\"], "
                                      "main script').length") == 0
        if vid == world["hostile_video"]:
            shown = browser.execute_script("return Array.from(document.querySelectorAll('#captions .caption-text'))"
                                           ".map(s => s.textContent)")
            assert HOSTILE_TEXT in shown and len(shown) == 3  # the train split: three captions a video
    assert HOSTILE_ID in engine.data.video_ids
    open_page(browser, served["url"] + "/queries")
    assert browser.execute_script("return typeof window.pwned") == "undefined"
    rows = browser.execute_script("return Array.from(document.querySelectorAll('#queries-table tbody tr'))"
                                  ".map(tr => Array.from(tr.cells).map(td => td.textContent))")
    assert len(rows) == len(engine.data.caption_ids)
    assert [HOSTILE_TEXT, world["hostile_video"]] in [r[:2] for r in rows]
    assert any(r[1] == HOSTILE_ID for r in rows)
    # sortable by the change, and each caption links to its search
    browser.find_element("id", "sort-change").click()
    changes = [int(r[4]) for r in browser.execute_script(
        "return Array.from(document.querySelectorAll('#queries-table tbody tr')).map(tr => Array.from(tr.cells)"
        ".map(td => td.textContent))")]
    assert changes == sorted(changes, reverse=True)
    link = browser.execute_script("return Array.from(document.querySelectorAll('#queries-table a'))"
                                  ".find(a => a.textContent.startsWith('<script>')).href")
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["q"] == [HOSTILE_TEXT]
    open_page(browser, link)  # the hostile caption as a query: in the box as text, results drawn
    assert browser.find_element("id", "q").get_attribute("value") == HOSTILE_TEXT
    assert browser.execute_script("return typeof window.pwned") == "undefined" and shown_order(browser)
    assert HOSTILE_ID in shown_order(browser)
    assert not console_errors(browser), console_errors(browser)


# ------------------------------------------------------------------------------------------ the command
def test_the_command_serves_and_refuses_bad_options(world: dict) -> None:
    base = ["serve", "--store", world["store"], "--stage-one", world["s1"], "--work-dir", world["root"] / "serve-work",
            "--split", SPLIT, "--device", "cpu"]
    res = CliRunner().invoke(cli.main, [str(a) for a in base + ["--port", "70000"]])
    assert res.exit_code == 2 and "--port must be from 0 to 65535, got 70000" in res.output
    res = CliRunner().invoke(cli.main, [str(a) for a in base + ["--top", "0"]])
    assert res.exit_code == 2 and "--top must be from 1 to 100, got 0" in res.output
    res = CliRunner().invoke(cli.main, [str(a) for a in base], default_map={"serve": {"host": "0.0.0.0"}})
    assert res.exit_code == 2 and "--host 0.0.0.0: a non-loopback address must be given on the command line" in res.output
    proc = subprocess.Popen([sys.executable, "cli.py", *map(str, base), "--head", str(world["s2"]), "--port", "0",
                             "--candidates", str(CANDIDATES)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving split"):
                break
        assert lines and lines[-1].startswith("serving split 'train' (14 videos) on http://127.0.0.1:"), lines
        assert any("note: --head is now --stage-two" in line for line in lines), lines
        url = lines[-1].split(" on ")[1].split()[0]
        status, _, body = get(url, "/api/status")
        assert status == 200 and json.loads(body)["stage_two"].endswith("stage_two.pt")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_demo_prints_a_serve_command_the_cli_accepts(tmp_path: Path) -> None:
    """The demo's last line: ``serve`` with its store, stage one, head and work dir, quoted for a shell."""
    import shlex

    from workflows.experiments import serve_command
    from workflows.workdir import WorkDir

    s1, s2 = tmp_path / "runs a" / "stage_one.pt", tmp_path / "runs a" / "stage_two.pt"
    for p in (s1, s2):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    line = serve_command(WorkDir(tmp_path / "w"), "s3://bucket/x.zarr", s1, s2)
    argv = shlex.split(line)
    assert argv[:3] == ["python", "cli.py", "serve"]
    ctx = cli.main.commands["serve"].make_context("serve", argv[3:])
    assert ctx.params["store"] == "s3://bucket/x.zarr" and ctx.params["stage_two"] == str(s2)
    assert ctx.params["work_dir"] == str(tmp_path / "w") and ctx.params["stage_one"] == str(s1)
