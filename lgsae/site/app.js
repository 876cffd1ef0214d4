// lgsae latent browser. Data files (data/*.js) call LGSAE.run / text / latents / shard with
// gzip-compressed JSON in base64; they are loaded as <script> tags so that the site also works
// when opened from the file system, where fetch() is refused.
"use strict";

const LGSAE = (() => {
  const state = { meta: null, vocab: null, ids: null, saes: {}, shards: {}, waiting: {},
                  sae: null, latent: null };
  const $ = (id) => document.getElementById(id);

  async function unpack(b64) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }

  // a data file, loaded once; resolves when its LGSAE.* call has stored what it carries
  function load(src, key) {
    if (!state.waiting[key]) {
      state.waiting[key] = {};
      state.waiting[key].promise = new Promise((resolve, reject) => {
        state.waiting[key].resolve = resolve;
        const s = document.createElement("script");
        s.src = src;
        s.onerror = () => {  // forget it, so that a later visit tries again
          delete state.waiting[key];
          s.remove();
          reject(new Error("could not load " + src));
        };
        document.body.appendChild(s);
      });
    }
    return state.waiting[key].promise;
  }

  function settle(key, value) {
    if (!state.waiting[key]) state.waiting[key] = { promise: Promise.resolve(value) };
    else if (state.waiting[key].resolve) state.waiting[key].resolve(value);
  }

  const info = (name) => state.meta.saes.find((s) => s.name === name);
  const pct = (x) => (100 * x).toFixed(x >= 0.001 ? 2 : 4) + " %";
  const esc = (t) => t.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
                                                     '"': "&quot;" }[c]));
  const tokText = (id) => esc(state.vocab[id] ?? "?").replace(/\n/g, "⏎");

  async function summary(name) {
    const s = info(name);
    return load(`data/${s.dir}/latents.js`, "latents:" + name);
  }

  async function shard(name, j) {
    const s = info(name);
    const k = Math.floor(j / s.shard_size);
    return load(`data/${s.dir}/${k}.js`, `shard:${name}:${k}`);
  }

  function route() {
    const h = decodeURIComponent(location.hash.replace(/^#/, ""));
    const cut = h.lastIndexOf("/");
    let name = h, latent = null;
    if (cut > 0 && /^\d+$/.test(h.slice(cut + 1))) {
      name = h.slice(0, cut);
      latent = Number(h.slice(cut + 1));
    }
    if (!info(name)) { name = state.meta.saes[0].name; latent = null; }
    show(name, latent);
  }

  let navigation = 0;  // only the latest navigation renders (data files arrive in any order)

  async function show(name, latent) {
    const mine = ++navigation;
    let sum;
    try {
      sum = await summary(name);
    } catch (e) {
      if (mine === navigation) $("detail").innerHTML = `<p class="note">${esc(e.message)}</p>`;
      return;
    }
    if (mine !== navigation) return;
    if (state.sae !== name) {
      state.sae = name;
      $("sae").value = name;
      renderList(sum);
    }
    if (latent === null || latent >= sum.M) latent = order(sum, "freq")[0];
    state.latent = latent;
    markSelected(true);
    let detail;
    try {
      detail = (await shard(name, latent))[latent];
    } catch (e) {
      if (mine === navigation) $("detail").innerHTML = `<p class="note">${esc(e.message)}</p>`;
      return;
    }
    if (mine === navigation) renderLatent(sum, latent, detail);
  }

  function markSelected(scroll) {
    for (const r of document.querySelectorAll(".row.sel")) r.classList.remove("sel");
    const row = document.querySelector(`.row[data-latent="${state.latent}"]`);
    if (row) {
      row.classList.add("sel");
      if (scroll) row.scrollIntoView({ block: "nearest" });
    }
  }

  function order(sum, by) {
    const ids = [...Array(sum.M).keys()];
    if (by === "freq") ids.sort((a, b) => sum.count[b] - sum.count[a] || a - b);
    if (by === "peak") ids.sort((a, b) => (sum.peak[a] ?? 1e9) - (sum.peak[b] ?? 1e9) ||
                                          sum.count[b] - sum.count[a]);
    return ids;
  }

  function matches(sum, j, q) {
    if (!q) return true;
    let m;
    if ((m = q.match(/^peak:\s*(\d+)$/))) return sum.peak[j] === Number(m[1]);
    if ((m = q.match(/^>\s*([\d.e-]+)$/))) return sum.freq[j] > Number(m[1]);
    if (/^\d+$/.test(q)) return String(j).startsWith(q);
    return true;
  }

  function renderList(sum) {
    const q = $("search").value.trim();
    const rows = order(sum, $("sort").value).filter((j) => matches(sum, j, q));
    $("list").innerHTML = rows.map((j) => {
      const what = sum.count[j] ? `${pct(sum.freq[j])} · L${sum.peak[j]}` : "never fired";
      return `<div class="row" data-latent="${j}"><span>#${j}</span><small>${what}</small></div>`;
    }).join("");
  }

  function tokens(sum, ex, peakAct) {
    const [layer, row, act, window] = ex;
    const ctx = state.meta.ctx, start = row - (row % ctx);
    const [before, after] = state.meta.window;
    const vals = new Map([[0, act]]);  // the window: [offset, % of act, ...] besides the example
    for (let i = 0; i + 1 < window.length; i += 2) vals.set(window[i], (window[i + 1] / 100) * act);
    let html = "";
    for (let o = -before; o <= after; o++) {
      const r = row + o;
      if (r < start || r >= start + ctx || r >= state.ids.length) continue;
      const a = vals.get(o) || 0;
      const alpha = Math.min(1, a / (peakAct || 1)).toFixed(2);
      html += `<span class="tok${o === 0 ? " at" : ""}" title="${a.toPrecision(3)}" ` +
              `style="background: rgba(255,140,0,${alpha})">${tokText(state.ids[r])}</span>`;
    }
    return `<div class="ex" data-layer="${layer}" data-act="${act}">` +
           `<span class="act">${act.toFixed(2)}</span>${html}</div>`;
  }

  function renderLatent(sum, j, d) {
    const s = info(sum.name);
    const peakAct = d.top.length ? d.top[0][2] : 1;
    let html = `<h2 id="title">${esc(sum.name)} · latent ${j}</h2>`;
    html += `<div class="stats" id="stats" data-count="${sum.count[j]}" ` +
            `data-freq="${sum.freq[j]}" data-mean="${sum.mean[j]}">` +
            `<span>fires on <b id="freq">${pct(sum.freq[j])}</b> of ${sum.tokens} ` +
            `held-out token-layer positions (${sum.count[j]} times)</span>` +
            `<span>mean activation <b id="mean">${sum.mean[j].toFixed(3)}</b></span></div>`;
    if (s.layers.length > 1) {
      html += `<h3>Share of firings per member layer</h3><div id="bars">`;
      s.layers.forEach((v, m) => {
        const x = sum.share[j][m];
        html += `<div class="bar" data-layer="${v}" data-share="${x}"><span class="lab">L${v}` +
                `</span><span class="track"><span class="fill" style="width:${100 * x}%">` +
                `</span></span><span class="pct">${(100 * x).toFixed(1)} %</span></div>`;
      });
      html += `</div>`;
    }
    if (d.lens) {
      html += `<h3>Top output tokens (logit lens of the decoder row)</h3><div class="lens">` +
              d.lens.map(([t, v]) => `<span title="${v}">${tokText(t)}</span>`).join("") +
              `</div>`;
    }
    html += `<h3>Top activations</h3><div id="top">`;
    if (!d.top.length) html += `<p class="note">Never fired on the held-out tokens.</p>`;
    for (const v of s.layers) {
      const exs = d.top.filter((e) => e[0] === v);
      if (!exs.length) continue;
      html += `<div class="layer" data-layer="${v}"><h4>layer ${v} (${exs.length})</h4>` +
              exs.map((e) => tokens(sum, e, peakAct)).join("") + `</div>`;
    }
    html += `</div>`;
    if (d.random.length) {
      html += `<h3>Random firings</h3><div id="random">` +
              d.random.map((e) => tokens(sum, e, peakAct)).join("") + `</div>`;
    }
    $("detail").innerHTML = html;
    document.title = `${sum.name} #${j} · lgsae`;
  }

  function start() {
    $("sae").innerHTML = state.meta.saes.map((s) =>
      `<option value="${esc(s.name)}">${esc(s.name)} (layers ${s.layers.join(",")})</option>`
    ).join("");
    $("runinfo").textContent = `${state.meta.model} · ${state.meta.tokens} held-out tokens`;
    $("sae").onchange = () => { location.hash = $("sae").value; };
    $("list").onclick = (e) => {
      const row = e.target.closest(".row");
      if (row) location.hash = `${state.sae}/${row.dataset.latent}`;
    };
    const relist = () => {
      if (state.sae) summary(state.sae).then((sum) => { renderList(sum); markSelected(false); });
    };
    $("search").oninput = relist;
    $("sort").onchange = relist;
    window.addEventListener("hashchange", route);
    route();
  }

  return {
    run(meta) {
      state.meta = meta;
      for (const s of meta.saes) s.shard_size = meta.shard;
    },
    async text(packed) {
      const t = await unpack(packed);
      state.ids = t.ids;
      state.vocab = t.vocab;
      start();
    },
    async latents(name, packed) { settle("latents:" + name, await unpack(packed)); },
    async shard(name, k, packed) { settle(`shard:${name}:${k}`, await unpack(packed)); },
  };
})();
