// vieval viewer drawing helpers: elements, figures with boxes at true scale, answer diffs.
// Text from the store is only ever set with textContent / setAttribute (never innerHTML).
(() => {
  "use strict";
  const SVGNS = "http://www.w3.org/2000/svg";

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) el.append(kid);
    return el;
  }
  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") el.textContent = v;
      else el.setAttribute(k, String(v));
    }
    for (const kid of kids) if (kid) el.append(kid);
    return el;
  }
  const fmt = (v, d = 2) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(d));


  // ------------------------------------------------------------------ boxes
  function specSize(sp) {
    let w = sp.width, hgt = sp.height;
    if (!w || !hgt) { // no specimen row: fit the boxes
      w = 100; hgt = 100;
      for (const b of sp.ref_boxes) { w = Math.max(w, b[2]); hgt = Math.max(hgt, b[3]); }
    }
    return [w, hgt];
  }
  function boxEl(b, cls, label) {
    const g = s("g", { class: "box " + cls });
    g.append(s("rect", { x: b[0], y: b[1], width: Math.max(0, b[2] - b[0]), height: Math.max(0, b[3] - b[1]) }));
    if (label) g.append(s("text", { x: b[0], y: b[1], class: "box-label", text: label }));
    return g;
  }
  function figure(sp, boxes) {
    const [w, hgt] = specSize(sp);
    const svg = s("svg", { viewBox: `0 0 ${w} ${hgt}`, class: "fig", "data-w": w, "data-h": hgt, preserveAspectRatio: "xMidYMid meet" });
    if (sp.img) svg.append(s("image", { href: sp.img, x: 0, y: 0, width: w, height: hgt, preserveAspectRatio: "none" }));
    else svg.append(s("rect", { x: 0, y: 0, width: w, height: hgt, class: "noimg" }));
    const g = s("g", { class: "boxes" });
    for (const el of boxes) g.append(el);
    svg.append(g);
    const wrap = h("div", { class: "figure" }, svg);
    return wrap;
  }
  // Keep boxes at true scale and labels/strokes at constant screen size.
  function layoutFigures(panels) {
    const figs = panels.querySelectorAll(".figure svg");
    if (!figs.length) return;
    const top = panels.getBoundingClientRect().top;
    let maxH = Math.max(220, window.innerHeight - top - 150);
    if (document.body.classList.contains("task-vqa")) maxH = Math.min(maxH, 360);
    for (const svg of figs) {
      const w = Number(svg.dataset.w), hh = Number(svg.dataset.h);
      const avail = svg.parentElement.clientWidth || 300;
      const k = Math.min(avail / w, maxH / hh);
      svg.style.width = `${w * k}px`;
      svg.style.height = `${hh * k}px`;
      const g = svg.querySelector("g.boxes");
      g.setAttribute("stroke-width", String(2 / k));
      g.setAttribute("font-size", String(12 / k));
      for (const t of g.querySelectorAll("text")) {
        t.setAttribute("stroke-width", String(3 / k));
        const y = Number(t.parentElement.firstChild.getAttribute("y"));
        t.setAttribute("dy", String(y > 14 / k ? -4 / k : 12 / k));
        t.setAttribute("dx", String(2 / k));
      }
      for (const r of g.querySelectorAll(".missed rect")) r.setAttribute("stroke-dasharray", `${6 / k} ${4 / k}`);
    }
  }

  // ------------------------------------------------------------------ VQA diff
  const norm = (t) => t.toLowerCase().replace(/[^\p{L}\p{N}]+/gu, "");
  const toks = (text) => (text || "").split(/\s+/).filter(Boolean);
  function lcsMarks(a, b) {
    const n = a.length, m = b.length;
    const dp = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
    for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
      dp[i][j] = norm(a[i]) && norm(a[i]) === norm(b[j]) ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
    const ina = new Array(n).fill(false), inb = new Array(m).fill(false);
    let i = 0, j = 0;
    while (i < n && j < m) {
      if (norm(a[i]) && norm(a[i]) === norm(b[j])) { ina[i] = inb[j] = true; i++; j++; }
      else if (dp[i + 1][j] >= dp[i][j + 1]) i++;
      else j++;
    }
    return { ina, inb, common: dp[0][0] };
  }
  function tokenSpans(words, marks, missCls) {
    const out = h("span", { class: "toks" });
    words.forEach((wd, k) => {
      if (k) out.append(" ");
      out.append(h("span", { class: marks[k] ? "tok same" : "tok " + missCls, text: wd }));
    });
    return out;
  }
  function answerDiff(answer, refs) {
    const a = toks(answer);
    let best = null;
    for (const ref of refs) {
      const b = toks(ref);
      const m = lcsMarks(a, b);
      const f = a.length + b.length ? (2 * m.common) / (a.length + b.length) : 1;
      if (!best || f > best.f) best = { f, b, m, ref };
    }
    const box = h("div", { class: "vqa-diff" });
    const ans = h("div", { class: "answer" });
    if (!a.length) ans.append(h("span", { class: "empty", text: "(empty answer)" }));
    else ans.append(tokenSpans(a, best ? best.m.ina : a.map(() => false), "extra"));
    box.append(h("div", { class: "k", text: "Generated answer" }), ans);
    if (best && refs.length) {
      box.append(h("div", { class: "k", text: "Closest reference (missing words in amber)" }),
        h("div", { class: "ref-answer" }, tokenSpans(best.b, best.m.inb, "missing")));
    }
    return box;
  }

  window.VievalDraw = { h, s, fmt, boxEl, figure, layoutFigures, answerDiff };
})();
