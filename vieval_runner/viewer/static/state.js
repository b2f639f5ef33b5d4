// vieval viewer state and data access: the page's one state object, the JSON API (or the
// static export's data scripts), the per-step document cache, and score/colour lookups the
// list, the panels and app.js share.
(() => {
  "use strict";

  const DATA = (window.__VIEVAL_DATA__ = window.__VIEVAL_DATA__ || {});
  const STATIC = !!DATA.meta; // export_html embeds meta: no server, no polling
  const RUN_COLORS = ["#6d28d9", "#0e7490", "#be185d", "#4d7c0f", "#b45309"];
  const METRIC_NAMES = {
    f1: "F1", iou_mean: "IoU", precision: "P", recall: "R", exact_match: "EM",
    token_f1: "token F1", bleu: "BLEU", anls: "ANLS", rouge_l: "ROUGE-L",
    vqa_accuracy: "VQA acc", acc_at_50: "acc@0.5", parse_failure_rate: "parse fail",
  };

  const metricName = (m) => METRIC_NAMES[m] || m;
  const S = {
    meta: null, metaRev: null, specRev: null, specimens: [], byId: new Map(),
    shown: [], steps: [], step: null, current: null, order: [],
    cache: new Map(), docs: new Map(), token: 0, pollTimer: null, live: "ok",
  };

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

  // ------------------------------------------------------------------ scores / colours
  function primaryMetric(task) {
    return (S.meta && S.meta.primary && S.meta.primary[task]) || (task === "vqa" ? "token_f1" : "f1");
  }
  function score(row, spec) {
    if (!row) return null;
    const v = row[primaryMetric(spec ? spec.task : "grounding")];
    return v === undefined ? null : v;
  }
  const runColor = (key) => RUN_COLORS[S.meta.runs.findIndex((r) => r.key === key) % RUN_COLORS.length];

  window.VievalState = {
    S, STATIC, api, runByKey, hasStep, getStep, stepDoc, score, runColor, metricName,
  };
})();
