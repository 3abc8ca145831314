// ditpipe playground: a static page served by the scheduler's HTTP API. No framework, no build
// step, nothing fetched from anywhere but this server. It streams one request at a time
// (POST /v1/images/generations with "stream": true, read as server-sent events), shows previews as
// they sharpen, cancels by closing the stream (the scheduler then stops dispatching steps), keeps
// a gallery with each result's settings as curl / ditpipe generate / grpcurl requests, and polls
// GET /ditpipe/cluster for the cluster panel.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { models: [], controller: null, cluster: null, grpcAddress: '127.0.0.1:50051' };

  function setStatus(text, error = false) {
    const el = $('status');
    el.textContent = text;
    el.classList.toggle('error', error);
  }

  async function apiError(res) {
    try {
      const j = await res.json();
      const e = j.error || {};
      return `${res.status}: ${e.message || 'error'}${e.param ? ` (field ${e.param})` : ''}`;
    } catch {
      return `${res.status} ${res.statusText}`;
    }
  }

  // ---- models and classes -------------------------------------------------------------------
  async function loadModels() {
    const res = await fetch('/v1/models');
    if (!res.ok) throw new Error(await apiError(res));
    const j = await res.json();
    state.models = j.data;
    const sel = $('model');
    sel.replaceChildren(
      ...state.models.map(
        (m) =>
          new Option(
            `${m.id} (${m.ditpipe.image_size}×${m.ditpipe.image_size}, ${m.ditpipe.replicas} replica${m.ditpipe.replicas === 1 ? '' : 's'})`,
            m.id,
          ),
      ),
    );
    fillClasses();
    if (state.models.length === 0) setStatus('No model is served yet: no denoiser answers. Start one, then reload.', true);
    else setStatus('Ready.');
  }

  function currentModel() {
    return state.models.find((m) => m.id === $('model').value);
  }

  function fillClasses() {
    const m = currentModel();
    const names = m ? m.ditpipe.class_names : [];
    const count = m ? m.ditpipe.num_classes : 0;
    const opts = [];
    for (let i = 0; i < count; i++) opts.push(new Option(names[i] ? `${i} · ${names[i]}` : `class ${i}`, names[i] || String(i)));
    $('class').replaceChildren(...opts);
    if (count > 5) $('class').selectedIndex = 5;
  }

  // ---- server-sent events over fetch (EventSource cannot POST) ------------------------------
  async function* events(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let event = 'message';
        let data = '';
        for (const line of block.split('\n')) {
          if (line.startsWith(':')) continue; // keep-alive comment
          if (line.startsWith('event:')) event = line.slice(6).trim();
          else if (line.startsWith('data:')) data += line.slice(5).trim();
        }
        if (data) yield { event, data: JSON.parse(data) };
      }
    }
  }

  // ---- one request --------------------------------------------------------------------------
  function settings() {
    const seed = $('seed').value.trim();
    return {
      model: $('model').value,
      prompt: $('class').value,
      n: Number($('count').value),
      sampler: $('sampler').value,
      steps: Number($('steps').value),
      cfg: Number($('cfg').value),
      seed: seed === '' ? undefined : seed,
      every: Number($('every').value) || 0,
      method: $('method').value,
    };
  }

  function requestBody(s, stream) {
    const ditpipe = { sampler: s.sampler, steps: s.steps, cfg_scale: s.cfg };
    if (s.seed !== undefined) ditpipe.seed = s.seed;
    if (stream && s.every > 0) ditpipe.preview = { every_steps: s.every, method: s.method };
    const body = { model: s.model, prompt: s.prompt, n: s.n, size: 'auto', response_format: 'b64_json' };
    if (stream) body.stream = true;
    body.ditpipe = ditpipe;
    return body;
  }

  function makeTiles(n) {
    const tiles = [];
    const box = $('tiles');
    box.replaceChildren();
    for (let i = 0; i < n; i++) {
      const tile = document.createElement('div');
      tile.className = 'tile';
      tile.dataset.index = String(i);
      tile.dataset.previews = '0';
      const frame = document.createElement('div');
      frame.className = 'frame';
      const img = document.createElement('img');
      img.alt = `image ${i}`;
      frame.append(img);
      const label = document.createElement('div');
      label.textContent = 'waiting';
      tile.append(frame, label);
      box.append(tile);
      tiles.push({ tile, img, label });
    }
    return tiles;
  }

  async function generate(ev) {
    ev.preventDefault();
    if (state.controller) return;
    const s = settings();
    const controller = new AbortController();
    state.controller = controller;
    $('generate').disabled = true;
    $('cancel').disabled = false;
    $('progress').value = 0;
    setStatus('Submitting…');
    const finals = [];
    let seed = s.seed;
    try {
      const res = await fetch('/v1/images/generations', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(requestBody(s, true)),
        signal: controller.signal,
      });
      if (!res.ok) throw new Error(await apiError(res));
      const tiles = makeTiles(s.n);
      for await (const { event, data } of events(res)) {
        if (event === 'ditpipe.accepted') {
          seed = data.seed;
          setStatus(`Accepted: ${data.n} image(s), ${data.num_steps} steps, seed ${data.seed}.`);
        } else if (event === 'ditpipe.progress') {
          $('progress').value = data.step / data.num_steps;
          setStatus(`Step ${data.step} of ${data.num_steps}…`);
        } else if (event === 'image_generation.partial_image') {
          const t = tiles[data.ditpipe.image_index];
          t.img.src = `data:image/png;base64,${data.b64_json}`;
          t.tile.dataset.previews = String(Number(t.tile.dataset.previews) + 1);
          t.tile.dataset.step = String(data.ditpipe.step);
          t.label.textContent = `preview (${data.ditpipe.method}), step ${data.ditpipe.step}/${data.ditpipe.num_steps}`;
        } else if (event === 'image_generation.completed') {
          const t = tiles[data.ditpipe.image_index];
          t.img.src = `data:image/png;base64,${data.b64_json}`;
          t.tile.classList.add('final');
          t.label.textContent = data.ditpipe.class_name || `class ${data.ditpipe.class_label}`;
          finals[data.ditpipe.image_index] = data.b64_json;
        } else if (event === 'ditpipe.completed') {
          $('progress').value = 1;
          setStatus(
            `Done: ${data.n} image(s) in ${(data.timings.total_ms / 1000).toFixed(2)} s (sampling ${(data.timings.denoise_ms / 1000).toFixed(2)} s, decoding ${(data.timings.decode_ms / 1000).toFixed(2)} s).`,
          );
        } else if (event === 'error') {
          throw new Error(`${data.error.message}${data.error.param ? ` (field ${data.error.param})` : ''}`);
        }
      }
      if (finals.filter(Boolean).length === s.n) addToGallery({ ...s, seed }, finals);
    } catch (err) {
      if (controller.signal.aborted)
        setStatus('Cancelled: the stream was closed, so the scheduler stopped sending steps for this request.');
      else setStatus(`Failed: ${err.message}`, true);
    } finally {
      state.controller = null;
      $('generate').disabled = false;
      $('cancel').disabled = true;
    }
  }

  function cancel() {
    state.controller?.abort();
  }

  // ---- gallery with copyable requests -------------------------------------------------------
  const shq = (s) => `'${String(s).replace(/'/g, "'\\''")}'`;

  function snippets(s) {
    const http = { ...requestBody(s, false) };
    delete http.size;
    const curl = `curl -s ${location.origin}/v1/images/generations -H 'content-type: application/json' \\\n  -d ${shq(JSON.stringify(http))} \\\n  | jq -r '.data[0].b64_json' | base64 -d > image-0.png`;
    const cli = [
      'ditpipe generate',
      `--server ${state.grpcAddress}`,
      `--model ${shq(s.model)}`,
      `--class ${shq(s.prompt)}`,
      `--num ${s.n}`,
      `--steps ${s.steps}`,
      `--sampler ${s.sampler}`,
      `--cfg ${s.cfg}`,
      `--seed ${s.seed}`,
      '--out out/generate',
    ].join(' ');
    const kinds = { ddpm: 'SAMPLER_KIND_DDPM', ddim: 'SAMPLER_KIND_DDIM', dpmpp: 'SAMPLER_KIND_DPM_SOLVER_PP' };
    const label = /^\d+$/.test(s.prompt) ? { index: Number(s.prompt) } : { name: s.prompt };
    const grpc = {
      model: s.model,
      class_labels: Array.from({ length: s.n }, () => label),
      num_steps: s.steps,
      sampler: kinds[s.sampler],
      cfg_scale: s.cfg,
      seed: String(s.seed),
    };
    const grpcurl = `grpcurl -plaintext -d ${shq(JSON.stringify(grpc))} \\\n  ${state.grpcAddress} ditpipe.v1.Sampler/Generate`;
    return [
      ['curl (HTTP API)', curl],
      ['ditpipe generate', cli],
      ['gRPC (grpcurl)', grpcurl],
    ];
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = 'copied';
    } catch {
      button.textContent = 'select and copy';
    }
    setTimeout(() => (button.textContent = 'copy'), 1500);
  }

  function addToGallery(s, finals) {
    const entry = document.createElement('div');
    entry.className = 'entry';
    const thumbs = document.createElement('div');
    thumbs.className = 'thumbs';
    for (const b of finals) {
      const img = document.createElement('img');
      img.src = `data:image/png;base64,${b}`;
      img.alt = s.prompt;
      thumbs.append(img);
    }
    const info = document.createElement('div');
    const line = document.createElement('div');
    line.className = 'settings';
    line.textContent = `${s.model} · ${s.prompt} · ${s.sampler} ${s.steps} steps · cfg ${s.cfg} · seed ${s.seed} · ${s.n} image(s)`;
    info.append(line);
    for (const [title, text] of snippets(s)) {
      const box = document.createElement('div');
      box.className = 'snippet';
      const row = document.createElement('div');
      row.className = 'row';
      const t = document.createElement('span');
      t.textContent = title;
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'secondary';
      b.textContent = 'copy';
      b.addEventListener('click', () => void copy(text, b));
      row.append(t, b);
      const pre = document.createElement('pre');
      pre.textContent = text;
      box.append(row, pre);
      info.append(box);
    }
    entry.append(thumbs, info);
    $('gallery').prepend(entry);
  }

  // ---- cluster panel --------------------------------------------------------------------------
  const total = (models, f) => models.reduce((a, m) => a + f(m), 0);
  const fmt = (x) => (x === 0 ? '0' : x >= 100 ? x.toFixed(0) : x.toPrecision(3));

  async function pollCluster() {
    try {
      const res = await fetch('/ditpipe/cluster', { cache: 'no-store' });
      if (!res.ok) throw new Error(await apiError(res));
      const c = await res.json();
      state.grpcAddress = c.scheduler.grpc_address || state.grpcAddress;
      $('c-source').textContent = c.source;
      $('c-replicas').textContent = String(total(c.models, (m) => m.replicas));
      $('c-decoders').textContent = String(total(c.models, (m) => m.decoder_replicas));
      $('c-queue').textContent =
        `${c.scheduler.samples_in_flight} / ${c.scheduler.max_samples_in_flight} · ${total(c.models, (m) => m.steps_waiting_for_a_replica)} steps waiting for a denoiser`;
      $('c-requests').textContent = String(c.scheduler.requests_in_flight);
      $('c-decodes').textContent = `${total(c.models, (m) => m.decodes_total.final)} / ${total(c.models, (m) => m.decodes_total.preview)}`;
      const prev = state.cluster;
      if (prev) {
        const dt = (c.time - prev.time) / 1000;
        const gflops = total(c.models, (m) => m.sampling_gflops_total) - total(prev.models, (m) => m.sampling_gflops_total);
        const rows = total(c.models, (m) => m.step_batch_rows.sum) - total(prev.models, (m) => m.step_batch_rows.sum);
        const passes = total(c.models, (m) => m.step_batch_rows.count) - total(prev.models, (m) => m.step_batch_rows.count);
        $('c-tflops').textContent = dt > 0 ? fmt(gflops / 1000 / dt) : '–';
        $('c-rows').textContent = passes > 0 ? `${fmt(rows / passes)} (mean)` : 'idle';
      }
      state.cluster = c;
    } catch (err) {
      $('c-source').textContent = `cluster view unavailable: ${err.message}`;
    }
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('form').addEventListener('submit', (ev) => void generate(ev));
    $('cancel').addEventListener('click', cancel);
    $('model').addEventListener('change', fillClasses);
    loadModels().catch((err) => setStatus(`Could not list models: ${err.message}`, true));
    void pollCluster();
    setInterval(() => void pollCluster(), 2000);
  });
})();
