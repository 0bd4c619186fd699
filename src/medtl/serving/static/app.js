"use strict";
// medtl's page: reads the model (GET v1/model), sends each image to v1/predict and v1/preview,
// and v1/explain on demand. Plain DOM, no framework, no build step. Every text that comes from
// the server or a file name goes in with textContent, never as HTML.
(() => {
  const TOKEN_KEY = "medtl-token"; // sessionStorage only: gone when the tab closes
  const WORKERS = 4; // images analysed at once; the server groups concurrent ones into batches
  const METHODS = { gradcam: "Grad-CAM", occlusion: "occlusion" };
  const STATUS = {
    401: "an access token is needed",
    413: "the file is too large",
    415: "this is not a PNG, JPEG, TIFF or DICOM image",
    422: "the image cannot be used",
  };
  const $ = (selector, root = document) => root.querySelector(selector);
  let model = null;

  const fmt = (x) => (typeof x === "number" ? x.toFixed(3) : "–");
  const methodName = (m) => METHODS[m] || m || "heat map";
  // A multi-label model (v1/model "task"): each label has its own probability and threshold.
  const isMultilabel = () => Boolean(model && model.task === "multilabel");

  function element(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function showError(message) {
    const box = $("#error");
    box.textContent = message;
    box.hidden = !message;
  }

  // ---- the API --------------------------------------------------------------------------
  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  function detailText(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => (d && d.msg) || String(d)).join("; ");
    return "";
  }

  async function call(path, body) {
    let response;
    try {
      response = await fetch(path, {
        method: body ? "POST" : "GET", body, headers: authHeaders(), cache: "no-store",
      });
    } catch {
      throw new Error("the server cannot be reached");
    }
    if (response.ok) return response;
    let detail = "";
    try {
      detail = detailText((await response.json()).detail);
    } catch {
      // not JSON: the status alone says what went wrong
    }
    if (response.status === 401) askForToken();
    // The server's detail is in words already; the status is the fallback.
    throw new Error(detail || STATUS[response.status] || `the server answered ${response.status}`);
  }

  function upload(field, file) {
    const form = new FormData();
    form.append(field, file, file.name);
    return form;
  }

  // ---- access token ---------------------------------------------------------------------
  function askForToken() {
    $("#auth").hidden = false;
    $("#token").focus();
  }

  $("#auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token").value = "";
    $("#auth").hidden = true;
    loadModel();
  });

  // ---- the model card -------------------------------------------------------------------
  function humanize(key) {
    const text = String(key).replace(/[_-]+/g, " ").replace(/\bauc\b/gi, "AUC");
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  // A card value in words: a number, a list or a flat record.
  function describe(value) {
    if (value === null || value === undefined) return "";
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : fmt(value);
    if (Array.isArray(value)) return value.map(describe).join(", ");
    if (typeof value === "object") {
      return Object.entries(value).map(([k, v]) => `${humanize(k)}: ${describe(v)}`).join("; ");
    }
    return String(value);
  }

  // The card's summary keys (medtl.export.card._summary), shown in this order and words.
  const SHOWN = ["model", "task", "classes", "positive_class", "split", "auc", "auc_ci95", "n",
    "research_use", "line"];

  function performance(s) {
    if (typeof s.auc !== "number") return "";
    const ci = Array.isArray(s.auc_ci95) ? s.auc_ci95 : [];
    return fmt(s.auc) + (ci.length === 2 ? ` (95 % CI ${fmt(ci[0])}–${fmt(ci[1])})` : "")
      + (typeof s.n === "number" ? `, n = ${s.n} images` : "");
  }

  function renderCard(m) {
    const card = m.card && typeof m.card === "object" ? m.card : {};
    const s = card.summary && typeof card.summary === "object" ? card.summary : {};
    $("#model-name").textContent = s.model || m.id || "model";
    const list = $("#card-summary");
    list.replaceChildren();
    const add = (term, value) => {
      const text = describe(value);
      if (text) list.append(element("dt", "", term), element("dd", "", text));
    };
    const multilabel = m.task === "multilabel";
    add("Model", s.model);
    add("Task", s.task);
    add(multilabel ? "Labels" : "Classes", m.classes);
    add("Positive class", m.positive_class);
    add(`${s.split === "val" ? "Validation" : "Test"} ${multilabel ? "macro " : ""}AUC`,
      performance(s));
    add("Operating points", Object.entries(m.operating_points || {})
      .map(([name, threshold]) => `${name} (threshold ${fmt(threshold)})`));
    if (multilabel) {
      const chosen = m.thresholds_chosen || {};
      add("Thresholds", Object.entries(m.thresholds || {})
        .map(([label, threshold]) => `${label} ${fmt(threshold)}`).join(", ")
        + (chosen.chosen_on ? ` (chosen on ${chosen.chosen_on})` : ` (${chosen.rule || ""})`));
    }
    for (const [key, value] of Object.entries(s)) if (!SHOWN.includes(key)) add(humanize(key), value);
    add("Heat map", methodName(m.explain));
    add("Bundle", m.id);
    add("sha256", m.sha256);
    $("#model-card").hidden = false;
  }

  async function loadModel() {
    try {
      model = await (await call("v1/model")).json();
    } catch (err) {
      showError(`The model cannot be shown: ${err.message}.`);
      return;
    }
    showError("");
    renderCard(model);
  }

  // ---- one result per image -------------------------------------------------------------
  function newResult(file) {
    const card = $("#result-template").content.firstElementChild.cloneNode(true);
    card.dataset.file = file.name;
    $(".file-name", card).textContent = file.name;
    $(".preview-image", card).alt = `${file.name} as the model reads it`;
    return card;
  }

  function renderBars(card, probabilities, predicted) {
    const order = model && model.classes ? model.classes : Object.keys(probabilities);
    const bars = $(".bars", card);
    for (const name of order.filter((c) => c in probabilities)) {
      const p = probabilities[name];
      const bar = element("li", name === predicted ? "bar is-predicted" : "bar");
      bar.dataset.class = name;
      bar.dataset.probability = String(p);
      const fill = element("span", "bar-fill");
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`; // CSSOM: allowed by the CSP
      const track = element("span", "bar-track");
      track.setAttribute("aria-hidden", "true");
      track.append(fill);
      bar.append(element("span", "bar-label", name), track, element("span", "bar-value", fmt(p)));
      bars.append(bar);
    }
  }

  function renderDecisions(card, decisions) {
    const body = $(".decisions tbody", card);
    for (const [point, d] of Object.entries(decisions || {})) {
      const row = element("tr", d.positive ? "positive" : "negative");
      row.dataset.point = point;
      const name = element("th", "", point);
      name.scope = "row";
      row.append(name, element("td", "threshold", fmt(d.threshold)),
        element("td", "decision", d.label));
      body.append(row);
    }
    if (!body.children.length) $(".decisions", card).hidden = true;
  }

  function renderOod(card, ood) {
    if (!ood) return "";
    const words = `out-of-distribution score ${fmt(ood.score)}, threshold ${fmt(ood.threshold)}`;
    if (!ood.flag) return `; ${words}: in distribution`;
    card.classList.add("is-ood");
    const box = $(".ood-warning", card);
    const reasons = Array.isArray(ood.reasons) ? ood.reasons : [];
    for (const reason of reasons) $(".ood-reasons", box).append(element("li", "", reason));
    // The server's reasons say why; without any, the score is the reason.
    if (!reasons.length) $(".ood-detail", box).textContent = `(Its ${words}.)`;
    box.hidden = false;
    return `; ${words}`;
  }

  // A multi-label result: one row per label (probability, its threshold, present or not).
  function renderLabels(card, labels) {
    const body = $(".labels tbody", card);
    const order = model && model.classes ? model.classes : Object.keys(labels);
    for (const name of order.filter((c) => c in labels)) {
      const d = labels[name];
      const present = d.present === true;
      const row = element("tr", present ? "present" : "absent");
      row.dataset.label = name;
      row.dataset.probability = String(d.probability);
      const head = element("th", "", name);
      head.scope = "row";
      row.append(head, element("td", "probability", fmt(d.probability)),
        element("td", "threshold", fmt(d.threshold)),
        element("td", "decision", present ? "present" : "absent"));
      body.append(row);
    }
  }

  function renderResult(card, r) {
    if (r.task === "multilabel") {
      $(".predicted", card).hidden = true;
      $(".single-label", card).hidden = true;
      $(".multi-label", card).hidden = false;
      const present = $(".present", card);
      $(".present-labels", card).textContent = Array.isArray(r.present) && r.present.length
        ? r.present.join(", ") : "none";
      present.hidden = false;
      renderLabels(card, r.labels || {});
    } else {
      renderSingle(card, r);
    }
    const ood = renderOod(card, r.ood);
    const sha = r.model && r.model.sha256 ? ` (sha256 ${r.model.sha256.slice(0, 12)}…)` : "";
    const latency = typeof r.latency_ms === "number" ? `${r.latency_ms.toFixed(0)} ms` : "";
    $(".meta", card).textContent = `Model ${(r.model && r.model.id) || ""}${sha}, ${latency}${ood}`;
    $(".prediction", card).hidden = false;
    $(".status", card).hidden = true;
    card.dataset.state = "done";
  }

  function renderSingle(card, r) {
    const cls = $(".predicted-class", card);
    cls.textContent = r.predicted_class;
    cls.dataset.class = r.predicted_class;
    const prob = $(".predicted-probability", card);
    prob.textContent = fmt(r.probability);
    prob.dataset.probability = String(r.probability);
    renderBars(card, r.probabilities, r.predicted_class);
    renderDecisions(card, r.decisions);
  }

  function setupHeatmap(card, file) {
    const button = $(".heatmap-toggle", card);
    const img = $(".preview-image", card);
    const caption = $(".preview-caption", card);
    let overlay = null;
    let method = model && model.explain;
    let target = "";
    const label = (showing) => {
      button.textContent = showing ? "Show the image" : `Show heat map (${methodName(method)})`;
      button.setAttribute("aria-pressed", String(showing));
      caption.textContent = showing ? `Heat map: ${methodName(method)}${target}`
        : "The image as the model reads it";
    };
    label(false);
    // A multi-label model: the heat map is for one label (the server's default: the most
    // probable); choosing another label computes a new map.
    const choice = $(".heatmap-target", card);
    if (isMultilabel()) {
      for (const name of model.classes || []) {
        const option = element("option", "", name);
        option.value = name;
        choice.append(option);
      }
      $(".heatmap-target-label", card).hidden = false;
      choice.addEventListener("change", () => {
        if (overlay) URL.revokeObjectURL(overlay);
        overlay = null;
        if (img.dataset.view === "heatmap") {
          img.src = img.dataset.preview || "";
          img.dataset.view = "preview";
          img.dataset.method = "";
        }
        label(false);
      });
    }
    button.addEventListener("click", async () => {
      if (!overlay) {
        button.disabled = true;
        button.textContent = "Computing the heat map…";
        try {
          const form = upload("file", file);
          if (isMultilabel() && choice.value) form.append("target", choice.value);
          const response = await call("v1/explain", form);
          method = response.headers.get("X-Medtl-Explain-Method") || method;
          const cls = response.headers.get("X-Medtl-Target");
          target = cls ? ` for ${isMultilabel() ? "label" : "class"} ${cls}` : "";
          overlay = URL.createObjectURL(await response.blob());
        } catch (err) {
          $(".status", card).hidden = false;
          $(".status", card).textContent = `No heat map: ${err.message}.`;
        } finally {
          button.disabled = false;
        }
        if (!overlay) return label(false);
      }
      const showing = img.dataset.view !== "heatmap";
      img.src = showing ? overlay : img.dataset.preview || "";
      img.dataset.view = showing ? "heatmap" : "preview";
      img.dataset.method = showing ? method : "";
      label(showing);
    });
    button.disabled = false;
  }

  async function analyse(file, card) {
    const preview = call("v1/preview", upload("file", file))
      .then((response) => response.blob())
      .then((blob) => {
        const img = $(".preview-image", card);
        img.dataset.preview = URL.createObjectURL(blob);
        if (img.dataset.view !== "heatmap") img.src = img.dataset.preview;
        img.dataset.view = img.dataset.view || "preview";
      })
      .catch((err) => { $(".preview-caption", card).textContent = `No preview: ${err.message}.`; });
    try {
      const data = await (await call("v1/predict", upload("files", file))).json();
      renderResult(card, data.results[0]);
      setupHeatmap(card, file);
    } catch (err) {
      card.dataset.state = "failed";
      card.classList.add("failed");
      $(".result-body", card).hidden = true;
      $(".status", card).textContent = `Not analysed: ${err.message}`;
      $(".status", card).setAttribute("role", "alert");
    }
    await preview;
  }

  async function handleFiles(fileList) {
    const queue = Array.from(fileList, (file) => [file, newResult(file)]);
    $("#results").prepend(...queue.map(([, card]) => card)); // newest first, in the order chosen
    const worker = async () => {
      while (queue.length) await analyse(...queue.shift());
    };
    await Promise.all(Array.from({ length: Math.min(WORKERS, queue.length) }, worker));
  }

  // ---- file picker and drag and drop ----------------------------------------------------
  const input = $("#file-input");
  input.addEventListener("change", () => {
    handleFiles(input.files);
    input.value = ""; // choosing the same file again analyses it again
  });
  const zone = $("#drop-zone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    handleFiles(event.dataTransfer.files);
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());

  loadModel();
})();
