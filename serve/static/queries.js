// The queries page: every caption of the split with its video's rank before and after re-ranking.
"use strict";

(function () {
  const S = window.serve;
  const main = document.getElementById("queries");
  const body = document.querySelector("#queries-table tbody");
  const sortButton = document.getElementById("sort-change");
  let rows = [];
  let order = "none";

  function pct(x) { return (100 * x).toFixed(1) + "%"; }

  function draw() {
    const shown = rows.slice();
    if (order !== "none") {
      const sign = order === "desc" ? -1 : 1;
      shown.sort(function (a, b) { return sign * ((a.change || 0) - (b.change || 0)); });
    }
    body.replaceChildren();
    shown.forEach(function (r) {
      const tr = S.el("tr");
      tr.dataset.captionId = r.caption_id;
      const text = S.el("td", "caption-text");
      if (r.search_url) {
        const a = S.el("a", null, r.text);
        a.href = r.search_url;
        text.appendChild(a);
      } else {
        text.textContent = r.caption_id + " (text unknown)";
      }
      tr.appendChild(text);
      const video = S.el("td");
      const a = S.el("a", null, r.video_id);
      a.href = r.video_url;
      video.appendChild(a);
      tr.appendChild(video);
      tr.appendChild(S.el("td", "num", r.stage_one_rank));
      tr.appendChild(S.el("td", "num", r.reranked_rank === null ? "-" : r.reranked_rank));
      const change = r.change === null ? "-" : (r.change > 0 ? "+" : "") + r.change;
      tr.appendChild(S.el("td", "num change " + (r.change > 0 ? "up" : r.change < 0 ? "down" : ""), change));
      body.appendChild(tr);
    });
    sortButton.textContent = "change" + (order === "desc" ? " ▼" : order === "asc" ? " ▲" : "");
  }

  sortButton.addEventListener("click", function () {
    order = order === "desc" ? "asc" : "desc";
    draw();
  });

  function show(body) {
    const s = body.summary;
    let text = s.captions + " captions of split " + body.split + "; R@1 stage one " + pct(s.stage_one_r1);
    if (s.reranked_r1 !== null) {
      text += ", re-ranked (top " + s.candidates + ") " + pct(s.reranked_r1) + "; " + s.improved +
        " improved, " + s.hurt + " hurt";
    }
    document.getElementById("summary").textContent = text + " (ranked in " + s.seconds.toFixed(1) + " s)";
    rows = body.queries;
    draw();
  }

  S.loadPage(main.dataset.api, show);
})();
