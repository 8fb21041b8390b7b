// meshtoll's dashboard: the only script. Pages work without it; with it, every element
// marked data-refresh="<seconds>" is replaced by its newer version from the same page.
"use strict";
(function () {
  const live = document.querySelectorAll("[data-refresh][id]");
  if (live.length === 0) return;
  const seconds = Math.max(1, Number(live[0].dataset.refresh) || 5);
  async function refresh() {
    try {
      const answer = await fetch(window.location.href, { credentials: "same-origin", cache: "no-store" });
      if (!answer.ok || answer.redirected) return; // signed out: keep what is shown
      const page = new DOMParser().parseFromString(await answer.text(), "text/html");
      for (const element of document.querySelectorAll("[data-refresh][id]")) {
        const newer = page.getElementById(element.id);
        if (newer) element.replaceWith(document.adoptNode(newer));
      }
    } catch (error) {
      // The admin port restarting: try again at the next tick.
    } finally {
      window.setTimeout(refresh, seconds * 1000);
    }
  }
  window.setTimeout(refresh, seconds * 1000);
})();
