// vieval viewer specimen list: filters (category, parse failures, search, worse since a
// step), sorting, and the list items with thumbnail, badge, score and change.
(() => {
  "use strict";
  const PARSE_FAILURES = new Set(["malformed", "truncated", "out_of_range"]);
  const LIST_LIMIT = 1500;
  const BADGE = {
    good: "OK", loose: "LOOSE", missed: "MISS", false_positive: "FP", inconsistent: "MIX",
    unparseable: "PARSE", incomplete: "PART", hallucination: "HALL",
    format_mismatch: "FMT", wrong: "WRONG",
  };

  const { h, fmt } = window.VievalDraw;
  const { S, stepDoc, score } = window.VievalState;
  const $ = (sel) => document.querySelector(sel);

  // Rebuild the list for the current step and filters; sets S.order (the keyboard's order)
  // and moves S.current to the first item shown when a filter hides it.
  function renderList(onSelect) {
    const run = S.shown[0];
    const doc = stepDoc(run, S.step);
    const worseStep = $("#filter-worse").value === "" ? null : Number($("#filter-worse").value);
    const base = worseStep === null ? null : stepDoc(run, worseStep);
    const cat = $("#filter-category").value;
    const parseOnly = $("#filter-parse").checked;
    const query = $("#search").value.trim().toLowerCase();
    const counts = new Map();
    const items = [];
    for (const sp of S.specimens) {
      const row = doc ? doc.byI.get(sp.i) : null;
      const c = row ? row.failure_category || "" : "";
      if (c) counts.set(c, (counts.get(c) || 0) + 1);
      const sc = score(row, sp);
      const before = base ? score(base.byI.get(sp.i), sp) : null;
      const delta = sc !== null && before !== null ? sc - before : null;
      if (cat && c !== cat) continue;
      if (parseOnly && !(row && PARSE_FAILURES.has(row.parse_status))) continue;
      if (query && !sp.id.toLowerCase().includes(query)) continue;
      if (worseStep !== null && !(delta !== null && delta < -1e-9)) continue;
      if (S.slice && !S.slice.ids.has(sp.i)) continue;
      items.push({ sp, row, c, sc, delta });
    }
    if (S.wantSpecimen && S.byId.has(S.wantSpecimen)) {
      S.current = S.byId.get(S.wantSpecimen).i;
      S.wantSpecimen = null;
    }
    sortItems(items, $("#sort").value);
    renderCategoryOptions(counts, cat);
    S.order = items.map((it) => it.sp.i);
    const ul = $("#specimen-list");
    ul.replaceChildren();
    for (const it of items.slice(0, LIST_LIMIT)) ul.append(listItem(it, onSelect));
    const more = items.length > LIST_LIMIT ? ` (first ${LIST_LIMIT} shown)` : "";
    $("#list-count").textContent = `${items.length} of ${S.specimens.length} specimens${more}`;
    // a filter that hides the current specimen moves the selection to the first one shown
    if (S.order.length && !S.order.includes(S.current)) S.current = S.order[0];
    const sel = ul.querySelector(`li[data-i="${S.current}"]`);
    if (sel) {
      sel.classList.add("selected");
      sel.scrollIntoView({ block: "nearest" });
    }
  }
  function sortItems(items, how) {
    const num = (v, dflt) => (v === null || v === undefined ? dflt : v);
    const by = {
      "score-asc": (a, b) => num(a.sc, 2) - num(b.sc, 2),
      "score-desc": (a, b) => num(b.sc, -1) - num(a.sc, -1),
      "f1-asc": (a, b) => num(a.row && a.row.f1, 2) - num(b.row && b.row.f1, 2),
      "iou-asc": (a, b) => num(a.row && a.row.iou_mean, 2) - num(b.row && b.row.iou_mean, 2),
      "delta-asc": (a, b) => num(a.delta, 2) - num(b.delta, 2),
    }[how];
    const byId = (a, b) => a.sp.id.localeCompare(b.sp.id, undefined, { numeric: true });
    items.sort(by ? (a, b) => by(a, b) || byId(a, b) : byId);
  }
  function renderCategoryOptions(counts, current) {
    const sel = $("#filter-category");
    const total = [...counts.values()].reduce((a, b) => a + b, 0);
    sel.replaceChildren(h("option", { value: "", text: `All categories (${total})` }));
    const cats = [...counts.keys()].sort();
    if (current && !counts.has(current)) cats.push(current);
    for (const c of cats) sel.append(h("option", { value: c, text: `${c} (${counts.get(c) || 0})` }));
    sel.value = current;
  }
  function listItem(it, onSelect) {
    const { sp, row, c, sc, delta } = it;
    const thumb = h("div", { class: "thumb" });
    if (sp.thumb) thumb.append(h("img", { src: sp.thumb, alt: "", loading: "lazy", decoding: "async" }));
    if (c) thumb.append(h("span", { class: `badge cat-${c}`, text: BADGE[c] || c.slice(0, 5).toUpperCase() }));
    const meta = h("div", { class: "li-meta" },
      h("div", { class: "li-id", text: sp.id, title: sp.id }),
      h("div", { class: "li-sub" },
        h("span", { class: `cat-text cat-${c || "none"}`, text: c || (row ? "" : "not evaluated") }),
        row && PARSE_FAILURES.has(row.parse_status) ? h("span", { class: "parse-flag", text: row.parse_status }) : null));
    const scoreBox = h("div", { class: "li-score" }, h("span", { class: "score", text: fmt(sc) }));
    if (delta !== null && $("#filter-worse").value !== "") {
      scoreBox.append(h("span", { class: delta < 0 ? "delta neg" : "delta pos", text: (delta > 0 ? "+" : "") + fmt(delta) }));
    }
    const li = h("li", { "data-i": sp.i, "data-id": sp.id, role: "option" }, thumb, meta, scoreBox);
    li.addEventListener("click", () => onSelect(sp.i));
    return li;
  }

  window.VievalList = { renderList };
})();
