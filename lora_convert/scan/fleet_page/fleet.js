// The fleet page's table, filters and engine-matrix click-through. Everything it shows comes from the JSON in
// script#fleet-data (written by lora_convert/scan/fleet.py); every value is put into the DOM as text, never as HTML.
(function () {
  "use strict";
  var CHUNK = 500; // rows rendered at a time: a 10,000-adapter fleet renders its first rows at once
  var data = JSON.parse(document.getElementById("fleet-data").textContent);
  var cols = data.columns;
  var interned = { family: true, base: true, status: true, first_finding: true };
  var numeric = { bytes: true, rank: true, seconds: true };
  var rows = data.rows.map(function (r) {
    var o = {};
    for (var i = 0; i < cols.length; i++) {
      var v = r[i];
      o[cols[i]] = interned[cols[i]] && v !== null ? data.strings[v] : v;
    }
    o.eo = r[cols.length] || "";
    o.text = [o.id, o.family || "", o.base || "", o.first_finding || ""].join("\n").toLowerCase();
    return o;
  });
  var state = { text: "", status: "", release: -1, outcome: null, key: null, dir: 1, shown: CHUNK };
  var table = document.getElementById("adapters");
  var tbody = table.tBodies[0];
  var filter = document.getElementById("filter");
  var statusFilter = document.getElementById("status-filter");
  var engineChip = document.getElementById("engine-filter");
  var shownCount = document.getElementById("shown-count");
  var more = document.getElementById("show-more");

  function matches(o) {
    if (state.status && o.status !== state.status) return false;
    if (state.release >= 0 && o.eo.charAt(state.release) !== state.outcome) return false;
    return !state.text || o.text.indexOf(state.text) !== -1;
  }

  // Ascending: null first, numbers by value, strings by code point; descending the reverse.
  function compare(key, dir) {
    return function (a, b) {
      var x = a[key], y = b[key];
      if (x === y) return 0;
      if (x === null || x === undefined) return -dir;
      if (y === null || y === undefined) return dir;
      return (x < y ? -1 : 1) * dir;
    };
  }

  function bytesText(n) {
    if (n === null) return "";
    var units = ["B", "kB", "MB", "GB", "TB"], i = 0, v = n;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }

  function cell(tr, key, value) {
    var td = document.createElement("td");
    td.setAttribute("data-key", key);
    td.setAttribute("data-value", value === null || value === undefined ? "" : String(value));
    if (key === "bytes") { td.textContent = bytesText(value); td.title = value === null ? "" : String(value) + " bytes"; }
    else td.textContent = value === null || value === undefined ? "" : String(value);
    if (numeric[key]) td.className = "num";
    if (key === "status") td.className = "s-" + value;
    tr.appendChild(td);
  }

  var matched = [];
  function render() {
    matched = rows.filter(matches);
    if (state.key) matched.sort(compare(state.key, state.dir));
    shownCount.textContent = String(matched.length);
    var frag = document.createDocumentFragment();
    var end = Math.min(matched.length, state.shown);
    for (var i = 0; i < end; i++) {
      var o = matched[i], tr = document.createElement("tr");
      tr.setAttribute("data-id", o.id);
      for (var c = 0; c < cols.length; c++) cell(tr, cols[c], o[cols[c]]);
      frag.appendChild(tr);
    }
    tbody.textContent = "";
    tbody.appendChild(frag);
    more.hidden = matched.length <= end;
    if (!more.hidden) more.textContent = "Show " + Math.min(CHUNK, matched.length - end) + " more of " + (matched.length - end);
  }

  function refilter() { state.shown = CHUNK; render(); }

  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      state.dir = state.key === key ? -state.dir : 1;
      state.key = key;
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (other) {
        other.setAttribute("aria-sort", other === th ? (state.dir === 1 ? "ascending" : "descending") : "none");
      });
      render();
    });
  });
  filter.addEventListener("input", function () { state.text = filter.value.trim().toLowerCase(); refilter(); });
  statusFilter.addEventListener("change", function () { state.status = statusFilter.value; refilter(); });
  more.addEventListener("click", function () { state.shown += CHUNK; render(); });

  var matrix = document.getElementById("engine-matrix");
  function clearActive() {
    if (!matrix) return;
    Array.prototype.forEach.call(matrix.querySelectorAll("td.active"), function (td) { td.classList.remove("active"); });
  }
  if (matrix) {
    matrix.addEventListener("click", function (event) {
      var td = event.target.closest("td[data-outcome]");
      if (!td) return;
      var release = td.parentNode.getAttribute("data-release");
      var outcome = td.getAttribute("data-outcome");
      state.release = data.releases.indexOf(release);
      state.outcome = outcome === "unchecked" ? "-" : String(data.outcomes.indexOf(outcome));
      clearActive();
      td.classList.add("active");
      engineChip.textContent = release + ": " + outcome;
      engineChip.hidden = false;
      refilter();
      table.scrollIntoView();
    });
  }
  document.getElementById("clear-filters").addEventListener("click", function () {
    filter.value = "";
    statusFilter.value = "";
    state.text = ""; state.status = ""; state.release = -1; state.outcome = null;
    engineChip.hidden = true;
    engineChip.textContent = "";
    clearActive();
    refilter();
  });
  render();
})();
