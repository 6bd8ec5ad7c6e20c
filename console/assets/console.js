// termopar console: the pages' behaviour, over the public API with the session cookie.
'use strict';

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || '';
  const $ = (id) => document.getElementById(id);

  /** Calls the API; a 401 (the session ended) goes to the login page. */
  async function api(path, opts = {}) {
    const method = opts.method || 'GET';
    const headers = { Accept: 'application/json' };
    if (opts.body !== undefined) headers['Content-Type'] = 'application/json';
    if (method !== 'GET') headers['X-CSRF-Token'] = csrf;
    if (opts.poll) headers['X-Console-Poll'] = '1';
    const r = await fetch(path, {
      method, headers, credentials: 'same-origin',
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    });
    if (r.status === 401) {
      location.assign('/ui/login?next=' + encodeURIComponent(location.pathname + location.search));
      throw new Error('the session ended');
    }
    const body = r.status === 204 ? null : await r.json().catch(() => null);
    return { status: r.status, ok: r.ok, body };
  }

  const fmtTime = (iso) => iso ? new Date(iso).toLocaleString() : '';
  const fmtTemp = (t) => typeof t === 'number' ? t.toFixed(1) : '';
  const query = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v !== '' && v !== undefined && v !== null)).toString();

  function cell(row, text, cls) {
    const td = row.insertCell();
    td.textContent = text === undefined || text === null ? '' : String(text);
    if (cls) td.className = cls;
    return td;
  }

  function link(href, text) {
    const a = document.createElement('a');
    a.href = href;
    a.textContent = text;
    return a;
  }

  /** The clients the user can see, by id (admins: up to 1000, newest first). */
  async function clients() {
    const r = await api('/api/v1/clients?page_size=1000');
    const byId = new Map();
    if (r.ok) for (const c of r.body.items) byId.set(c.id, c);
    return byId;
  }

  function fillClientSelect(select, byId, { blank } = {}) {
    select.replaceChildren();
    if (blank) select.add(new Option(blank, ''));
    for (const c of byId.values()) select.add(new Option(c.name, c.id));
  }

  /** Previous / next buttons and the "page x of y" text of a list. */
  function pager(state, load) {
    $('prev').addEventListener('click', () => { if (state.page > 1) { state.page--; load(); } });
    $('next').addEventListener('click', () => { if (state.page < state.pages) { state.page++; load(); } });
    return (total) => {
      state.pages = Math.max(1, Math.ceil(total / state.pageSize));
      $('page-info').textContent = `Page ${state.page} of ${state.pages} · ${total} in all`;
      $('prev').disabled = state.page <= 1;
      $('next').disabled = state.page >= state.pages;
    };
  }

  // ---- Sensors: the latest reading of each, live ----
  async function sensorsPage(section) {
    const staleMs = Number(section.dataset.staleSecs) * 1000;
    const pollMs = Number(section.dataset.pollMs);
    const state = { page: 1, pages: 1, pageSize: 50, client: section.dataset.client, q: '' };
    const select = $('client');
    if (select) {
      const byId = await clients();
      fillClientSelect(select, byId);
      const saved = localStorage.getItem('termopar.client');
      if (saved && byId.has(saved)) select.value = saved;
      state.client = select.value;
      select.addEventListener('change', () => {
        state.client = select.value;
        state.page = 1;
        localStorage.setItem('termopar.client', state.client);
        load();
      });
    }
    let timer;
    $('q').addEventListener('input', () => {
      clearTimeout(timer);
      timer = setTimeout(() => { state.q = $('q').value; state.page = 1; load(); }, 250);
    });
    const showPages = pager(state, load);

    async function load() {
      $('error').textContent = '';
      const rows = $('rows');
      if (!state.client) {
        rows.replaceChildren();
        showPages(0);
        $('error').textContent = 'No client yet: create one under Clients.';
        return;
      }
      const r = await api('/api/v1/sensors?' + query({ client_id: state.client, page: state.page, page_size: state.pageSize, q: state.q }));
      if (!r.ok) { $('error').textContent = r.body?.message || 'Loading the sensors failed.'; return; }
      rows.replaceChildren();
      for (const s of r.body.items) {
        const row = rows.insertRow();
        row.dataset.sensor = s.id;
        row.insertCell().append(link('/ui/sensors/' + s.id, s.name));
        cell(row, s.location);
        cell(row, '', 'n temperature');
        cell(row, '', 'measured');
        const status = row.insertCell();
        status.className = 'status';
      }
      showPages(r.body.total);
      await refresh();
    }

    async function refresh() {
      if (!state.client) return;
      const r = await api(`/api/v1/clients/${state.client}/readings/latest`, { poll: true });
      if (!r.ok) { $('live').textContent = 'live updates paused: ' + (r.body?.message || r.status); return; }
      const latest = new Map(r.body.items.map((x) => [x.sensor_id, x]));
      const now = Date.now();
      for (const row of $('rows').rows) {
        const reading = latest.get(row.dataset.sensor);
        const temperature = row.querySelector('.temperature');
        const measured = row.querySelector('.measured');
        const status = row.querySelector('.status');
        const badge = document.createElement('span');
        if (!reading) {
          temperature.textContent = '';
          measured.textContent = '';
          badge.className = 'badge none';
          badge.textContent = 'no data';
          row.classList.remove('stale');
        } else {
          temperature.textContent = fmtTemp(reading.temperature);
          measured.textContent = fmtTime(reading.ts);
          const stale = now - Date.parse(reading.ts) > staleMs;
          row.classList.toggle('stale', stale);
          badge.className = stale ? 'badge stale' : 'badge live';
          badge.textContent = stale ? 'stale' : 'live';
        }
        status.replaceChildren(badge);
      }
      $('live').textContent = 'updated ' + new Date().toLocaleTimeString();
    }

    await load();
    setInterval(() => refresh().catch(() => {}), pollMs);
  }

  // ---- Admin lists: search, pages, create, edit, delete ----
  async function entityPage(section) {
    const spec = JSON.parse($('entity').textContent);
    const editable = section.dataset.editable === 'true';
    const isAdmin = section.dataset.admin === 'true';
    const ownClient = section.dataset.ownClient;
    const state = { page: 1, pages: 1, pageSize: 20, q: '' };
    const byId = await clients();
    const showPages = pager(state, load);
    $('search').addEventListener('submit', (e) => { e.preventDefault(); state.q = $('q').value; state.page = 1; load(); });

    function shown(item, key) {
      const v = item[key];
      if (key === 'created_at') return fmtTime(v);
      if (key === 'client_id') return v ? (byId.get(v)?.name || v) : '';
      if (Array.isArray(v)) return v.join(', ');
      return v;
    }

    async function load() {
      $('error').textContent = '';
      const r = await api(spec.api + '?' + query({ page: state.page, page_size: state.pageSize, q: state.q }));
      if (!r.ok) { $('error').textContent = r.body?.message || 'Loading failed.'; return; }
      const rows = $('rows');
      rows.replaceChildren();
      for (const item of r.body.items) {
        const row = rows.insertRow();
        spec.columns.forEach((column, k) => {
          const value = shown(item, column.key);
          if (k === 0 && spec.link) row.insertCell().append(link(spec.link.replace('{id}', item.id), value));
          else cell(row, value);
        });
        if (editable) {
          const actions = row.insertCell();
          const label = item.name || item.email;
          const edit = document.createElement('button');
          edit.type = 'button';
          edit.textContent = 'Edit';
          edit.setAttribute('aria-label', `Edit ${label}`);
          edit.addEventListener('click', () => open(item));
          const del = document.createElement('button');
          del.type = 'button';
          del.textContent = 'Delete';
          del.setAttribute('aria-label', `Delete ${label}`);
          del.addEventListener('click', () => remove(item, label));
          actions.append(edit, ' ', del);
          if (spec.key === 'sensors') {
            const rotate = document.createElement('button');
            rotate.type = 'button';
            rotate.textContent = 'New secret';
            rotate.setAttribute('aria-label', `New device secret for ${label}`);
            rotate.addEventListener('click', () => newSecret(item, label));
            actions.append(' ', rotate);
          }
        }
      }
      showPages(r.body.total);
    }

    async function remove(item, label) {
      if (!confirm(`Delete ${spec.singular} ${label}? This cannot be undone.`)) return;
      const r = await api(`${spec.api}/${item.id}`, { method: 'DELETE' });
      if (!r.ok) { $('error').textContent = r.body?.message || 'Deleting failed.'; return; }
      load();
    }

    async function newSecret(item, label) {
      if (!confirm(`Replace the device secret of ${label}? The device must be given the new one: the old one stops working at once.`)) return;
      const r = await api(`${spec.api}/${item.id}/secret`, { method: 'POST' });
      if (!r.ok) { $('error').textContent = r.body?.message || 'Replacing the secret failed.'; return; }
      showSecret({ ...item, device_secret: r.body.device_secret });
    }

    if (!editable) { await load(); return; }

    const dialog = $('editor');
    const form = $('form');
    let editing = null;
    for (const select of form.querySelectorAll('select')) {
      const field = spec.fields.find((f) => f.name === select.name);
      if (field?.kind === 'client') fillClientSelect(select, byId, { blank: spec.key === 'users' ? '— none (admins) —' : (isAdmin ? '— choose —' : undefined) });
    }
    const zones = $('zones');
    if (zones && Intl.supportedValuesOf) for (const z of Intl.supportedValuesOf('timeZone')) zones.append(new Option(z));

    function open(item) {
      editing = item;
      $('editor-title').textContent = (item ? 'Edit ' : 'New ') + spec.singular;
      for (const field of spec.fields) {
        const box = form.querySelector(`[data-field="${field.name}"]`);
        box.hidden = item ? !field.edit : !field.create;
        const input = form.elements[field.name];
        let value = item ? item[field.name] : '';
        if (field.kind === 'password') value = '';
        if (field.kind === 'lines') value = (value || []).join('\n');
        if (field.kind === 'client' && !item && !isAdmin) value = ownClient;
        if (field.kind === 'role' && !item) value = 'viewer';
        input.value = value ?? '';
        input.removeAttribute('aria-invalid');
        $('e-' + field.name).textContent = '';
      }
      $('form-error').textContent = '';
      dialog.showModal();
      form.querySelector('.field:not([hidden]) input, .field:not([hidden]) select, .field:not([hidden]) textarea')?.focus();
    }

    function body() {
      const out = {};
      for (const field of spec.fields) {
        if (editing ? !field.edit : !field.create) continue;
        const raw = form.elements[field.name].value;
        if (field.kind === 'lines') out[field.name] = raw.split('\n').map((s) => s.trim()).filter(Boolean);
        else if (field.kind === 'password') { if (raw) out[field.name] = raw; }
        else if (raw.trim() === '') { if (editing && !field.required) out[field.name] = null; }
        else out[field.name] = raw.trim();
      }
      return out;
    }

    $('new').addEventListener('click', () => open(null));
    $('cancel').addEventListener('click', () => dialog.close());
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      for (const field of spec.fields) { $('e-' + field.name).textContent = ''; form.elements[field.name].removeAttribute('aria-invalid'); }
      $('form-error').textContent = '';
      $('save').disabled = true;
      try {
        const r = editing
          ? await api(`${spec.api}/${editing.id}`, { method: 'PATCH', body: body() })
          : await api(spec.api, { method: 'POST', body: body() });
        if (!r.ok) {
          const field = r.body?.field && spec.fields.find((f) => f.name === r.body.field);
          if (field) {
            $('e-' + field.name).textContent = r.body.message;
            form.elements[field.name].setAttribute('aria-invalid', 'true');
            form.elements[field.name].focus();
          } else {
            $('form-error').textContent = r.body?.message || `Saving failed (${r.status}).`;
          }
          return;
        }
        dialog.close();
        if (!editing && r.body.device_secret) showSecret(r.body);
        state.page = editing ? state.page : 1;
        load();
      } finally {
        $('save').disabled = false;
      }
    });

    function showSecret(sensor) {
      const host = section.dataset.mqttHost || location.hostname;
      const tls = section.dataset.mqttTls === 'true' ? ' --capath /etc/ssl/certs' : '';
      const topic = section.dataset.topic.replace('{client_id}', sensor.client_id).replace('{sensor_id}', sensor.id);
      $('secret-value').value = sensor.device_secret;
      $('secret-line').value = `mosquitto_pub -h ${host} -p ${section.dataset.mqttPort}${tls} -q 1 -i ${sensor.id} -u ${sensor.id} -P '${sensor.device_secret}' -t '${topic}' -m '{"temperature": 21.5}'`;
      $('secret').showModal();
    }
    $('secret-close').addEventListener('click', () => $('secret').close());
    for (const button of document.querySelectorAll('[data-copy]')) {
      button.addEventListener('click', async () => {
        const source = $(button.dataset.copy);
        source.select();
        try { await navigator.clipboard.writeText(source.value); button.textContent = 'Copied'; } catch { document.execCommand('copy'); button.textContent = 'Copied'; }
        setTimeout(() => { button.textContent = 'Copy'; }, 1500);
      });
    }
    await load();
  }

  // ---- Alarms: newest first, updated live from the alarm feed ----
  async function alarmsPage(section) {
    const manages = section.dataset.manages === 'true';
    const state = { page: 1, pages: 1, pageSize: 50 };
    const sensors = new Map();
    const r = await api('/api/v1/sensors?page_size=1000');
    if (r.ok) for (const s of r.body.items) sensors.set(s.id, s.name);
    const showPages = pager(state, load);
    let acking = null;

    async function load() {
      const params = { page: state.page, page_size: state.pageSize, state: $('state').value };
      if ($('unacknowledged').checked) params.acknowledged = 'false';
      const got = await api('/api/v1/alarms?' + query(params));
      if (!got.ok) { $('error').textContent = got.body?.message || 'The alarms could not be loaded.'; return; }
      $('error').textContent = '';
      const rows = $('rows');
      rows.replaceChildren();
      for (const a of got.body.items) {
        const row = rows.insertRow();
        row.dataset.alarm = a.id;
        row.className = 'alarm ' + a.state;
        const sev = cell(row, '');
        const badge = document.createElement('span');
        badge.className = 'badge sev-' + a.severity;
        badge.textContent = a.severity;
        sev.append(badge);
        cell(row, a.rule_name, 'rule');
        cell(row, '').append(link('/ui/sensors/' + a.sensor_id, sensors.get(a.sensor_id) || a.sensor_id));
        cell(row, a.state, 'state');
        cell(row, fmtTime(a.started_at));
        cell(row, fmtTime(a.ended_at), 'hide-narrow');
        cell(row, fmtTemp(a.peak), 'n peak');
        cell(row, a.acknowledged_at ? `${fmtTime(a.acknowledged_at)}${a.ack_comment ? ': ' + a.ack_comment : ''}` : 'no', 'acked');
        if (manages) {
          const td = cell(row, '');
          if (!a.acknowledged_at) {
            const b = document.createElement('button');
            b.type = 'button';
            b.textContent = 'Acknowledge';
            b.setAttribute('aria-label', `Acknowledge ${a.rule_name} on ${sensors.get(a.sensor_id) || a.sensor_id}`);
            b.addEventListener('click', () => openAck(a));
            td.append(b);
          }
        }
      }
      showPages(got.body.total);
    }

    function openAck(alarm) {
      acking = alarm;
      $('ack-what').textContent = `${alarm.rule_name} on ${sensors.get(alarm.sensor_id) || alarm.sensor_id}, began ${fmtTime(alarm.started_at)}.`;
      $('ack-comment').value = '';
      $('ack-error').textContent = '';
      $('ack').showModal();
      $('ack-comment').focus();
    }

    if (manages) {
      $('ack-cancel').addEventListener('click', () => $('ack').close());
      $('ack-form').addEventListener('submit', async (e) => {
        e.preventDefault();
        const comment = $('ack-comment').value.trim();
        const done = await api(`/api/v1/alarms/${acking.id}/acknowledge`, { method: 'POST', body: comment ? { comment } : {} });
        if (!done.ok) { $('ack-error').textContent = done.body?.message || 'The alarm could not be acknowledged.'; return; }
        $('ack').close();
        await load();
      });
    }
    $('state').addEventListener('change', () => { state.page = 1; load(); });
    $('unacknowledged').addEventListener('change', () => { state.page = 1; load(); });

    // The live feed: each event reloads the page of alarms and is announced.
    const feed = new EventSource('/api/v1/alarms/feed');
    feed.onmessage = (m) => {
      const e = JSON.parse(m.data);
      $('live').textContent = `${e.rule_name} on ${sensors.get(e.sensor_id) || e.sensor_id}: ${e.kind}`;
      load();
    };
    addEventListener('pagehide', () => feed.close());
    await load();
  }

  const section = document.querySelector('[data-page]');
  const pages = { sensors: sensorsPage, alarms: alarmsPage, entity: entityPage, sensor: (s) => window.termoparCharts.sensor(s, api), site: (s) => window.termoparCharts.site(s, api) };
  if (section && pages[section.dataset.page]) {
    pages[section.dataset.page](section).catch((e) => {
      const error = $('error');
      if (error) error.textContent = String(e.message || e);
    });
  }
})();
