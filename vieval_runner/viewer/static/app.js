// vieval viewer: plain JS, no build step. Every piece of store data reaches the page through
// textContent / setAttribute on elements we create: never innerHTML, so model output that
// looks like markup stays text.
//
// This file: polling the store, the run toggles and step axis, step / specimen navigation
// and the URL hash, the charts, and wiring. Shared state and data access: state.js; the
// specimen list: list.js; the specimen panels and step summary: panels.js.
(() => {
  "use strict";

  const { h } = window.VievalDraw;
  const { S, STATIC, api, runByKey, getStep, runColor, metricName } = window.VievalState;
  const { renderSpecimen, renderSummary } = window.VievalPanels;
  const renderList = () => window.VievalList.renderList(select);
  const $ = (sel) => document.querySelector(sel);

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
    renderBreakdown();
    renderWorseVerdict(worse, token);
    window.VievalCharts.markChartStep(S.step);
    prefetch();
    saveHash();
  }
  const renderBreakdown = () => window.VievalBreakdown.renderBreakdown(() => { renderList(); renderSpecimen(); renderBreakdown(); });
  // 'worse since step N' at run level: is the run's headline metric significantly worse
  // than at step N (paired test on the shared specimens)? The live server only.
  async function renderWorseVerdict(worse, token) {
    const el = $("#worse-verdict");
    if (STATIC || Number.isNaN(worse) || !S.shown.length || worse === S.step) { el.hidden = true; return; }
    let got;
    try {
      got = await api("compare", { run: S.shown[0], a: worse, b: S.step });
    } catch (e) {
      el.hidden = true;
      return;
    }
    if (token !== S.token || !got || got.difference === undefined) return;
    const sign = got.difference >= 0 ? "+" : "";
    const ci = got.ci95 || [null, null];
    const worseNow = got.difference < 0;
    const verdict = got.significant ? (worseNow ? "significantly worse" : "significantly better") : "no significant change";
    el.textContent = `run ${metricName(got.metric)} ${sign}${got.difference.toFixed(3)} since step ${worse} ` +
      `(95% CI ${ci[0] === null ? "–" : ci[0].toFixed(3)} to ${ci[1] === null ? "–" : ci[1].toFixed(3)}, p = ${got.p_value === null ? "–" : got.p_value.toPrecision(2)}, n = ${got.n}): ${verdict}`;
    el.className = "worse-verdict" + (got.significant && worseNow ? " sig-worse" : "");
    el.dataset.significant = String(!!got.significant);
    el.hidden = false;
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

  // ------------------------------------------------------------------ charts
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
