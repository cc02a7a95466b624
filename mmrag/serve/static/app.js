// The search page: text, dropped-photo and more-like-this searches against the JSON API under api/.
// Plain DOM and fetch, no build step. Data from the index is only ever set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let latest = 0; // number of the newest search: answers to older ones are dropped

async function api(path, init) {
  const response = await fetch(path, init);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function postJson(body) {
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

function settings() {
  return { k: Number($("k").value), target: $("target").value };
}

function label(item) {
  return item.captions[0] || item.text || item.name || item.id;
}

// The query photo beside its description (a dropped file or the clicked result); hidden for text searches.
function showQuery(text, imageUrl) {
  const shown = $("query-image").src;
  if (shown.startsWith("blob:")) URL.revokeObjectURL(shown); // a dropped photo's preview is no longer needed
  $("query-view").hidden = !imageUrl;
  $("query-text").textContent = text;
  if (imageUrl) $("query-image").src = imageUrl;
}

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

async function run(description, request) {
  const number = ++latest;
  setStatus(`Searching ${description}…`);
  $("results").setAttribute("aria-busy", "true");
  try {
    const result = await request();
    if (number !== latest) return;
    render(result.hits);
    const ms = Math.round(result.seconds * 1000);
    setStatus(`${result.hits.length} results for ${description} in ${ms} ms. Click a photo for more like it.`);
  } catch (error) {
    if (number === latest) setStatus(error.message, true);
  } finally {
    if (number === latest) $("results").removeAttribute("aria-busy");
  }
}

function render(hits) {
  const list = $("results");
  list.replaceChildren(...hits.map((hit, rank) => {
    const item = document.createElement("li");
    item.className = "hit";
    item.dataset.id = hit.id;
    const card = document.createElement(hit.thumbnail_url ? "button" : "div");
    card.className = "card";
    if (hit.thumbnail_url) {
      card.type = "button";
      card.title = "More like this";
      const image = document.createElement("img");
      image.src = hit.thumbnail_url;
      image.alt = label(hit);
      image.loading = "lazy";
      card.append(image);
      card.addEventListener("click", () => searchSimilar(hit));
    } else {
      card.classList.add("text-card");
      card.textContent = hit.text || label(hit);
    }
    const caption = document.createElement("p");
    caption.className = "caption";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${rank + 1} · ${hit.score.toFixed(3)}`;
    caption.append(score, " ", label(hit));
    item.append(card, caption);
    return item;
  }));
}

function searchText(text) {
  showQuery("", null);
  return run(`“${text}”`, () => api("api/search/text", postJson({ text, ...settings() })));
}

function searchImage(file) {
  showQuery(`Photos like ${file.name}`, URL.createObjectURL(file));
  const form = new FormData();
  const { k, target } = settings();
  form.append("image", file);
  form.append("k", String(k));
  form.append("target", target);
  return run(file.name, () => api("api/search/image", { method: "POST", body: form }));
}

function searchSimilar(hit) {
  showQuery(`More like: ${label(hit)}`, hit.thumbnail_url);
  window.scrollTo({ top: 0, behavior: "smooth" });
  return run("more like this", () => api("api/search/similar", postJson({ id: hit.id, ...settings() })));
}

function pickFile(files) {
  const file = files && files[0];
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image`, true);
    return;
  }
  searchImage(file);
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (text) searchText(text);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    pickFile(event.dataTransfer.files);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("file").click();
    }
  });
  $("file").addEventListener("change", (event) => {
    pickFile(event.target.files);
    event.target.value = "";
  });
  api("api/info")
    .then((info) => { $("about").textContent = `${info.count} items · encoder ${info.encoder_spec}`; })
    .catch((error) => { $("about").textContent = `index unavailable: ${error.message}`; });
});
