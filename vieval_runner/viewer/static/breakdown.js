// vieval viewer breakdown: the step's headline metric per slice (COCO box size, label, or a
// metadata field) with n and its 95% bootstrap interval as a small bar table; clicking a
// slice filters the specimen list to it (click again to clear).
(() => {
  "use strict";
  const { h, fmt } = window.VievalDraw;
  const { S, stepDoc, metricName } = window.VievalState;
  const $ = (sel) => document.querySelector(sel);
  const FEW = 30; // slices smaller than this are dimmed: their interval is wide

  function renderBreakdown(onFilter) {
    const box = $("#breakdown");
    const doc = S.shown.length ? stepDoc(S.shown[0], S.step) : null;
    const all = (doc && doc.breakdown) || {};
    const sel = $("#breakdown-by");
    const keep = sel.value;
    const bys = Object.keys(all);
    box.hidden = !bys.length;
    sel.replaceChildren(...bys.map((b) => h("option", { value: b, text: `by ${b}` })));
    sel.value = bys.includes(keep) ? keep : bys[0] || "";
    const rows = all[sel.value] || [];
    const table = $("#breakdown-table");
    table.replaceChildren(h("tr", {}, h("th", { text: sel.value }), h("th", { text: "n" }),
      h("th", { text: rows.length ? metricName(rows[0].metric) : "" }), h("th", { text: "95% CI" }), h("th", {})));
    for (const r of rows) {
      const active = S.slice && S.slice.by === sel.value && S.slice.name === r.slice;
      const bar = h("div", { class: "bd-bar" });
      const ci = r.ci95 || [null, null];
      if (r.value !== null) bar.append(h("i", { class: "bd-fill", style: `width:${(100 * r.value).toFixed(1)}%` }));
      if (ci[0] !== null) bar.append(h("i", { class: "bd-ci", style: `left:${(100 * ci[0]).toFixed(1)}%;width:${(100 * (ci[1] - ci[0])).toFixed(1)}%` }));
      const tr = h("tr", { class: `bd-row${r.n < FEW ? " few" : ""}${active ? " active" : ""}`, "data-slice": r.slice, "data-n": r.n,
        title: r.n < FEW ? `only ${r.n} specimens: a wide interval, not news` : "click to filter the list" },
        h("td", { class: "bd-name", text: r.slice }), h("td", { class: "num", text: String(r.n) }),
        h("td", { class: "num", text: fmt(r.value) }), h("td", { class: "num ci", text: ci[0] === null ? "–" : `${fmt(ci[0])}–${fmt(ci[1])}` }),
        h("td", { class: "bd-bar-cell" }, bar));
      tr.addEventListener("click", () => {
        S.slice = active ? null : { by: sel.value, name: r.slice, ids: new Set(r.ids) };
        onFilter();
      });
      table.append(tr);
    }
    $("#breakdown-note").textContent = S.slice ? `list: ${S.slice.by} = ${S.slice.name}` : "";
  }

  window.VievalBreakdown = { renderBreakdown };
})();
