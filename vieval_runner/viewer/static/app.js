// vieval viewer: plain JS, no build step. Every piece of store data reaches the page through
// textContent / setAttribute on elements we create: never innerHTML, so model output that
// looks like markup stays text.
(() => {
  "use strict";

  const DATA = (window.__VIEVAL_DATA__ = window.__VIEVAL_DATA__ || {});
  const STATIC = !!DATA.meta; // export_html embeds meta: no server, no polling
  const TIGHT_IOU = 0.75; // matched boxes below this are "loose" (amber)
  const PARSE_FAILURES = new Set(["malformed", "truncated", "out_of_range"]);
  const RUN_COLORS = ["#6d28d9", "#0e7490", "#be185d", "#4d7c0f", "#b45309"];
  const LIST_LIMIT = 1500;
  const METRIC_NAMES = {
    f1: "F1", iou_mean: "IoU", precision: "P", recall: "R", exact_match: "EM",
    token_f1: "token F1", bleu: "BLEU", anls: "ANLS", rouge_l: "ROUGE-L",
    vqa_accuracy: "VQA acc", acc_at_50: "acc@0.5", parse_failure_rate: "parse fail",
  };
  const BADGE = {
    good: "OK", loose: "LOOSE", missed: "MISS", false_positive: "FP", inconsistent: "MIX",
    unparseable: "PARSE", incomplete: "PART", hallucination: "HALL",
    format_mismatch: "FMT", wrong: "WRONG",
  };

  const { h, fmt, boxEl, figure, answerDiff } = window.VievalDraw;
  const $ = (sel) => document.querySelector(sel);
  const metricName = (m) => METRIC_NAMES[m] || m;
  const S = {
    meta: null, metaRev: null, specRev: null, specimens: [], byId: new Map(),
    shown: [], steps: [], step: null, current: null, order: [],
    cache: new Map(), docs: new Map(), token: 0, pollTimer: null, live: "ok",
  };

  // ------------------------------------------------------------------ DOM helpers
  // ------------------------------------------------------------------ data loading
  function loadScript(name) {
    if (DATA[name]) return Promise.resolve(DATA[name]);
    return new Promise((resolve, reject) => {
      const el = document.createElement("script");
      el.src = "data/" + name + ".js";
      el.onload = () => (DATA[name] ? resolve(DATA[name]) : reject(new Error("missing " + name)));
      el.onerror = () => reject(new Error("cannot load data/" + name + ".js"));
      document.head.append(el);
    });
  }
  async function api(name, params) {
    if (STATIC) {
      return loadScript(name === "step" ? `step-${params.run}-${params.step}` : name);
    }
    const q = params ? "?" + new URLSearchParams(params).toString() : "";
    for (let attempt = 0; ; attempt++) {
      const r = await fetch(`api/${name}${q}`, { cache: "no-store" });
      if (r.ok) return r.json();
      // 503 = the store was mid-commit; the server already retried, give it a moment
      if (r.status === 503 && attempt < 6) {
        await new Promise((ok) => setTimeout(ok, 250 * (attempt + 1)));
        continue;
      }
      const err = new Error(`${name}: HTTP ${r.status}`);
      err.status = r.status;
      throw err;
    }
  }
  const runByKey = (key) => (S.meta ? S.meta.runs.find((r) => r.key === key) : null);
  function stepKey(run, step) {
    const meta = runByKey(run);
    const ev = meta && meta.eval_ids ? meta.eval_ids[String(step)] : "";
    return `${run}@${step}#${ev || ""}`;
  }
  function hasStep(run, step) {
    const meta = runByKey(run);
    return !!meta && meta.steps.includes(step);
  }
  function getStep(run, step) {
    if (!hasStep(run, step)) return Promise.resolve(null);
    const key = stepKey(run, step);
    if (!S.cache.has(key)) {
      const p = api("step", { run, step }).then((doc) => {
        doc.byI = new Map(doc.rows.map((r) => [r.i, r]));
        S.docs.set(key, doc);
        return doc;
      });
      p.catch(() => S.cache.delete(key));
      S.cache.set(key, p);
    }
    return S.cache.get(key);
  }
  const stepDoc = (run, step) => (hasStep(run, step) ? S.docs.get(stepKey(run, step)) || null : null);

  // ------------------------------------------------------------------ scores
  function primaryMetric(task) {
    return (S.meta && S.meta.primary && S.meta.primary[task]) || (task === "vqa" ? "token_f1" : "f1");
  }
  function score(row, spec) {
    if (!row) return null;
    const v = row[primaryMetric(spec ? spec.task : "grounding")];
    return v === undefined ? null : v;
  }

  // ------------------------------------------------------------------ meta / live
  async function poll() {
    try {
      const meta = await api("meta");
      S.live = meta.stale ? "stale" : "ok";
      await applyMeta(meta);
    } catch (e) {
      S.live = "offline";
    }
    renderLive();
  }
  function renderLive() {
    const el = $("#live");
    if (STATIC) {
      el.textContent = "static export";
      el.className = "live static";
      return;
    }
    el.textContent = { ok: "● live", stale: "● store busy", offline: "● offline" }[S.live];
    el.className = "live " + S.live;
  }

  async function applyMeta(meta) {
    if (meta.rev && meta.rev === S.metaRev && !meta.waiting) return;
    S.meta = meta;
    S.metaRev = meta.rev;
    $("#waiting").hidden = !meta.waiting;
    $("#layout").hidden = !!meta.waiting;
    if (meta.waiting) {
      $("#waiting-detail").textContent =
        (meta.message || "") + " Stores: " + meta.stores.map((st) => st.root).join(", ");
      $("#step-label").textContent = "no steps yet";
      return;
    }
    if (meta.rev !== S.specRev) {
      const doc = await api("specimens");
      S.specimens = doc.specimens;
      S.byId = new Map(doc.specimens.map((sp) => [sp.id, sp]));
      S.specRev = meta.rev;
    }
    const keys = meta.runs.filter((r) => r.steps.length).map((r) => r.key);
    S.shown = S.shown.filter((k) => keys.includes(k));
    if (!S.shown.length) S.shown = keys.slice(0, 3);
    renderRunToggles();
    updateSteps();
    if (S.current === null || !S.specimens[S.current]) S.current = S.specimens.length ? 0 : null;
    renderCharts();
    await refresh();
  }

  function updateSteps() {
    const set = new Set();
    for (const k of S.shown) for (const st of runByKey(k).steps) set.add(st);
    S.steps = [...set].sort((a, b) => a - b);
    if (S.step === null || !S.steps.includes(S.step)) {
      // first load: the latest step; a run toggled off: the nearest step that exists
      const target = S.step === null ? Infinity : S.step;
      S.step = S.steps.reduce((best, st) => (Math.abs(st - target) < Math.abs(best - target) ? st : best), S.steps[S.steps.length - 1]);
    }
    const slider = $("#step-slider");
    slider.max = String(Math.max(0, S.steps.length - 1));
    slider.value = String(S.steps.indexOf(S.step));
    const worse = $("#filter-worse");
    const keep = worse.value;
    worse.replaceChildren(h("option", { value: "", text: "worse since step…" }));
    for (const st of S.steps) worse.append(h("option", { value: String(st), text: `worse since step ${st}` }));
    worse.value = S.steps.includes(Number(keep)) ? keep : "";
  }

  function renderRunToggles() {
    const box = $("#run-toggles");
    box.replaceChildren();
    S.meta.runs.forEach((run, idx) => {
      if (!run.steps.length) return;
      const input = h("input", { type: "checkbox", "data-run": run.key });
      input.checked = S.shown.includes(run.key);
      input.addEventListener("change", () => {
        if (input.checked) S.shown = S.meta.runs.map((r) => r.key).filter((k) => k === run.key || S.shown.includes(k));
        else if (S.shown.length > 1) S.shown = S.shown.filter((k) => k !== run.key);
        else input.checked = true; // at least one run stays shown
        updateSteps();
        renderCharts();
        refresh();
      });
      const chip = h("i", { class: "chip" });
      chip.style.background = runColor(run.key);
      box.append(h("label", { class: "run-toggle", title: run.run_id }, input, chip, run.label));
      void idx;
    });
  }
  const runColor = (key) => RUN_COLORS[S.meta.runs.findIndex((r) => r.key === key) % RUN_COLORS.length];

  // ------------------------------------------------------------------ step / specimen moves
  async function refresh() {
    const token = ++S.token;
    const step = S.step;
    const worse = Number($("#filter-worse").value || NaN);
    const loads = S.shown.map((k) => getStep(k, step));
    if (!Number.isNaN(worse) && S.shown.length) loads.push(getStep(S.shown[0], worse));
    try {
      await Promise.all(loads);
    } catch (e) {
      S.live = "offline";
      renderLive();
    }
    if (token !== S.token) return; // a newer navigation superseded this one
    renderStepLabel();
    renderList();
    renderSpecimen();
    renderSummary();
    window.VievalCharts.markChartStep(S.step);
    prefetch();
    saveHash();
  }
  function prefetch() {
    const i = S.steps.indexOf(S.step);
    for (const st of [S.steps[i + 1], S.steps[i - 1]]) {
      if (st === undefined) continue;
      for (const k of S.shown) getStep(k, st).catch(() => {});
    }
  }
  function setStep(step) {
    if (step === undefined || step === null || step === S.step) return;
    S.step = step;
    $("#step-slider").value = String(S.steps.indexOf(step));
    renderStepLabel();
    refresh();
  }
  const moveStep = (d) => setStep(S.steps[Math.min(S.steps.length - 1, Math.max(0, S.steps.indexOf(S.step) + d))]);
  function select(i) {
    if (i === undefined || i === null) return;
    S.current = i;
    for (const li of document.querySelectorAll("#specimen-list li.selected")) li.classList.remove("selected");
    const li = document.querySelector(`#specimen-list li[data-i="${i}"]`);
    if (li) {
      li.classList.add("selected");
      li.scrollIntoView({ block: "nearest" });
    }
    renderSpecimen();
    saveHash();
  }
  function moveSpecimen(d) {
    if (!S.order.length) return;
    const pos = S.order.indexOf(S.current);
    const next = pos < 0 ? 0 : Math.min(S.order.length - 1, Math.max(0, pos + d));
    select(S.order[next]);
  }
  function renderStepLabel() {
    const best = S.shown.length ? runByKey(S.shown[0]).best : null;
    const pos = S.steps.indexOf(S.step) + 1;
    let text = `step ${S.step}  (${pos}/${S.steps.length})`;
    if (best && best.step === S.step) text += "  ★ best";
    $("#step-label").textContent = text;
  }
  function saveHash() {
    if (S.current === null || !S.specimens[S.current]) return;
    const p = new URLSearchParams({ step: String(S.step), specimen: S.specimens[S.current].id });
    history.replaceState(null, "", "#" + p.toString());
  }
  function loadHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.has("step")) S.step = Number(p.get("step"));
    S.wantSpecimen = p.get("specimen");
  }

  // ------------------------------------------------------------------ specimen list
  function renderList() {
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
    for (const it of items.slice(0, LIST_LIMIT)) ul.append(listItem(it));
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
  function listItem(it) {
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
    li.addEventListener("click", () => select(sp.i));
    return li;
  }

  // ------------------------------------------------------------------ panels
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
        const lab = (b[4] || "") + (m === null ? " · FP" : ` · IoU ${m[1].toFixed(2)}`);
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

  // ------------------------------------------------------------------ summary + charts
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
    }
    box.append(table, notes);
  }
  function renderCharts() {
    const runs = S.shown.map(runByKey);
    const task = runs.length ? runs[0].task : "grounding";
    window.VievalCharts.renderCharts({
      runs, pickSteps: S.steps, metrics: (S.meta.metrics && S.meta.metrics[task]) || [],
      colorOf: runColor, metricName, onPick: setStep,
    });
    window.VievalCharts.markChartStep(S.step);
  }

  // ------------------------------------------------------------------ wiring
  function wire() {
    $("#step-slider").addEventListener("input", (e) => setStep(S.steps[Number(e.target.value)]));
    $("#step-prev").addEventListener("click", () => moveStep(-1));
    $("#step-next").addEventListener("click", () => moveStep(1));
    for (const id of ["#filter-category", "#filter-parse", "#sort"]) $(id).addEventListener("change", () => { renderList(); renderSpecimen(); });
    $("#filter-worse").addEventListener("change", () => refresh());
    $("#search").addEventListener("input", () => { renderList(); renderSpecimen(); });
    document.addEventListener("keydown", (e) => {
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      const t = e.target;
      if (t && (t.matches("input[type=search], input[type=text], textarea, select"))) return;
      const act = { ArrowUp: () => moveSpecimen(-1), ArrowDown: () => moveSpecimen(1), ArrowLeft: () => moveStep(-1), ArrowRight: () => moveStep(1) }[e.key];
      if (!act || !S.meta || S.meta.waiting) return;
      e.preventDefault(); // also stops the focused slider from moving a second time
      act();
    });
    let pending = 0;
    window.addEventListener("resize", () => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => { if (S.meta && !S.meta.waiting) { renderCharts(); window.VievalDraw.layoutFigures($("#panels")); } });
    });
  }

  async function start() {
    wire();
    loadHash();
    renderLive();
    await poll();
    if (!STATIC) {
      const every = Math.max(500, ((S.meta && S.meta.poll_seconds) || 2) * 1000);
      S.pollTimer = setInterval(poll, every);
    }
  }
  window.__vieval = S; // for debugging in the console and for tests
  start();
})();
