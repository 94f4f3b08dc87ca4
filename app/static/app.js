"use strict";
// Demo page: pick a model, drop an image, see the top classes and their ViT-ReciproCAM overlays.
(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_UPLOAD_SIDE = 1024; // phone photos are downsized before upload
  const state = { file: null, image: null, explanations: [], predictions: [], active: 0, heatmaps: new Map() };

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  async function apiError(response) {
    try {
      const body = await response.json();
      if (body && body.error) return `${body.error.message} (${body.error.code}, HTTP ${response.status})`;
      if (body && body.detail) return `${JSON.stringify(body.detail)} (HTTP ${response.status})`;
    } catch (_) { /* not JSON */ }
    return `The server answered HTTP ${response.status} ${response.statusText}`;
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
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await apiError(response));
    const body = await response.json();
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
      showError("No model is ready on this server. " + models.map((m) => `${m.name}: ${m.reason || m.status}`).join("; "));
    } else {
      select.value = firstReady;
    }
    describeModel();
  }

  function describeModel() {
    const option = $("model").selectedOptions[0];
    if (!option) return;
    const model = JSON.parse(option.dataset.info);
    const grid = model.grid ? `${model.grid[0]}×${model.grid[1]} patches` : "";
    $("model-info").textContent = `${model.num_classes ?? "?"} classes · ${grid} · ${model.weights || ""}`;
  }

  async function downsized(file) {
    const bitmap = await createImageBitmap(file);
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
    showError("");
    $("busy").hidden = false;
    try {
      const { blob, bitmap } = await downsized(state.file);
      state.image = bitmap;
      const form = new FormData();
      form.append("file", blob, state.file.name || "image.jpg");
      form.append("top_k", $("topk").value);
      form.append("kernel", $("kernel").value);
      form.append("encodings", "heatmap");
      form.append("map_size", "original");
      form.append("colormap", "jet");
      const model = encodeURIComponent($("model").value);
      const response = await fetch(`/v1/models/${model}/explain`, { method: "POST", body: form });
      if (!response.ok) throw new Error(await apiError(response));
      const body = await response.json();
      const result = (body.results || [])[0];
      if (!result) throw new Error("the response holds no result");
      state.predictions = result.predictions || [];
      state.explanations = result.explanations || [];
      state.heatmaps = new Map();
      for (const item of state.explanations) {
        const encoded = item.heatmap ?? (item.encodings || {}).heatmap;
        if (encoded) state.heatmaps.set(item.class_id, await loadImage(`data:image/png;base64,${encoded}`));
      }
      state.active = state.explanations.length ? state.explanations[0].class_id : null;
      const timing = body.timing || {};
      $("timing").textContent = timing.total_ms !== undefined
        ? `server time ${timing.total_ms.toFixed(0)} ms (queue ${(timing.queue_ms || 0).toFixed(0)} ms, compute ${(timing.compute_ms || 0).toFixed(0)} ms)`
        : "";
      renderPredictions();
      draw();
      $("result").hidden = false;
    } catch (error) {
      $("result").hidden = true;
      showError(`Could not explain the image: ${error.message}`);
    } finally {
      $("busy").hidden = true;
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
      const pct = (100 * prediction.probability).toFixed(1);
      item.innerHTML = `<span class="label"></span><span class="prob">${pct}%</span><span class="bar"><span style="width:${pct}%"></span></span>`;
      item.querySelector(".label").textContent = prediction.label;
      item.addEventListener("click", () => {
        if (!hasMap) return;
        state.active = prediction.class_id;
        renderPredictions();
        draw();
      });
      list.appendChild(item);
    }
  }

  function draw() {
    const canvas = $("canvas");
    const image = state.image;
    if (!image) return;
    canvas.width = image.width;
    canvas.height = image.height;
    const ctx = canvas.getContext("2d");
    ctx.globalAlpha = 1;
    ctx.drawImage(image, 0, 0);
    const heat = state.heatmaps.get(state.active);
    const opacity = Number($("opacity").value) / 100;
    if (heat) {
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
    ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.remove("over");
    }));
    drop.addEventListener("drop", (event) => useFile(event.dataTransfer.files[0]));
    $("file").addEventListener("change", (event) => useFile(event.target.files[0]));
    $("opacity").addEventListener("input", draw);
    $("kernel").addEventListener("change", explain);
    $("topk").addEventListener("change", explain);
    $("model").addEventListener("change", () => { describeModel(); explain(); });
    drawLegend();
    loadModels().catch((error) => showError(`Could not list the models: ${error.message}`));
  }

  wire();
})();
