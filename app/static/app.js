"use strict";
// Demo page: pick a model, drop an image, see the top classes and their ViT-ReciproCAM overlays.
(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_UPLOAD_SIDE = 1024; // phone photos are downsized before upload
  const KEY_STORAGE = "reciprocam-api-key";
  const state = {
    file: null, image: null, size: null, explanations: [], predictions: [], active: null,
    heatmaps: new Map(), request: 0,
  };

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  async function apiError(response) {
    if (response.status === 401) askForKey();
    try {
      const body = await response.json();
      const error = body && body.error;
      if (error && typeof error === "object") return `${error.message} (${error.code}, HTTP ${response.status})`;
      if (typeof error === "string") return `${error} (HTTP ${response.status})`;
      if (body && body.detail) return `${JSON.stringify(body.detail)} (HTTP ${response.status})`;
    } catch (_) { /* not JSON */ }
    return `the server answered HTTP ${response.status} ${response.statusText}`.trim();
  }

  // API keys: only asked for when the server answers 401; kept for this browser tab.
  function apiKey() {
    try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch (_) { return ""; }
  }

  function askForKey() {
    $("key-field").hidden = false;
    $("key").focus();
  }

  function headers() {
    const key = apiKey();
    return key ? { "X-API-Key": key } : {};
  }

  async function call(url, options = {}) {
    let response;
    try {
      response = await fetch(url, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
    } catch (error) {
      throw new Error(`the server could not be reached (${error.message})`);
    }
    if (!response.ok) throw new Error(await apiError(response));
    return response.json();
  }

  // The jet colour map, as the server renders it: the legend matches the overlay.
  function jet(t) {
    const c = (x) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * t - x))));
    return [c(3), c(2), c(1)];
  }

  function drawLegend() {
    const canvas = $("legend");
    const ctx = canvas.getContext("2d");
    for (let x = 0; x < canvas.width; x++) {
      const [r, g, b] = jet(x / (canvas.width - 1));
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(x, 0, 1, canvas.height);
    }
  }

  async function loadModels() {
    const body = await call("/v1/models");
    const models = body.models || body.data || [];
    const select = $("model");
    select.innerHTML = "";
    let firstReady = null;
    for (const model of models) {
      const option = document.createElement("option");
      option.value = model.name;
      const ready = model.status === "ready";
      option.textContent = ready ? `${model.name} (${model.arch})` : `${model.name} — unavailable`;
      option.disabled = !ready;
      option.title = model.reason || "";
      option.dataset.info = JSON.stringify(model);
      select.appendChild(option);
      if (ready && firstReady === null) firstReady = model.name;
    }
    if (firstReady === null) {
      if (!models.length) select.innerHTML = "<option disabled>no models</option>";
      showError("No model is ready on this server. " + models.map((m) => `${m.name}: ${m.reason || m.status}`).join("; "));
    } else {
      select.value = firstReady;
      showError("");
    }
    describeModel();
  }

  function describeModel() {
    const option = $("model").selectedOptions[0];
    if (!option) return;
    const model = JSON.parse(option.dataset.info);
    const parts = [`${model.num_classes ?? "?"} classes`];
    if (model.input_size) parts.push(`input ${model.input_size[0]}×${model.input_size[1]}`);
    if (model.grid) parts.push(`${model.grid[0]}×${model.grid[1]} patches`);
    if (model.weights) parts.push(String(model.weights).split(/[\\/]/).pop());
    $("model-info").textContent = parts.join(" · ");
  }

  // Large photos are downsized before upload. A file the browser cannot decode is sent as it is:
  // the server may read it (TIFF, for example), or says what is wrong with it.
  async function downsized(file) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch (_) {
      return { blob: file, bitmap: null };
    }
    const scale = Math.min(1, MAX_UPLOAD_SIDE / Math.max(bitmap.width, bitmap.height));
    if (scale === 1 && file.size < 4 * 1024 * 1024) return { blob: file, bitmap };
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(bitmap.width * scale);
    canvas.height = Math.round(bitmap.height * scale);
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
    return { blob, bitmap: await createImageBitmap(blob) };
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the returned map could not be decoded"));
      img.src = src;
    });
  }

  async function explain() {
    if (!state.file) return;
    const request = ++state.request; // answers to older requests are dropped
    showError("");
    $("busy").hidden = false;
    try {
      const { blob, bitmap } = await downsized(state.file);
      const form = new FormData();
      form.append("file", blob, state.file.name || "image.jpg");
      form.append("top_k", $("topk").value);
      form.append("kernel", $("kernel").value);
      form.append("encodings", "heatmap");
      form.append("map_size", "original");
      form.append("colormap", "jet");
      const model = encodeURIComponent($("model").value);
      const body = await call(`/v1/models/${model}/explain`, { method: "POST", body: form });
      const result = (body.images || [])[0];
      if (!result) throw new Error("the response holds no result");
      const heatmaps = new Map();
      for (const item of result.explanations || []) {
        const encoded = item.heatmap ?? (item.encodings || {}).heatmap;
        if (encoded) heatmaps.set(item.class_id, await loadImage(`data:image/png;base64,${encoded}`));
      }
      if (request !== state.request) return;
      state.image = bitmap;
      state.size = [result.width, result.height];
      state.predictions = result.predictions || [];
      state.explanations = result.explanations || [];
      state.heatmaps = heatmaps;
      state.active = state.explanations.length ? state.explanations[0].class_id : null;
      const timing = body.timing || {};
      $("timing").textContent = timing.total_ms !== undefined
        ? `server time ${timing.total_ms.toFixed(0)} ms (queue ${(timing.queue_ms || 0).toFixed(0)} ms, compute ${(timing.compute_ms || 0).toFixed(0)} ms)`
        : "";
      renderPredictions();
      draw();
      $("result").hidden = false;
    } catch (error) {
      if (request !== state.request) return;
      $("result").hidden = true;
      showError(`Could not explain the image: ${error.message}`);
    } finally {
      if (request === state.request) $("busy").hidden = true;
    }
  }

  function renderPredictions() {
    const list = $("predictions");
    list.innerHTML = "";
    for (const prediction of state.predictions) {
      const item = document.createElement("li");
      item.dataset.classId = prediction.class_id;
      const hasMap = state.heatmaps.has(prediction.class_id);
      item.className = prediction.class_id === state.active ? "active" : "";
      item.title = hasMap ? "show the map for this class" : "no map for this class";
      item.tabIndex = hasMap ? 0 : -1;
      item.setAttribute("role", "button");
      item.setAttribute("aria-pressed", String(prediction.class_id === state.active));
      const pct = (100 * prediction.probability).toFixed(1);
      item.innerHTML = `<span class="label"></span><span class="prob">${pct}%</span><span class="bar"><span></span></span>`;
      item.querySelector(".label").textContent = prediction.label;
      // set through the CSSOM, which the page's Content-Security-Policy (style-src 'self') allows
      item.querySelector(".bar > span").style.width = `${pct}%`;
      const choose = () => {
        if (!hasMap) return;
        state.active = prediction.class_id;
        renderPredictions();
        draw();
      };
      item.addEventListener("click", choose);
      item.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); choose(); }
      });
      list.appendChild(item);
    }
  }

  function draw() {
    const canvas = $("canvas");
    const image = state.image;
    const heat = state.heatmaps.get(state.active);
    const opacity = Number($("opacity").value) / 100;
    const [width, height] = image ? [image.width, image.height] : (state.size || [heat?.width || 1, heat?.height || 1]);
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.globalAlpha = 1;
    if (image) {
      ctx.drawImage(image, 0, 0);
    } else if (heat) {
      ctx.drawImage(heat, 0, 0, width, height); // the browser cannot show this image: the map alone
    }
    if (heat && image) {
      ctx.globalAlpha = opacity;
      ctx.drawImage(heat, 0, 0, canvas.width, canvas.height);
      ctx.globalAlpha = 1;
    }
    canvas.dataset.classId = String(state.active);
    const active = state.predictions.find((p) => p.class_id === state.active);
    $("explained").textContent = active ? `Map for “${active.label}”` : "";
    $("opacity-value").textContent = `${Math.round(opacity * 100)}%`;
  }

  function useFile(file) {
    if (!file) return;
    state.file = file;
    explain();
  }

  function wire() {
    const drop = $("drop");
    drop.addEventListener("keydown", (event) => {
      if (event.target === drop && (event.key === "Enter" || event.key === " ")) {
        event.preventDefault();
        $("file").click();
      }
    });
    document.addEventListener("paste", (event) => {
      const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
      if (file) useFile(file);
    });
    $("key").value = apiKey();
    $("key-field").hidden = !apiKey();
    $("key").addEventListener("change", () => {
      try { sessionStorage.setItem(KEY_STORAGE, $("key").value.trim()); } catch (_) { /* storage off */ }
      loadModels().then(explain).catch((error) => showError(`Could not list the models: ${error.message}`));
    });
    ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.remove("over");
    }));
    drop.addEventListener("drop", (event) => useFile(event.dataTransfer.files[0]));
    $("file").addEventListener("change", (event) => {
      useFile(event.target.files[0]);
      event.target.value = ""; // choosing the same file again explains it again
    });
    $("opacity").addEventListener("input", draw);
    $("kernel").addEventListener("change", explain);
    $("topk").addEventListener("change", explain);
    $("model").addEventListener("change", () => { describeModel(); explain(); });
    drawLegend();
    loadModels().catch((error) => showError(`Could not list the models: ${error.message}`));
  }

  wire();
})();
