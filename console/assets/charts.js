// termopar console: the charts (uPlot), fed by the history, daily-averages and accesses APIs.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  /** Most readings one history view draws; a longer window shows its latest this many. */
  const MAX_POINTS = 20000;

  /** Today's date (YYYY-MM-DD) in `tz`, and the date `days - 1` before it. */
  function dayRange(tz, days) {
    const today = new Intl.DateTimeFormat('en-CA', { timeZone: tz }).format(new Date());
    const [y, m, d] = today.split('-').map(Number);
    const from = new Date(Date.UTC(y, m - 1, d - (days - 1))).toISOString().slice(0, 10);
    return { from, to: today };
  }

  const dayToSecs = (date) => Date.parse(date + 'T00:00:00Z') / 1000;
  /** An x axis of whole days (the x values are UTC midnights standing for local dates). */
  const DAY = 86400;
  const dayAxis = {
    incrs: [DAY, 2 * DAY, 7 * DAY, 14 * DAY, 30 * DAY, 91 * DAY, 182 * DAY, 365 * DAY],
    values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toISOString().slice(0, 10)),
    space: 70,
  };

  /** A uPlot chart in `figure`, sized to it, re-sized with it; `data-points` says how many x values it draws. */
  function chart(figure, opts, data) {
    const width = () => Math.max(280, figure.clientWidth);
    const plot = new uPlot({ width: width(), height: 300, ...opts }, data, figure);
    new ResizeObserver(() => plot.setSize({ width: width(), height: 300 })).observe(figure);
    figure.dataset.points = String(data[0].length);
    return plot;
  }

  function update(figure, plot, data) {
    plot.setData(data);
    figure.dataset.points = String(data[0].length);
  }

  async function sensor(section, api) {
    const id = section.dataset.id;
    const tz = section.dataset.tz;
    const tzDate = (zone) => (ts) => uPlot.tzDate(new Date(ts * 1e3), zone);

    // History: a time window, zoomed by dragging across the chart, panned by the buttons.
    const history = $('history');
    const view = { to: Date.now() / 1000, from: Date.now() / 1000 - 86400 };
    let historyPlot = null;
    let loading = 0;

    async function readings(from, to) {
      const ts = [];
      const temps = [];
      let cursor = null;
      do {
        const params = new URLSearchParams({ page_size: '1000', from: new Date(from * 1000).toISOString(), to: new Date(to * 1000).toISOString() });
        if (cursor) params.set('cursor', cursor);
        const r = await api(`/api/v1/sensors/${id}/readings?${params}`);
        if (!r.ok) throw new Error(r.body?.message || `history: ${r.status}`);
        for (const item of r.body.items) { ts.push(Date.parse(item.ts) / 1000); temps.push(item.temperature); }
        cursor = r.body.next_cursor;
      } while (cursor && ts.length < MAX_POINTS);
      ts.reverse();
      temps.reverse();
      return [ts, temps];
    }

    async function showHistory() {
      const mine = ++loading;
      $('history-range').textContent = 'loading…';
      const data = await readings(view.from, view.to);
      if (mine !== loading) return;
      const fmt = new Intl.DateTimeFormat(undefined, { timeZone: tz, dateStyle: 'medium', timeStyle: 'short' });
      $('history-range').textContent = `${fmt.format(view.from * 1000)} – ${fmt.format(view.to * 1000)} · ${data[0].length} readings`;
      if (!historyPlot) {
        historyPlot = chart(history, {
          tzDate: tzDate(tz),
          scales: { x: { time: true, auto: false, range: () => [view.from, view.to] } },
          cursor: { drag: { x: true, y: false, setScale: false } },
          series: [{}, { label: '°C', stroke: '#0b4f8a', width: 1.5, points: { show: data[0].length < 300 } }],
          axes: [{}, { label: '°C' }],
          hooks: {
            setSelect: [(u) => {
              if (u.select.width < 4) return;
              const from = u.posToVal(u.select.left, 'x');
              const to = u.posToVal(u.select.left + u.select.width, 'x');
              u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
              view.from = from;
              view.to = to;
              showHistory().catch(showError);
            }],
          },
        }, data);
      } else {
        update(history, historyPlot, data);
        historyPlot.setScale('x', { min: view.from, max: view.to });
      }
    }

    const showError = (e) => { $('history-range').textContent = String(e.message || e); };
    for (const button of section.querySelectorAll('[data-range]')) {
      button.addEventListener('click', () => {
        view.to = Date.now() / 1000;
        view.from = view.to - Number(button.dataset.range);
        showHistory().catch(showError);
      });
    }
    const pan = (direction) => () => {
      const shift = (view.to - view.from) / 2 * direction;
      view.from += shift;
      view.to += shift;
      showHistory().catch(showError);
    };
    $('pan-left').addEventListener('click', pan(-1));
    $('pan-right').addEventListener('click', pan(1));

    // Daily averages: mean line with the lowest and highest reading as a band.
    const daily = $('daily');
    let dailyPlot = null;
    const zones = $('zones');
    if (zones && Intl.supportedValuesOf) for (const z of Intl.supportedValuesOf('timeZone')) zones.append(new Option(z));

    async function showDaily() {
      $('daily-error').textContent = '';
      const zone = $('daily-tz').value.trim() || tz;
      const { from, to } = dayRange(zone, Number($('daily-days').value));
      const r = await api(`/api/v1/sensors/${id}/daily-averages?${new URLSearchParams({ from, to, tz: zone })}`);
      if (!r.ok) { $('daily-error').textContent = r.body?.message || `daily averages: ${r.status}`; return; }
      const items = r.body.items;
      const data = [items.map((i) => dayToSecs(i.date)), items.map((i) => i.min), items.map((i) => i.max), items.map((i) => i.avg)];
      if (!dailyPlot) {
        dailyPlot = chart(daily, {
          tzDate: tzDate('Etc/UTC'),
          series: [
            {},
            { label: 'min °C', stroke: '#7fa7cc', width: 1 },
            { label: 'max °C', stroke: '#d98b8b', width: 1 },
            { label: 'mean °C', stroke: '#0b4f8a', width: 2, points: { show: items.length < 120 } },
          ],
          bands: [{ series: [2, 1], fill: 'rgba(11, 79, 138, 0.12)' }],
          axes: [dayAxis, { label: '°C' }],
        }, data);
      } else {
        update(daily, dailyPlot, data);
      }
    }
    $('daily-form').addEventListener('submit', (e) => { e.preventDefault(); showDaily().catch((err) => { $('daily-error').textContent = String(err.message || err); }); });

    await Promise.all([showHistory().catch(showError), showDaily()]);
  }

  async function site(section, api) {
    const id = section.dataset.id;
    const tz = section.dataset.tz;
    const figure = $('accesses');
    let plot = null;
    async function show() {
      const { from, to } = dayRange(tz, Number($('accesses-days').value));
      const r = await api(`/api/v1/sites/${id}/accesses/daily?${new URLSearchParams({ from, to })}`);
      if (!r.ok) { $('error').textContent = r.body?.message || `accesses: ${r.status}`; return; }
      const items = r.body.items;
      const rows = $('accesses-rows');
      rows.replaceChildren();
      for (const item of [...items].reverse()) {
        const row = rows.insertRow();
        row.insertCell().textContent = item.date;
        const n = row.insertCell();
        n.className = 'n';
        n.textContent = String(item.count);
      }
      const data = [items.map((i) => dayToSecs(i.date)), items.map((i) => i.count)];
      if (!plot) {
        plot = chart(figure, {
          tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), 'Etc/UTC'),
          series: [{}, { label: 'accesses', stroke: '#0b4f8a', width: 2, fill: 'rgba(11, 79, 138, 0.10)' }],
          axes: [dayAxis, {}],
          scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
        }, data);
      } else {
        update(figure, plot, data);
      }
    }
    $('accesses-form').addEventListener('submit', (e) => { e.preventDefault(); show(); });
    await show();
  }

  window.termoparCharts = { sensor, site };
})();
