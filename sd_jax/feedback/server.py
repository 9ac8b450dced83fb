"""The rating gallery: a local web app (FastAPI on uvicorn) over a preference store (store.py).

  GET  /                      the page: compare two images of a prompt (click, or keys 1 / 2 / t = tie / b = both
                              bad), and a gallery where images can be favourited (f); progress at the top
  GET  /api/progress?rater=R  counts (images, votes, this rater's votes, pairs left, favourites, queued)
  GET  /api/pair?rater=R      two images of one prompt R has not compared: {"prompt", "a": {...}, "b": {...}}, or
                              {"done": true}
  POST /api/vote              {"image_a", "image_b", "choice": "a" | "b" | "tie" | "both_bad", "rater"}
  GET  /api/gallery?offset=&limit=&rater=
  POST /api/favourite         {"image_id", "rater", "favourite": true | false}
  GET  /images/{id}.png       an image, by its id (no path from a request ever reaches the file system)

The server only serves and records; images are drawn by a background worker (worker.py). With a token, every request
carries it (header `Authorization: Bearer T`, `X-Token: T`, or `?token=T`, which the page passes on); bad requests
get a 4xx JSON `{"error": "..."}`, and an unexpected error a 500 with no traceback (the log has it).
"""

import hmac
import html
import logging
import os
from typing import Any, Callable

from sd_jax.feedback import store as store_lib

log = logging.getLogger(__name__)


def create_app(store: store_lib.FeedbackStore, *, token: str | None = None, title: str = "sd_jax ratings",
               queued: Callable[[], int] = lambda: 0):
  """The FastAPI app. `queued`: how many images the worker still has to draw (shown as progress)."""
  from fastapi import FastAPI, Request  # pylint: disable=import-outside-toplevel
  from fastapi.exceptions import RequestValidationError  # pylint: disable=import-outside-toplevel
  from fastapi.responses import FileResponse, HTMLResponse, JSONResponse  # pylint: disable=import-outside-toplevel
  from pydantic import BaseModel, Field  # pylint: disable=import-outside-toplevel
  from starlette.exceptions import HTTPException  # pylint: disable=import-outside-toplevel

  app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

  class VoteIn(BaseModel):
    image_a: int
    image_b: int
    choice: str
    rater: str = Field(min_length=1, max_length=100)

  class FavouriteIn(BaseModel):
    image_id: int
    rater: str = Field(min_length=1, max_length=100)
    favourite: bool = True

  def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)

  @app.middleware("http")
  async def require_token(request: Request, call_next):
    if token is not None:
      given = (request.headers.get("x-token") or request.query_params.get("token")
               or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
      if not given or not hmac.compare_digest(given, token):
        return error(401, "this gallery needs its token: open the URL the server printed (it ends in ?token=...).")
    try:
      return await call_next(request)
    except Exception:  # noqa: BLE001 - the client gets no traceback; the log does
      log.exception("error serving %s", request.url.path)
      return error(500, "internal error (see the server's log)")

  @app.exception_handler(RequestValidationError)
  async def bad_request(request, exc):
    del request
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
    return error(422, f"bad request: {problems}")

  @app.exception_handler(HTTPException)
  async def http_error(request, exc):
    del request
    return error(exc.status_code, str(exc.detail))

  def image_json(image: store_lib.Image, favourites: set[int] = frozenset()) -> dict[str, Any]:
    return {"id": image.id, "url": f"/images/{image.id}.png", "seed": image.seed, "prompt": image.prompt,
            "favourite": image.id in favourites}

  @app.get("/", response_class=HTMLResponse)
  def page():
    return HTMLResponse(PAGE.replace("{{title}}", html.escape(title)))

  @app.get("/api/progress")
  def progress(rater: str = ""):
    return {**store.progress(rater or None), "queued": int(queued())}

  @app.get("/api/pair")
  def pair(rater: str):
    found = store.next_pair(rater)
    if found is None:
      return {"done": True, "queued": int(queued())}
    a, b = found
    return {"done": False, "prompt": a.prompt, "a": image_json(a), "b": image_json(b)}

  @app.post("/api/vote")
  def vote(body: VoteIn):
    try:
      vote_id = store.record_vote(body.image_a, body.image_b, body.choice, body.rater)
    except KeyError as e:
      return error(404, f"unknown image: {e.args[0]}")
    except ValueError as e:
      return error(400, str(e))
    return {"vote_id": vote_id, "progress": store.progress(body.rater)}

  @app.get("/api/gallery")
  def gallery(offset: int = 0, limit: int = 48, rater: str = ""):
    if offset < 0 or not 1 <= limit <= 500:
      return error(400, "offset must be >= 0 and limit in [1, 500].")
    favourites = set(store.favourites(rater)) if rater else set()
    return {"images": [image_json(i, favourites) for i in store.images(offset=offset, limit=limit)]}

  @app.post("/api/favourite")
  def favourite(body: FavouriteIn):
    try:
      store.set_favourite(body.image_id, body.rater, body.favourite)
    except KeyError as e:
      return error(404, f"unknown image: {e.args[0]}")
    except ValueError as e:
      return error(400, str(e))
    return {"ok": True}

  @app.get("/images/{name}")
  def image_file(name: str):
    stem, _, suffix = name.partition(".")
    if suffix != "png" or not stem.isdigit():
      return error(404, f"no image {name!r}: images are /images/<id>.png")
    try:
      record = store.image(int(stem))
      path = store.image_path(record.file)
    except (KeyError, ValueError):
      return error(404, f"no image {name!r}")
    if not os.path.exists(path):
      return error(404, f"image {stem}'s file is missing")
    return FileResponse(path, media_type="image/png")

  return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
 header { display: flex; gap: 1.5em; align-items: baseline; flex-wrap: wrap; }
 nav button, .choices button { font-size: 1em; padding: .4em .9em; margin-right: .3em; cursor: pointer; }
 #prompt { font-size: 1.3em; margin: 1em 0 .5em; }
 .pair { display: flex; gap: 1.5em; flex-wrap: wrap; }
 .pair figure { margin: 0; text-align: center; cursor: pointer; }
 .pair img, .grid img { image-rendering: pixelated; background: #000; border: 3px solid transparent; }
 .pair img { width: 320px; height: 320px; }
 .pair figure:hover img { border-color: #48f; }
 .grid { display: flex; flex-wrap: wrap; gap: .8em; }
 .grid figure { margin: 0; width: 160px; font-size: .8em; }
 .grid img { width: 160px; height: 160px; }
 .grid .fav img { border-color: #e5a000; }
 kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3em; background: #fff; }
 #status { color: #555; }
</style></head>
<body>
<header><h1>{{title}}</h1>
 <label>Rater <input id="rater" size="12"></label>
 <span id="progress">…</span>
 <nav><button id="show-compare">Compare</button><button id="show-gallery">Gallery</button></nav></header>
<main>
 <section id="compare">
  <div id="prompt"></div>
  <div class="pair">
   <figure id="fig-a"><img id="img-a" alt="image 1"><figcaption><kbd>1</kbd> this one</figcaption></figure>
   <figure id="fig-b"><img id="img-b" alt="image 2"><figcaption><kbd>2</kbd> this one</figcaption></figure>
  </div>
  <p class="choices"><button id="tie"><kbd>t</kbd> tie</button><button id="both-bad"><kbd>b</kbd> both bad</button></p>
  <p id="status"></p>
 </section>
 <section id="gallery" hidden><p>Click an image (or hover it and press <kbd>f</kbd>) to favourite it.</p>
  <div class="grid" id="grid"></div><p><button id="more">more</button></p></section>
</main>
<script>
const params = new URLSearchParams(location.search);
const token = params.get("token");
const withToken = (url) => token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
const headers = token ? {"X-Token": token, "Content-Type": "application/json"} : {"Content-Type": "application/json"};
const rater = document.getElementById("rater");
rater.value = params.get("rater") || localStorage.getItem("rater") || "me";
rater.onchange = () => { localStorage.setItem("rater", rater.value); next(); };
let current = null, offset = 0, hovered = null;

async function api(path, body) {
  const response = await fetch(withToken(path), body === undefined ? {headers} :
                               {method: "POST", headers, body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}
async function progress() {
  const p = await api("/api/progress?rater=" + encodeURIComponent(rater.value));
  document.getElementById("progress").textContent =
    `${p.my_votes} rated by you · ${p.votes} votes · ${p.pairs_left} pairs left · ${p.images} images` +
    (p.queued ? ` · ${p.queued} queued` : "") + ` · ${p.favourites} favourites`;
}
async function next() {
  const status = document.getElementById("status");
  try {
    const pair = await api("/api/pair?rater=" + encodeURIComponent(rater.value));
    current = pair.done ? null : pair;
    document.getElementById("prompt").textContent = pair.done ?
      (pair.queued ? "Waiting for images to be drawn…" : "Nothing left to compare. Thank you!") : pair.prompt;
    for (const side of ["a", "b"]) {
      const img = document.getElementById("img-" + side);
      if (current) { img.src = withToken(current[side].url); img.dataset.id = current[side].id; }
      else { img.removeAttribute("src"); delete img.dataset.id; }
    }
    status.textContent = "";
    if (pair.done && pair.queued) setTimeout(next, 2000);
  } catch (e) { status.textContent = e.message; }
  await progress();
}
async function vote(choice) {
  if (!current) return;
  const status = document.getElementById("status");
  try {
    await api("/api/vote", {image_a: current.a.id, image_b: current.b.id, choice, rater: rater.value});
    status.textContent = "recorded: " + choice;
  } catch (e) { status.textContent = e.message; }
  await next();
}
async function loadGallery(reset) {
  if (reset) { offset = 0; document.getElementById("grid").innerHTML = ""; }
  const data = await api(`/api/gallery?offset=${offset}&limit=48&rater=` + encodeURIComponent(rater.value));
  for (const image of data.images) {
    const fig = document.createElement("figure");
    fig.className = image.favourite ? "fav" : "";
    fig.dataset.id = image.id;
    const img = document.createElement("img");
    img.src = withToken(image.url); img.alt = image.prompt;
    const cap = document.createElement("figcaption"); cap.textContent = image.prompt;
    fig.append(img, cap);
    fig.onclick = () => toggle(fig);
    fig.onmouseenter = () => { hovered = fig; };
    document.getElementById("grid").append(fig);
  }
  offset += data.images.length;
}
async function toggle(fig) {
  const favourite = !fig.classList.contains("fav");
  await api("/api/favourite", {image_id: Number(fig.dataset.id), rater: rater.value, favourite});
  fig.classList.toggle("fav", favourite);
  await progress();
}
document.getElementById("fig-a").onclick = () => vote("a");
document.getElementById("fig-b").onclick = () => vote("b");
document.getElementById("tie").onclick = () => vote("tie");
document.getElementById("both-bad").onclick = () => vote("both_bad");
document.getElementById("more").onclick = () => loadGallery(false);
document.getElementById("show-compare").onclick = () => {
  document.getElementById("compare").hidden = false; document.getElementById("gallery").hidden = true; };
document.getElementById("show-gallery").onclick = () => {
  document.getElementById("compare").hidden = true; document.getElementById("gallery").hidden = false;
  loadGallery(true); };
document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT") return;
  const inGallery = !document.getElementById("gallery").hidden;
  if (inGallery && event.key === "f" && hovered) { toggle(hovered); return; }
  const choice = {"1": "a", "2": "b", "t": "tie", "b": "both_bad"}[event.key];
  if (choice && !inGallery) vote(choice);
});
next();
</script></body></html>
"""
