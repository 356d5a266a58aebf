// The imgcls page: upload images, show the model's top classes and its Grad-CAM heatmaps.
// Plain JavaScript, no build step; every request goes to the server that served this page
// (paths are relative so the page also works behind a path prefix).
"use strict";

(() => {
  const DEFAULT_MAX_BYTES = 10_000_000; // per file, when the model card does not say
  const DEFAULT_MAX_FILES = 32; // per request, when the model card does not say
  const TOP_K = 5;
  const KEY_STORAGE = "imgcls.apiKey";
  const PIXELATED_BELOW = 96; // px: smaller images are scaled up without smoothing
  const LONG_CLASS_NAME = 14; // characters: a longer top class does not fit beside its bar

  const state = {
    maxBytes: DEFAULT_MAX_BYTES,
    maxFiles: DEFAULT_MAX_FILES,
    cards: new Map(),
    nextId: 1,
    pasted: 0,
  };

  const $ = (selector, root = document) => root.querySelector(selector);

  // ---------------------------------------------------------------- API key

  function readKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch (err) {
      return ""; // storage disabled: behave as if no key was saved
    }
  }

  function writeKey(value) {
    try {
      if (value) localStorage.setItem(KEY_STORAGE, value);
      else localStorage.removeItem(KEY_STORAGE);
      return true;
    } catch (err) {
      return false;
    }
  }

  function authHeaders() {
    const key = readKey();
    return key ? { "X-API-Key": key } : {};
  }

  function setupApiKey() {
    const input = $("#api-key");
    const stateLine = $("#api-key-state");
    input.value = readKey();
    if (input.value) stateLine.textContent = "A key is saved in this browser and sent with every request.";
    $("#api-key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const ok = writeKey(input.value.trim());
      stateLine.textContent = ok
        ? (input.value.trim() ? "Saved. It is sent as X-API-Key with every request." : "No key saved.")
        : "This browser does not allow saving (localStorage is off).";
      hideGlobalError();
      loadModelCard();
    });
    $("#api-key-clear").addEventListener("click", () => {
      input.value = "";
      writeKey("");
      stateLine.textContent = "Forgotten. Requests are sent without a key.";
    });
  }

  // What a person is told when the server refuses the key (the server's own message is for API clients).
  function keyProblem() {
    return readKey()
      ? "The server did not accept the API key saved in this browser. Enter the right key under “API key” at the top of the page."
      : "This server needs an API key. Enter it under “API key” at the top of the page.";
  }

  function askForKey() {
    const panel = $("#api-key-panel");
    panel.open = true;
    $("#api-key").focus();
  }

  // ---------------------------------------------------------------- requests

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // The server answers errors as {"error": {"code", "message"}}; show its message as is.
  async function errorFrom(response) {
    let message = "";
    let code = "";
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || "";
        code = body.error.code || "";
      } else if (body && typeof body.detail === "string") {
        message = body.detail;
      } else if (body && Array.isArray(body.detail)) {
        message = body.detail.map((d) => d.msg || String(d)).join("; ");
      }
    } catch (err) {
      // not JSON: fall back to the status line
    }
    if (!message) message = `The server answered ${response.status} ${response.statusText || ""}`.trim() + ".";
    return new ApiError(message, response.status, code);
  }

  async function request(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    } catch (err) {
      throw new ApiError("The server could not be reached. Check that imgcls serve is still running, then retry.", 0, "network");
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  // ---------------------------------------------------------------- formatting

  const NUMBER = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

  // 999 B, 12.3 kB, 10 MB, 1.5 GB: one decimal at most.
  function formatBytes(bytes) {
    if (bytes < 1000) return `${bytes} B`;
    if (bytes < 1_000_000) return `${NUMBER.format(bytes / 1000)} kB`;
    if (bytes < 1_000_000_000) return `${NUMBER.format(bytes / 1_000_000)} MB`;
    return `${NUMBER.format(bytes / 1_000_000_000)} GB`;
  }

  // Exact, with separators: for when the rounded sizes of two numbers would read the same.
  function formatExactBytes(bytes) {
    return `${NUMBER.format(bytes)} bytes`;
  }

  // A message as a sentence: a capital first letter (unless it starts with the file's own name,
  // whose case is the file's) and a full stop.
  function asSentence(text, fileName = "") {
    let out = String(text || "").trim();
    if (!out) return out;
    if (!(fileName && out.startsWith(fileName))) out = out[0].toUpperCase() + out.slice(1);
    return /[.!?]$/.test(out) ? out : `${out}.`;
  }

  function formatPercent(p, digits = 1) {
    return `${(100 * p).toFixed(digits)}%`;
  }

  function formatCount(n) {
    if (n >= 1e6) return `${(n / 1e6).toFixed(n >= 1e7 ? 0 : 1)}M`;
    if (n >= 1e3) return `${(n / 1e3).toFixed(n >= 1e4 ? 0 : 1)}k`;
    return String(n);
  }

  // input_shape may be (C, H, W), (H, W, C) or carry a leading batch dimension.
  function describeShape(shape) {
    if (!Array.isArray(shape) || shape.length < 2) return shape ? String(shape) : "";
    let dims = shape.slice(-3);
    if (dims.length === 2) return `${dims[0]} × ${dims[1]} px`;
    const isChannels = (n) => n === 1 || n === 3 || n === 4;
    let c;
    let h;
    let w;
    if (isChannels(dims[0]) && !isChannels(dims[2])) [c, h, w] = dims;
    else if (isChannels(dims[2])) [h, w, c] = dims;
    else [c, h, w] = dims;
    const colour = c === 1 ? "greyscale" : c === 3 ? "RGB" : `${c} channels`;
    return `${h} × ${w} px, ${colour}`;
  }

  function formatDate(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }

  // ---------------------------------------------------------------- model card

  function addFact(list, term, value) {
    if (value === undefined || value === null || value === "") return;
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }

  function renderModelCard(card) {
    const panel = $("#model-card");
    const facts = $(".model-facts", panel);
    facts.replaceChildren();
    const metrics = card.test_metrics || {};
    addFact(facts, "Name", card.name);
    addFact(facts, "Architecture", card.arch);
    addFact(facts, "Input", describeShape(card.input_shape));
    if (typeof metrics.map === "number") addFact(facts, "Test mAP", metrics.map.toFixed(3));  // several labels per image
    if (typeof metrics.accuracy === "number") {
      addFact(facts, card.task === "multilabel" ? "Exact-set accuracy" : "Test accuracy", formatPercent(metrics.accuracy));
    }
    if (typeof metrics.macro_f1 === "number") addFact(facts, "Macro F1", metrics.macro_f1.toFixed(3));
    if (card.trained) addFact(facts, "Trained", formatDate(card.trained));
    addFact(facts, "Runtime", card.runtime);
    if (typeof card.parameters === "number") addFact(facts, "Parameters", formatCount(card.parameters));
    if (typeof card.temperature === "number" && card.temperature !== 1) {
      addFact(facts, "Calibration", `temperature ${card.temperature.toFixed(2)}`);
    }
    if (card.has_thresholds !== undefined) {
      addFact(facts, "Thresholds", card.has_thresholds ? "per class" : "none");
    }
    facts.hidden = false;

    const classes = Array.isArray(card.classes) ? card.classes : [];
    const chips = $(".chips", panel);
    chips.replaceChildren();
    const shown = classes.slice(0, 60);
    for (const name of shown) {
      const li = document.createElement("li");
      li.className = "chip";
      li.textContent = name;
      chips.append(li);
    }
    if (classes.length > shown.length) {
      const li = document.createElement("li");
      li.className = "chip more";
      li.textContent = `+${classes.length - shown.length} more`;
      chips.append(li);
    }
    $(".model-classes h3", panel).textContent = `Classes (${classes.length})`;
    $(".model-classes", panel).hidden = classes.length === 0;

    state.maxBytes = card.max_bytes || (card.limits && card.limits.max_bytes) || DEFAULT_MAX_BYTES;
    state.maxFiles = card.max_files || (card.limits && card.limits.max_files) || DEFAULT_MAX_FILES;
    $("#max-size").textContent = formatBytes(state.maxBytes);
    if (card.name) document.title = `${card.name} · imgcls`;
  }

  async function loadModelCard() {
    const panel = $("#model-card");
    const error = $(".error", panel);
    panel.setAttribute("aria-busy", "true");
    error.hidden = true;
    try {
      const response = await request("v1/model");
      renderModelCard(await response.json());
    } catch (err) {
      error.textContent = err.status === 401 ? keyProblem() : asSentence(err.message);
      error.hidden = false;
      if (err.status === 401) askForKey();
    } finally {
      $(".model-loading", panel).hidden = true;
      panel.setAttribute("aria-busy", "false");
    }
  }

  // ---------------------------------------------------------------- cards

  // A problem the page can see before sending: wrong type, too large, empty.
  function clientProblem(file) {
    const name = file.name || "This file";
    if (file.type && !file.type.startsWith("image/")) {
      return `“${name}” is not an image (its type is ${file.type}). Choose a PNG, JPEG, GIF, WebP, BMP or TIFF file.`;
    }
    if (file.size === 0) return `“${name}” is empty (0 bytes).`;
    if (file.size > state.maxBytes) {
      let size = formatBytes(file.size);
      let limit = formatBytes(state.maxBytes);
      if (size === limit) [size, limit] = [formatExactBytes(file.size), `${limit} (${formatExactBytes(state.maxBytes)})`];
      return `“${name}” is too large: ${size}, and the limit is ${limit} per image. Choose a smaller file.`;
    }
    return "";
  }

  function createCard(file) {
    const id = state.nextId++;
    const el = $("#card-template").content.firstElementChild.cloneNode(true);
    el.dataset.id = String(id);
    const card = { id, file, el, previewUrl: "", heatmapUrl: "", heatmapLoading: null, top: null, done: false };
    state.cards.set(id, card);

    const title = $(".filename", el);
    title.textContent = file.name || "pasted image";
    title.title = file.name || "";
    title.id = `card-title-${id}`;
    el.setAttribute("aria-labelledby", title.id);
    $(".meta", el).textContent = [formatBytes(file.size), file.type || "unknown type"].join(" · ");
    $(".remove", el).setAttribute("aria-label", `Remove ${file.name || "image"}`);
    $(".remove", el).addEventListener("click", () => removeCard(card, true));

    const preview = $(".preview", el);
    preview.alt = `Preview of ${file.name || "the pasted image"}`;
    preview.addEventListener("load", () => {
      if (preview.naturalWidth < PIXELATED_BELOW) $(".card-media", el).classList.add("pixelated");
    });
    preview.addEventListener("error", () => $(".card-media", el).classList.add("no-preview"));
    if (file.type.startsWith("image/") || !file.type) {
      card.previewUrl = URL.createObjectURL(file);
      preview.src = card.previewUrl;
    } else {
      $(".card-media", el).classList.add("no-preview");
    }

    $(".retry", el).setAttribute("aria-label", `Retry ${file.name || "the image"}`);
    $(".retry", el).addEventListener("click", () => retryCard(card));

    const toggle = $(".heatmap-toggle", el);
    toggle.id = `heatmap-toggle-${id}`;
    toggle.addEventListener("change", () => setHeatmap(card, toggle.checked));

    $("#results").prepend(el);
    return card;
  }

  function removeCard(card, moveFocus) {
    const next = card.el.nextElementSibling || card.el.previousElementSibling;
    if (card.previewUrl) URL.revokeObjectURL(card.previewUrl);
    if (card.heatmapUrl) URL.revokeObjectURL(card.heatmapUrl);
    card.el.remove();
    state.cards.delete(card.id);
    if (state.cards.size === 0) resetViewState();
    if (moveFocus) {
      const target = next ? $(".remove", next) : $("#file-input");
      target.focus();
    }
    updateStatus();
  }

  // With no card left, nothing set for the old ones carries over to the next images.
  function resetViewState() {
    setAllHeatmapsButton(false);
    state.pasted = 0;
    hideGlobalError();
  }

  // canRetry: the file was sent and the answer was an error; a file the page refused itself would
  // be refused the same way again.
  function showCardError(card, message, canRetry = false) {
    if (!state.cards.has(card.id)) return; // removed while waiting
    const el = card.el;
    $(".loading", el).hidden = true;
    const error = $(".error", el);
    error.textContent = asSentence(message, card.file.name);
    error.hidden = false;
    $(".retry", el).hidden = !canRetry;
    el.classList.add("has-error");
    el.setAttribute("aria-busy", "false");
    card.done = true;
    updateStatus();
  }

  // Send the same file again; the card goes back to "Classifying…" and shows the new answer.
  function retryCard(card) {
    const el = card.el;
    const retry = $(".retry", el);
    const focusTarget = $(".remove", el);
    if (document.activeElement === retry) focusTarget.focus(); // the button is about to be hidden
    retry.hidden = true;
    $(".error", el).hidden = true;
    $(".probs", el).hidden = true;
    $(".answer", el).hidden = true;
    $(".switch", el).hidden = true;
    $(".loading", el).hidden = false;
    el.classList.remove("has-error", "done");
    el.setAttribute("aria-busy", "true");
    card.done = false;
    card.top = null;
    hideGlobalError();
    updateStatus();
    predict([card]);
  }

  // Class names like "staffordshire_bull_terrier" have no spaces: let them break after _ - . /
  // (no look-behind in the pattern: Safari before 16.4 would refuse the whole script)
  function setBreakableText(el, text) {
    el.replaceChildren();
    const value = String(text);
    let start = 0;
    for (const match of value.matchAll(/[_\-./]/g)) {
      el.append(value.slice(start, match.index + 1), document.createElement("wbr"));
      start = match.index + 1;
    }
    el.append(value.slice(start));
  }

  function renderPrediction(card, prediction) {
    const el = card.el;
    const top = Array.isArray(prediction.top) ? prediction.top : [];
    const list = $(".probs", el);
    list.replaceChildren();
    top.forEach((entry, rank) => {
      const li = document.createElement("li");
      li.className = rank === 0 ? "prob-row best" : "prob-row";
      // A top class longer than its column (8rem, about 14 characters) gets a line of its own.
      if (rank === 0 && String(entry.class).length > LONG_CLASS_NAME) li.classList.add("long");
      const label = document.createElement("span");
      label.className = "prob-label";
      if (rank === 0) setBreakableText(label, entry.class);
      else label.textContent = entry.class;
      label.title = entry.class;
      const bar = document.createElement("span");
      bar.className = "prob-bar";
      bar.dataset.class = entry.class;
      bar.dataset.probability = String(entry.probability);
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "prob-fill";
      fill.style.width = `${Math.max(0, Math.min(1, entry.probability)) * 100}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "prob-value";
      value.textContent = formatPercent(entry.probability);
      li.append(label, bar, value);
      list.append(li);
    });
    list.hidden = top.length === 0;
    list.setAttribute("aria-label", `Top ${top.length} classes`);
    card.top = top.length ? top[0] : null;

    const answer = $(".answer", el);
    if (Array.isArray(prediction.labels)) {
      // A multi-label model: every label that clears its threshold, most probable first.
      answer.replaceChildren("Labels: ");
      prediction.labels.forEach((name, i) => {
        if (i) answer.append(", ");
        const tag = document.createElement("strong");
        tag.textContent = name;
        answer.append(tag);
      });
      if (!prediction.labels.length) {
        answer.append(document.createTextNode(prediction.answer === "unknown"
          ? `unknown — not like the images the model learned (score ${Number(prediction.ood_score).toFixed(3)})`
          : "none — no label cleared its threshold"));
      }
      answer.classList.toggle("unknown", !prediction.labels.length);
      answer.hidden = false;
    } else if (typeof prediction.answer === "string") {
      const unknown = prediction.answer === "unknown";
      answer.replaceChildren();
      const tag = document.createElement("strong");
      tag.textContent = prediction.answer;
      answer.append("Answer: ", tag);
      if (unknown) {
        answer.append(document.createTextNode(typeof prediction.ood_score === "number"
          ? ` — not like the images the model learned (score ${prediction.ood_score.toFixed(3)})`
          : " — no class cleared its threshold"));
      }
      answer.classList.toggle("unknown", unknown);
      answer.hidden = false;
    } else {
      answer.hidden = true;
    }

    $(".loading", el).hidden = true;
    $(".switch", el).hidden = false;
    if (card.top) $(".switch-label", el).textContent = `Show Grad-CAM for “${card.top.class}”`;
    el.classList.add("done");
    el.setAttribute("aria-busy", "false");
    card.done = true;
    updateStatus();
    if ($("#heatmaps-all").getAttribute("aria-pressed") === "true") {
      $(".heatmap-toggle", el).checked = true;
      setHeatmap(card, true);
    }
  }

  // ---------------------------------------------------------------- predict

  async function predict(cards) {
    const form = new FormData();
    for (const card of cards) form.append("files", card.file, card.file.name || "pasted.png");
    try {
      const response = await request(`v1/predict?top_k=${TOP_K}`, { method: "POST", body: form });
      const body = await response.json();
      const predictions = Array.isArray(body.predictions) ? body.predictions : [];
      cards.forEach((card, i) => {
        if (!state.cards.has(card.id)) return; // removed while waiting
        if (predictions[i]) renderPrediction(card, predictions[i]);
        else showCardError(card, "The server sent no prediction for this image.", true);
      });
    } catch (err) {
      if (err.status === 401) {
        showGlobalError(`${keyProblem()} Then press Retry on the images.`);
        askForKey();
        cards.forEach((card) => showCardError(card, "Not classified: the server needs an API key.", true));
      } else if (cards.length > 1 && err.status >= 400 && err.status < 500) {
        // One bad file fails the whole request: ask again one by one, so the good ones
        // still get their classes and each bad one gets its own message.
        await Promise.all(cards.map((card) => predict([card])));
      } else {
        cards.forEach((card) => showCardError(card, err.message, true));
      }
    }
  }

  function addFiles(files) {
    const list = Array.from(files || []);
    if (list.length === 0) return;
    hideGlobalError();
    $("#toolbar").hidden = false;
    const valid = [];
    for (const file of list) {
      const card = createCard(file);
      const problem = clientProblem(file);
      if (problem) showCardError(card, problem);
      else valid.push(card);
    }
    updateStatus();
    for (let i = 0; i < valid.length; i += state.maxFiles) predict(valid.slice(i, i + state.maxFiles));
  }

  // ---------------------------------------------------------------- heatmaps

  async function loadHeatmap(card) {
    const form = new FormData();
    form.append("file", card.file, card.file.name || "pasted.png");
    const response = await request("v1/explain?format=png", { method: "POST", body: form });
    const blob = await response.blob();
    card.heatmapUrl = URL.createObjectURL(blob);
    const img = $(".heatmap", card.el);
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new ApiError("The heatmap could not be displayed.", 0, "decode"));
      img.src = card.heatmapUrl;
    });
    if (img.naturalWidth < PIXELATED_BELOW) $(".card-media", card.el).classList.add("pixelated");
  }

  async function setHeatmap(card, on) {
    const el = card.el;
    const toggle = $(".heatmap-toggle", el);
    const img = $(".heatmap", el);
    const media = $(".card-media", el);
    toggle.checked = on;
    if (!on) {
      media.classList.remove("showing-heatmap");
      $(".media-badge", el).hidden = true;
      return;
    }
    if (!card.heatmapUrl) {
      media.classList.add("loading-heatmap");
      toggle.disabled = true;
      try {
        card.heatmapLoading = card.heatmapLoading || loadHeatmap(card);
        await card.heatmapLoading;
      } catch (err) {
        card.heatmapLoading = null;
        toggle.checked = false;
        const error = $(".error", el);
        error.textContent = `The heatmap could not be made. ${asSentence(err.message, card.file.name)}`;
        error.hidden = false;
        return;
      } finally {
        media.classList.remove("loading-heatmap");
        toggle.disabled = false;
      }
    }
    if (!toggle.checked) return; // switched off while loading
    img.alt = `Grad-CAM heatmap of ${card.file.name || "the image"}${card.top ? ` for class ${card.top.class}` : ""}`;
    img.hidden = false;
    media.classList.add("showing-heatmap");
    $(".media-badge", el).hidden = false;
  }

  function setAllHeatmapsButton(on) {
    const button = $("#heatmaps-all");
    button.setAttribute("aria-pressed", String(on));
    button.textContent = on ? "Hide all heatmaps" : "Show all heatmaps";
  }

  function toggleAllHeatmaps() {
    const on = $("#heatmaps-all").getAttribute("aria-pressed") !== "true";
    setAllHeatmapsButton(on);
    for (const card of state.cards.values()) {
      if (card.done && card.top) setHeatmap(card, on);
    }
  }

  // ---------------------------------------------------------------- status

  function updateStatus() {
    const cards = Array.from(state.cards.values());
    const pending = cards.filter((c) => !c.done).length;
    const failed = cards.filter((c) => c.el.classList.contains("has-error") && !c.top).length;
    const classified = cards.filter((c) => c.top).length;
    const parts = [`${cards.length} image${cards.length === 1 ? "" : "s"}`];
    if (classified) parts.push(`${classified} classified`);
    if (pending) parts.push(`${pending} waiting`);
    if (failed) parts.push(`${failed} with a problem`);
    $("#status").textContent = parts.join(" · ");
    $("#toolbar").hidden = cards.length === 0;
  }

  function showGlobalError(message) {
    const el = $("#global-error");
    el.textContent = message;
    el.hidden = false;
  }

  function hideGlobalError() {
    $("#global-error").hidden = true;
  }

  // ---------------------------------------------------------------- input: picker, drop, paste

  function hasFiles(event) {
    return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  }

  function setupInputs() {
    const input = $("#file-input");
    const drop = $("#drop");
    input.addEventListener("change", () => {
      addFiles(input.files);
      input.value = ""; // choosing the same file again still fires "change"
    });

    // The whole window accepts a drop, so a near miss does not open the file in the tab.
    let depth = 0;
    window.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      depth += 1;
      drop.classList.add("dragging");
    });
    window.addEventListener("dragleave", (event) => {
      if (!hasFiles(event)) return;
      depth = Math.max(0, depth - 1);
      if (depth === 0) drop.classList.remove("dragging");
    });
    window.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    });
    window.addEventListener("drop", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      depth = 0;
      drop.classList.remove("dragging");
      addFiles(event.dataTransfer.files);
    });

    document.addEventListener("paste", (event) => {
      if (event.target && event.target.id === "api-key") return;
      const data = event.clipboardData;
      if (!data) return;
      const files = [];
      for (const item of Array.from(data.items || [])) {
        if (item.kind !== "file") continue;
        const blob = item.getAsFile();
        if (!blob) continue;
        // Screenshots arrive as "image.png"; number them so the cards can be told apart.
        state.pasted += 1;
        const ext = (blob.type.split("/")[1] || "png").replace("jpeg", "jpg");
        const name = blob.name && blob.name !== "image.png" ? blob.name : `pasted-${state.pasted}.${ext}`;
        files.push(new File([blob], name, { type: blob.type }));
      }
      if (files.length) {
        event.preventDefault();
        addFiles(files);
      }
    });

    $("#clear-all").addEventListener("click", () => {
      for (const card of Array.from(state.cards.values())) removeCard(card, false);
      resetViewState(); // also done by the last removeCard; here for a click with no card left
      $("#file-input").focus();
    });
    $("#heatmaps-all").addEventListener("click", toggleAllHeatmaps);
  }

  function start() {
    if (/Mac|iPhone|iPad/.test(navigator.platform || "")) $(".paste-hint kbd").textContent = "⌘";
    setupApiKey();
    setupInputs();
    loadModelCard();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
