// A video's page: its thumbnails with their times, its captions, its nearest videos by stage one.
"use strict";

(function () {
  const S = window.serve;
  const main = document.getElementById("video");

  function show(v) {
    const frames = document.getElementById("frames");
    if (!v.thumbnails.length) frames.appendChild(S.el("p", "note", "the store holds no thumbnails of this video"));
    v.thumbnails.forEach(function (t) {
      const fig = S.el("figure");
      const img = S.el("img");
      img.src = t.url;
      img.alt = v.video_id + " frame " + (t.index + 1);
      fig.appendChild(img);
      fig.appendChild(S.el("figcaption", null, t.time === null ? "frame " + (t.index + 1) : t.time.toFixed(2) + " s"));
      frames.appendChild(fig);
    });
    const captions = document.getElementById("captions");
    if (!v.captions.length) captions.appendChild(S.el("li", "note", "no captions in this split"));
    v.captions.forEach(function (c) {
      const li = S.el("li", "caption");
      li.appendChild(S.el("span", "caption-text", c.text === null ? "(text unknown: give serve --manifest)" : c.text));
      li.appendChild(S.el("span", "caption-id", c.caption_id));
      captions.appendChild(li);
    });
    const nearest = document.getElementById("nearest");
    if (!v.in_index) nearest.appendChild(S.el("p", "note", "this video is not in the index yet (see above)"));
    v.nearest.forEach(function (n) {
      nearest.appendChild(S.videoCard(n, ["cosine " + n.score.toFixed(3)]));
    });
  }

  S.loadPage(main.dataset.api, show);
})();
