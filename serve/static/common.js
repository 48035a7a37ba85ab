// Helpers the pages share. Every text from the server goes in through textContent, every URL is one the
// API gave; nothing is ever parsed as HTML.
"use strict";

window.serve = (function () {
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  async function getJSON(url) {
    const resp = await fetch(url, {headers: {"Accept": "application/json"}});
    let body;
    try {
      body = await resp.json();
    } catch (err) {
      body = {error: resp.status + " " + resp.statusText};
    }
    return {ok: resp.ok, body: body};
  }

  function thumbnails(urls, alt) {
    const box = el("div", "thumbs");
    if (!urls.length) box.appendChild(el("div", "no-thumb", "no thumbnail"));
    urls.forEach(function (url, i) {
      const img = el("img");
      img.src = url;
      img.alt = alt + " frame " + (i + 1);
      box.appendChild(img);
    });
    return box;
  }

  // one video as a card: thumbnails, its id (a link to its page when it has one) and lines of details
  function videoCard(item, lines) {
    const card = el("article", "card");
    card.dataset.videoId = item.video_id;
    card.appendChild(thumbnails(item.thumbnails, item.video_id));
    const title = el("div", "video-id");
    if (item.url) {
      const a = el("a", null, item.video_id);
      a.href = item.url;
      title.appendChild(a);
    } else {
      title.textContent = item.video_id;
    }
    card.appendChild(title);
    lines.forEach(function (line) { card.appendChild(el("div", "meta", line)); });
    return card;
  }

  function setState(state) { document.body.dataset.state = state; }

  // a page's data: the API's answer (state "done" once draw(body) has run), or its error line in #message
  async function loadPage(url, draw, onError) {
    setState("loading");
    const got = await getJSON(url);
    if (!got.ok) {
      if (onError) onError();
      document.getElementById("message").textContent = got.body.error;
      setState("error");
      return;
    }
    draw(got.body);
    setState("done");
  }

  return {el: el, getJSON: getJSON, videoCard: videoCard, setState: setState, loadPage: loadPage};
})();
