// vieval viewer main area: the selected specimen's ground-truth panel and one prediction
// panel per shown run (boxes coloured by match, answer diffs, category, raw output), and the
// step summary table with best-step / overfitting / failure notes.
(() => {
  "use strict";
  const TIGHT_IOU = 0.75; // matched boxes below this are "loose" (amber)

  const { h, fmt, boxEl, figure, answerDiff } = window.VievalDraw;
  const { S, runByKey, hasStep, stepDoc, runColor, metricName } = window.VievalState;
  const $ = (sel) => document.querySelector(sel);

  // ------------------------------------------------------------------ specimen panels
  function renderSpecimen() {
    const sp = S.specimens[S.current];
    const panels = $("#panels");
    panels.replaceChildren();
    if (!sp) {
      $("#spec-id").textContent = "no specimen selected";
      $("#spec-prompt").textContent = "";
      $("#spec-size").textContent = "";
      return;
    }
    $("#spec-id").textContent = sp.id;
    panels.dataset.step = String(S.step); // what is drawn (tests and screenshots wait on it)
    $("#spec-prompt").textContent = sp.task === "vqa" ? `Q: ${sp.prompt}` : `“${sp.prompt}”`;
    $("#spec-size").textContent = sp.width ? `${sp.width}×${sp.height}px · ${sp.task}` : sp.task;
    document.body.classList.toggle("task-vqa", sp.task === "vqa");
    panels.style.setProperty("--cols", String(1 + S.shown.length));
    panels.append(gtPanel(sp));
    for (const k of S.shown) panels.append(runPanel(sp, k));
    requestAnimationFrame(() => window.VievalDraw.layoutFigures(panels));
  }
  function gtPanel(sp) {
    const head = h("div", { class: "panel-head" }, h("span", { class: "panel-title", text: "Ground truth" }));
    const panel = h("div", { class: "panel gt", "data-panel": "gt" }, head);
    if (sp.task === "vqa") {
      head.append(h("span", { class: "panel-sub", text: `${sp.ref_answers.length} reference answer(s)` }));
      panel.append(figure(sp, []));
      panel.append(h("div", { class: "vqa-q" }, h("div", { class: "k", text: "Question" }), h("div", { class: "q", text: sp.prompt })));
      const ul = h("ul", { class: "refs" });
      for (const r of sp.ref_answers) ul.append(h("li", { text: r }));
      panel.append(h("div", { class: "k", text: "Reference answers" }), ul);
      return panel;
    }
    head.append(h("span", { class: "panel-sub", text: `${sp.ref_boxes.length} reference box(es)` }));
    panel.append(figure(sp, sp.ref_boxes.map((b) => boxEl(b, "ref", b[4] || ""))));
    return panel;
  }
  function runPanel(sp, key) {
    const run = runByKey(key);
    const chip = h("i", { class: "chip" });
    chip.style.background = runColor(key);
    const head = h("div", { class: "panel-head" }, chip, h("span", { class: "panel-title", text: run.label }));
    const panel = h("div", { class: "panel run", "data-panel": key }, head);
    const doc = stepDoc(key, S.step);
    const row = doc ? doc.byI.get(sp.i) : null;
    if (!row) {
      panel.append(h("div", { class: "not-evaluated", text: hasStep(key, S.step) ? `No prediction for this specimen at step ${S.step}` : `Run not evaluated at step ${S.step}` }));
      return panel;
    }
    const stats = sp.task === "vqa"
      ? [["EM", row.exact_match], ["token F1", row.token_f1], ["BLEU", row.bleu, 1], ["ANLS", row.anls]]
      : [["F1", row.f1], ["IoU", row.iou_mean], ["TP", row.tp, 0], ["FP", row.fp, 0], ["FN", row.fn, 0]];
    const statBox = h("span", { class: "stats" });
    for (const [name, v, d] of stats.filter((st) => st[1] !== null && st[1] !== undefined)) statBox.append(h("span", { class: "stat" }, h("b", { text: name }), " " + fmt(v, d === undefined ? 2 : d)));
    head.append(statBox);
    if (sp.task === "vqa") {
      panel.append(answerDiff(row.pred_answer || "", sp.ref_answers));
    } else {
      // matches come from the server, computed the way scoring matched them
      const pred = row.pred_boxes || [];
      const pm = row.matches || pred.map(() => null);
      const rm = sp.ref_boxes.map((_, j) => pm.some((m) => m && m[0] === j));
      const els = [];
      sp.ref_boxes.forEach((b, j) => { if (!rm[j]) els.push(boxEl(b, "missed", (b[4] || "") + " · missed")); });
      pred.forEach((b, i) => {
        const m = pm[i];
        const cls = m === null ? "fp" : m[1] >= TIGHT_IOU ? "good" : "loose";
        // b[5]: the box's own score (the tokens that wrote it) when box_scores is on
        const p = typeof b[5] === "number" ? ` · p ${b[5].toFixed(2)}` : "";
        const lab = (b[4] || "") + (m === null ? " · FP" : ` · IoU ${m[1].toFixed(2)}`) + p;
        els.push(boxEl(b, cls, lab.replace(/^ · /, "")));
      });
      panel.append(figure(sp, els));
    }
    const c = row.failure_category || "";
    const actions = (S.meta && S.meta.failure_actions) || {};
    panel.append(h("div", { class: "category" },
      h("span", { class: `badge big cat-${c || "none"}`, text: c || "uncategorised" }),
      h("span", { class: "parse", text: `parse: ${row.parse_status || "?"}` }),
      h("div", { class: "action", text: actions[c] || "" })));
    const raw = row.raw_text === null || row.raw_text === undefined ? "" : String(row.raw_text);
    panel.append(h("details", { class: "raw" },
      h("summary", { text: `Raw model output (${raw.length} chars)` }),
      h("pre", { text: raw || "(empty)" })));
    return panel;
  }

  // ------------------------------------------------------------------ step summary
  function renderSummary() {
    const box = $("#step-summary");
    box.replaceChildren();
    const runs = S.shown.map(runByKey);
    const names = runs.some((r) => r.task === "vqa")
      ? ["exact_match", "token_f1", "bleu", "anls", "parse_failure_rate"]
      : ["precision", "recall", "f1", "iou_mean", "parse_failure_rate"];
    const head = h("tr", {}, h("th", { text: `step ${S.step}` }));
    for (const m of names) head.append(h("th", { text: metricName(m) }));
    const table = h("table", { class: "sum-table" }, head);
    const notes = h("div", { class: "notes" });
    for (const run of runs) {
      const agg = run.aggregates.find((a) => a.step === S.step);
      const chip = h("i", { class: "chip" });
      chip.style.background = runColor(run.key);
      const tr = h("tr", {}, h("td", { class: "run-name", title: run.label }, chip, run.label));
      for (const m of names) {
        const v = agg ? agg[m] : null;
        const isBest = run.best && run.best.metric === m && run.best.step === S.step;
        tr.append(h("td", { class: isBest ? "num best-cell" : "num", text: fmt(v, m === "bleu" ? 1 : 2) }));
      }
      table.append(tr);
      const who = runs.length > 1 ? run.label + ": " : "";
      if (run.best) notes.append(h("div", { class: "best", text: `★ ${who}best ${metricName(run.best.metric)} ${fmt(run.best.value)} at step ${run.best.step}` }));
      if (run.overfitting) {
        const o = run.overfitting;
        notes.append(h("div", { class: "overfit", text: `⚠ ${who}step ${o.best_step} (${fmt(o.best_value)}) is clearly better than the last step ${o.last_step} (${fmt(o.last_value)}): possible overfitting — consider the earlier checkpoint.` }));
      }
      for (const f of run.failed || []) notes.append(h("div", { class: "failed", text: `✗ ${who}step ${f.step} failed: ${f.error}` }));
      // the coordinate-frame check: another frame of the box numbers fits far better
      if (agg && agg.coords_advice) notes.append(h("div", { class: "overfit coords-advice", text: `⚠ ${who}${agg.coords_advice}` }));
    }
    box.append(table, notes);
  }

  window.VievalPanels = { renderSpecimen, renderSummary };
})();
