// upernet serve's page: send an image to POST /predict?format=map, colour the label map in a canvas
// over the photo, list the classes present, name the class under the pointer. No library, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const view = { labels: null, width: 0, height: 0, names: [] };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadInfo() {
  try {
    const response = await fetch("/info");
    const info = await response.json();
    view.names = info.classes;
    $("model").textContent = `${info.model} \u00b7 ${info.classes.length} classes \u00b7 ${info.protocol.device}`;
  } catch (error) {
    $("model").textContent = "the server does not answer /info";
  }
}

function decodeLabels(map) {
  const bytes = Uint8Array.from(atob(map.labels), (c) => c.charCodeAt(0));
  return map.dtype === "uint16" ? new Uint16Array(bytes.buffer) : bytes;
}

function paintMask(labels, width, height, classes) {
  const colours = [];
  for (const item of classes) colours[item.index] = item.color;
  const canvas = $("mask");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  for (let i = 0; i < labels.length; i++) {
    const colour = colours[labels[i]] || [0, 0, 0];
    pixels.data[4 * i] = colour[0];
    pixels.data[4 * i + 1] = colour[1];
    pixels.data[4 * i + 2] = colour[2];
    pixels.data[4 * i + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
}

function showLegend(classes) {
  const legend = $("legend");
  legend.replaceChildren();
  for (const item of classes) {
    const row = document.createElement("li");
    row.dataset.label = item.label;
    row.dataset.index = item.index;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${item.color.join(",")})`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = item.label;
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = `${(100 * item.share).toFixed(1)}%`;
    row.append(swatch, name, share);
    legend.append(row);
  }
}

async function segment(file) {
  document.body.dataset.state = "busy";
  setStatus(`Segmenting ${file.name || "the image"}\u2026`);
  const started = performance.now();
  let response, body;
  try {
    response = await fetch("/predict?format=map", {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    body = await response.json();
  } catch (error) {
    document.body.dataset.state = "error";
    setStatus(`The server did not answer (${error.message}).`, true);
    return;
  }
  if (!response.ok) {
    document.body.dataset.state = "error";
    setStatus(body.detail || `The server answered ${response.status}.`, true);
    return;
  }
  const photo = $("photo");
  if (photo.src.startsWith("blob:")) URL.revokeObjectURL(photo.src);
  photo.src = URL.createObjectURL(file);
  await photo.decode().catch(() => {}); // a format the browser cannot show: the mask still shows
  view.labels = decodeLabels(body);
  view.width = body.width;
  view.height = body.height;
  paintMask(view.labels, body.width, body.height, body.classes);
  for (const item of body.classes) view.names[item.index] = item.label;
  showLegend(body.classes);
  $("result").hidden = false;
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  setStatus(`${file.name || "image"}: ${body.width}\u00d7${body.height}, ${body.classes.length} classes, ${seconds} s`);
  document.body.dataset.state = "done";
}

function classAt(event) {
  const rect = $("mask").getBoundingClientRect();
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * view.width);
  const y = Math.floor(((event.clientY - rect.top) / rect.height) * view.height);
  if (!view.labels || x < 0 || y < 0 || x >= view.width || y >= view.height) return null;
  return { index: view.labels[y * view.width + x], left: event.clientX - rect.left, top: event.clientY - rect.top };
}

function showPointer(event) {
  const found = classAt(event);
  const tooltip = $("tooltip");
  for (const row of $("legend").children) row.classList.toggle("active", found !== null && Number(row.dataset.index) === found.index);
  if (found === null) {
    tooltip.hidden = true;
    return;
  }
  const name = view.names[found.index] ?? `class ${found.index}`;
  tooltip.textContent = name;
  tooltip.style.left = `${found.left}px`;
  tooltip.style.top = `${found.top}px`;
  tooltip.hidden = false;
  $("pointer").replaceChildren("under the pointer: ", Object.assign(document.createElement("strong"), { textContent: name }));
}

function setOpacity() {
  const value = $("opacity").value;
  $("mask").style.opacity = value / 100;
  $("opacity-value").textContent = `${value}%`;
}

function firstFile(list) {
  return list && list.length ? list[0] : null;
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", () => { const file = firstFile($("file").files); if (file) segment(file); });
  $("sample").addEventListener("click", async () => {
    const blob = await (await fetch("/sample.png")).blob();
    segment(new File([blob], "sample.png", { type: "image/png" }));
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = firstFile(event.dataTransfer.files);
    if (file) segment(file);
  });
  window.addEventListener("dragover", (event) => event.preventDefault()); // a miss does not open the file
  window.addEventListener("drop", (event) => event.preventDefault());
  $("opacity").addEventListener("input", setOpacity);
  $("mask").addEventListener("mousemove", showPointer);
  $("mask").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  setOpacity();
}

wire();
loadInfo();
