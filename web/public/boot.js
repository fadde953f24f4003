// Before the app's bundle, in the oldest JavaScript: a browser that cannot run the bundle (too old to parse it, or
// missing what it uses at its start) or a bundle that did not load left the page at "Signing in…" for ever, its
// Generate button disabled, nothing said (a review). The bundle marks the page as started as it runs (src/main.ts);
// once the page has loaded without that mark, this says why instead.
window.addEventListener("load", function () {
  if (document.documentElement.getAttribute("data-started")) return;
  document.getElementById("who").textContent = "Not signed in: the app could not start";
  document.getElementById("no-jobs").hidden = true;
  document.getElementById("form-error").textContent =
    "The app could not start in this browser: it may be too old for the app (use a current Chrome, Edge, " +
    "Firefox or Safari), or the page did not load in full (reload it).";
});
