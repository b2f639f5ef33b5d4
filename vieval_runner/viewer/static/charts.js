// vieval viewer charts: per-step metrics (best step marked) and the training/eval loss, drawn
// as plain SVG on a shared step axis.
(() => {
  "use strict";
  const { h, s } = window.VievalDraw;
  const $ = (sel) => document.querySelector(sel);
  const METRIC_DASH = ["", "5 3", "2 3", "8 3 2 3"];
  let C = { pickSteps: [], onPick: () => {}, colorOf: () => "#000" };

  // steps: the x axis (evaluated and logged steps); tickSteps: the steps labelled (the
  // evaluated ones, so checkpoints every 200 read 0, 200, 400, not 0, 220, 440)
  function chartFrame(svg, steps, ymax, tickSteps) {
    const W = Math.max(200, svg.clientWidth || 400), H = Math.max(100, svg.clientHeight || 130);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.replaceChildren();
    const L = 34, R = 10, T = 18, B = 20;
    const lo = Math.min(...steps), hi = Math.max(...steps);
    const x = (st) => (hi === lo ? (L + W - R) / 2 : L + ((st - lo) / (hi - lo)) * (W - L - R));
    const y = (v) => T + (1 - v / ymax) * (H - T - B);
    for (let q = 0; q <= 4; q++) {
      const v = (ymax * q) / 4;
      svg.append(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      svg.append(s("text", { x: L - 4, y: y(v) + 3, class: "tick y", text: ymax >= 10 ? v.toFixed(0) : v.toFixed(2) }));
    }
    // step labels: every k-th, the last always; a label that would overlap its neighbour
    // (the last one is often close to a regular tick) gives way
    const ticks = tickSteps && tickSteps.length ? tickSteps : steps;
    const every = Math.max(1, Math.ceil(ticks.length / 8));
    const labels = [];
    ticks.forEach((st, k) => {
      if (k % every !== 0 && k !== ticks.length - 1) return;
      if (labels.length && x(st) - labels[labels.length - 1].x < 38) {
        if (k !== ticks.length - 1) return;
        labels.pop();
      }
      labels.push({ x: x(st), st });
    });
    labels.forEach((l) => svg.append(s("text", { x: l.x, y: H - 5, class: "tick x", text: String(l.st) })));
    svg.append(s("line", { x1: 0, x2: 0, y1: T, y2: H - B, class: "cursor", "data-role": "cursor" }));
    svg.onclick = (ev) => {
      const rect = svg.getBoundingClientRect();
      const px = ((ev.clientX - rect.left) / rect.width) * W;
      const pick = C.pickSteps;
      if (!pick.length) return;
      C.onPick(pick.reduce((b, st) => (Math.abs(x(st) - px) < Math.abs(x(b) - px) ? st : b), pick[0]));
    };
    svg.__x = x;
    return { x, y };
  }
  function polyline(svg, pts, color, dash, cls) {
    if (!pts.length) return;
    svg.append(s("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none", stroke: color, "stroke-width": 1.8, "stroke-dasharray": dash || null, class: cls }));
  }
  function legend(el, entries) {
    el.replaceChildren();
    for (const [label, color, dash] of entries) {
      const sw = s("svg", { width: 22, height: 8 }, s("line", { x1: 0, x2: 22, y1: 4, y2: 4, stroke: color, "stroke-width": 2, "stroke-dasharray": dash || null }));
      el.append(h("span", { class: "lg" }, sw, label));
    }
  }
  // ctx: {runs, pickSteps, metrics, colorOf, metricName, onPick}
  function renderCharts(ctx) {
    C = ctx;
    const { runs, metrics, metricName } = ctx;
    const runColor = ctx.colorOf;
    const allSteps = new Set(ctx.pickSteps);
    for (const r of runs) for (const l of r.training_log) allSteps.add(l.step);
    const steps = [...allSteps].sort((a, b) => a - b);
    const msvg = $("#metric-chart");
    const { x, y } = chartFrame(msvg, steps.length ? steps : [0], 1, ctx.pickSteps);
    runs.forEach((run) => {
      const color = runColor(run.key);
      metrics.forEach((m) => {
        // the 95% bootstrap interval of each step as a band behind the line
        const withCi = run.aggregates.filter((a) => Array.isArray(a[m + "_ci95"]) && a[m + "_ci95"][0] !== null);
        if (!withCi.length) return;
        const upper = withCi.map((a) => [x(a.step), y(a[m + "_ci95"][1])]);
        const lower = withCi.map((a) => [x(a.step), y(a[m + "_ci95"][0])]).reverse();
        const pts = withCi.length === 1 ? [[upper[0][0] - 3, upper[0][1]], [upper[0][0] + 3, upper[0][1]], [lower[0][0] + 3, lower[0][1]], [lower[0][0] - 3, lower[0][1]]] : [...upper, ...lower];
        const band = s("polygon", { points: pts.map((p) => p.join(",")).join(" "), fill: color, class: "ci-band", "data-metric": m, "data-run": run.key });
        band.append(s("title", { text: `${C.metricName(m)} 95% interval (specimen bootstrap)` }));
        msvg.append(band);
      });
      metrics.forEach((m, mi) => {
        const pts = run.aggregates.filter((a) => a[m] !== null && a[m] !== undefined).map((a) => [x(a.step), y(a[m])]);
        polyline(msvg, pts, color, METRIC_DASH[mi], "line metric-" + m);
        for (const p of pts) msvg.append(s("circle", { cx: p[0], cy: p[1], r: 2.2, fill: color }));
      });
      if (run.best) {
        const b = run.best;
        const labelled = msvg.querySelector(`.best-marker[data-best-step="${b.step}"]`);
        // significant: the best step beats the next best beyond noise (paired test, p < 0.05)
        const sig = b.vs_next ? (b.significant ? "significant" : "not-significant") : "untested";
        const g = s("g", { class: "best-marker", "data-best-step": b.step, "data-run": run.key, "data-significance": sig });
        if (b.vs_next) {
          const v = b.vs_next;
          g.append(s("title", { text: `best vs step ${v.step_a}: ${v.difference >= 0 ? "+" : ""}${(v.difference || 0).toFixed(3)}, p = ${v.p_value === null ? "-" : v.p_value.toPrecision(2)} (${v.test})` }));
        }
        g.append(s("circle", { cx: x(b.step), cy: y(b.value), r: 5.5, fill: "none", stroke: color, "stroke-width": 2 }));
        const bx = x(b.step);
        const anchor = bx > msvg.clientWidth - 40 ? "end" : bx < 60 ? "start" : "middle";
        const tag = sig === "significant" ? " (significant)" : sig === "not-significant" ? " (n.s.)" : "";
        if (!labelled) g.append(s("text", { x: bx, y: y(b.value) - 8, class: "best-label", "text-anchor": anchor, text: "★ best" + tag }));
        msvg.append(g);
      }
      for (const f of run.failed || []) {
        msvg.append(s("text", { x: x(f.step), y: y(0) - 3, class: "failed-mark", text: "✗" }));
      }
    });
    legend($("#metric-legend"), legendEntries(runs, metrics.map((m, mi) => [metricName(m), METRIC_DASH[mi]])));
    // Loss: training loss (solid) and eval loss (dashed), same x axis as the metrics.
    const lsvg = $("#loss-chart");
    let ymax = 0;
    for (const r of runs) for (const l of r.training_log) ymax = Math.max(ymax, l.loss || 0, l.eval_loss || 0);
    const lossEntries = [];
    let hasLog = false;
    const lf = chartFrame(lsvg, steps.length ? steps : [0], ymax > 0 ? niceMax(ymax) : 1, ctx.pickSteps);
    runs.forEach((run) => {
      const color = runColor(run.key);
      for (const [field, dash] of [["loss", ""], ["eval_loss", "5 3"]]) {
        const pts = run.training_log.filter((l) => l[field] !== null && l[field] !== undefined).map((l) => [lf.x(l.step), lf.y(l[field])]);
        polyline(lsvg, pts, color, dash, "line " + field);
        if (field === "eval_loss") for (const p of pts) lsvg.append(s("circle", { cx: p[0], cy: p[1], r: 2, fill: color }));
        if (pts.length) hasLog = true;
      }
    });
    if (hasLog) lossEntries.push(...legendEntries(runs, [["train", ""], ["eval", "5 3"]]));
    if (!lossEntries.length) lsvg.append(s("text", { x: "50%", y: "50%", class: "empty-chart", text: "no training log in the store" }));
    legend($("#loss-legend"), lossEntries);
  }
  // One run: a swatch per series in its colour. Several: colour = run, dash = series.
  function legendEntries(runs, series) {
    const runColor = C.colorOf;
    if (runs.length === 1) return series.map(([label, dash]) => [label, runColor(runs[0].key), dash]);
    return [...runs.map((r) => [r.label, runColor(r.key), ""]), ...series.map(([label, dash]) => [label, "#64748b", dash])];
  }
  function niceMax(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function markChartStep(step) {
    for (const svg of [$("#metric-chart"), $("#loss-chart")]) {
      const c = svg.querySelector("[data-role=cursor]");
      if (!c || !svg.__x || step === null) continue;
      c.setAttribute("x1", svg.__x(step));
      c.setAttribute("x2", svg.__x(step));
    }
  }

  window.VievalCharts = { renderCharts, markChartStep };
})();
