/* termopar tracker: sends a page view to termopar for each page (and each in-page
 * navigation of a single-page app). Include it with the site's id:
 *   <script async src="https://YOUR-TERMOPAR/t.js" data-site="SITE_ID"></script>
 * Contexts come from window.termoparContext (an array), else from the data-context
 * attribute of <body> or <html> (comma-separated). The user id is a random id kept in
 * localStorage (set window.termoparUser to use your own). No cookies, no dependencies. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || !script.dataset.site) return;
  var site = script.dataset.site;
  var endpoint = new URL("/api/v1/track", script.src).href;

  function userId() {
    if (window.termoparUser) return String(window.termoparUser);
    var key = "termopar_uid", id = null;
    try { id = localStorage.getItem(key); } catch (e) {}
    if (!id) {
      id = window.crypto && crypto.randomUUID ? crypto.randomUUID()
        : Date.now().toString(36) + Math.random().toString(36).slice(2);
      try { localStorage.setItem(key, id); } catch (e) {}
    }
    return id;
  }

  function device() {
    var ua = navigator.userAgent;
    var names = [["Edg/", "Microsoft Edge"], ["OPR/", "Opera"], ["Firefox/", "Mozilla Firefox"],
      ["Chrome/", "Google Chrome"], ["Safari/", "Safari"]];
    for (var i = 0; i < names.length; i++) if (ua.indexOf(names[i][0]) >= 0) return names[i][1];
    return "Other";
  }

  function contexts() {
    var given = window.termoparContext;
    if (Array.isArray(given)) return given.map(String);
    var el = document.body && document.body.dataset.context ? document.body : document.documentElement;
    var attr = el.dataset.context || "";
    return attr.split(",").map(function (c) { return c.trim(); }).filter(Boolean);
  }

  var last = null;
  function send() {
    if (location.href === last) return;
    last = location.href;
    var body = JSON.stringify({
      site_id: site, url: location.href, context: contexts(),
      user: { id: userId(), device: device() }
    });
    // text/plain: a CORS-safelisted type, so no preflight; the server reads it as JSON.
    var sent = false;
    if (navigator.sendBeacon) {
      try { sent = navigator.sendBeacon(endpoint, new Blob([body], { type: "text/plain" })); } catch (e) {}
    }
    if (!sent && window.fetch) {
      fetch(endpoint, { method: "POST", body: body, keepalive: true, mode: "cors",
        credentials: "omit", headers: { "Content-Type": "text/plain" } }).catch(function () {});
    }
  }

  // In-page navigations of single-page apps.
  var push = history.pushState;
  history.pushState = function () { push.apply(this, arguments); setTimeout(send, 0); };
  window.addEventListener("popstate", send);
  window.termoparTrack = function () { last = null; send(); };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", send);
  else send();
})();
