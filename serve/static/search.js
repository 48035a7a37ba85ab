// The search page: the query box, the ordering toggle, the results grid, each stage's time.
"use strict";

(function () {
  const S = window.serve;
  const main = document.getElementById("search");
  const form = document.getElementById("search-form");
  const q = document.getElementById("q");
  const k = document.getElementById("k");
  const results = document.getElementById("results");
  const timings = document.getElementById("timings");
  const message = document.getElementById("message");
  const toggles = Array.from(document.querySelectorAll("#mode button"));
  const hasHead = main.dataset.hasHead === "yes";
  let mode = main.dataset.defaultMode;

  function showMode() {
    toggles.forEach(function (b) { b.setAttribute("aria-pressed", String(b.dataset.mode === mode)); });
  }

  function render(answer) {
    results.replaceChildren();
    answer.results.forEach(function (r) {
      let scores = (r.split || "not in the store") + " · cosine " + r.stage_one_score.toFixed(3);
      if (r.head_score !== null) scores += " · head " + r.head_score.toFixed(2);
      const lines = [scores];
      if (hasHead) {
        lines.push("stage one #" + r.stage_one_rank + " · re-ranked #" + r.reranked_rank);
      } else {
        lines.push("stage one #" + r.stage_one_rank);
      }
      results.appendChild(S.videoCard(r, lines));
    });
    timings.textContent = Object.entries(answer.timings_ms)
      .map(function (e) { return e[0] + " " + e[1].toFixed(1) + " ms"; }).join(" · ");
    message.textContent = answer.results.length ? "" : "no videos found";
  }

  async function run() {
    const query = q.value.trim();
    if (!query) {
      message.textContent = "type a query";
      return;
    }
    const params = new URLSearchParams({q: query, k: k.value, mode: mode});
    history.replaceState(null, "", "?" + params.toString());
    await S.loadPage(main.dataset.api + "?" + params.toString(), render, function () {
      results.replaceChildren();
      timings.textContent = "";
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    run();
  });
  toggles.forEach(function (b) {
    b.addEventListener("click", function () {
      if (b.disabled || b.dataset.mode === mode) return;
      mode = b.dataset.mode;
      showMode();
      if (q.value.trim()) run();
    });
  });

  const params = new URLSearchParams(window.location.search);
  if (params.get("mode") === "stage-one" || (params.get("mode") === "reranked" && hasHead)) mode = params.get("mode");
  if (params.get("k")) k.value = params.get("k");
  showMode();
  if (params.get("q")) {
    q.value = params.get("q");
    run();
  }
})();
