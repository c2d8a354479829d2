/* Device page: live values + charts (uPlot when installed), history ranges, command panel with live status. */
(function () {
  'use strict';
  var info = JSON.parse(document.getElementById('device-data').textContent);
  var deviceId = info.id;
  var METRICS = [
    {key: 't', label: 'Temperature °C', color: '#d9480f', digits: 2},
    {key: 'h', label: 'Humidity %', color: '#1971c2', digits: 1},
    {key: 'p', label: 'Pressure hPa', color: '#2f9e44', digits: 1}
  ];
  var LIVE_POINTS = 2000;
  var mode = 'live';
  var series = {x: [], t: [], h: [], p: []};
  var charts = {};

  function $(id) { return document.getElementById(id); }

  // --- charts --------------------------------------------------------------------------------------------
  var haveCharts = typeof window.uPlot === 'function';
  if (!haveCharts) {
    $('vendor-hint').hidden = false;
    $('charts').hidden = true;
  } else {
    METRICS.forEach(function (m) {
      var el = $('chart-' + m.key);
      charts[m.key] = new uPlot({
        title: m.label, width: Math.max(300, el.clientWidth || 600), height: 180,
        scales: {x: {time: true, range: function (u, min, max) {
          if (min === null || max === null) { var now = Date.now() / 1000; return [now - 3600, now]; }
          return max - min < 60 ? [max - 60, max + 1] : [min, max];
        }}},
        axes: [{}, {size: 64}],
        series: [{}, {label: m.key, stroke: m.color, width: 1.5, spanGaps: false,
                      value: function (u, v) { return v === null || v === undefined ? '—' : v.toFixed(m.digits); }}]
      }, [[], []], el);
    });
    window.addEventListener('resize', function () {
      METRICS.forEach(function (m) {
        var el = $('chart-' + m.key);
        charts[m.key].setSize({width: Math.max(300, el.clientWidth), height: 180});
      });
    });
  }

  function redraw() {
    if (!haveCharts) return;
    METRICS.forEach(function (m) { charts[m.key].setData([series.x, series[m.key]]); });
  }

  var historyRequest = 0;  // only the newest answer is drawn when ranges are clicked quickly

  function loadHistory(query) {
    var mine = ++historyRequest;
    $('range-info').textContent = 'loading…';
    var url = '/api/v1/devices/' + encodeURIComponent(deviceId) + '/history?';
    $('history-csv').href = url + 'format=csv&' + query;  // the same window as a file (session cookie, a GET)
    // format=columns: one array per field, oldest first -- what uPlot takes, without an object per point
    return Live.api('GET', url + 'format=columns&' + query)
      .then(function (data) {
        if (mine !== historyRequest) return;
        var c = data.columns, n = c.ts.length, x = new Array(n);
        for (var i = 0; i < n; i++) x[i] = c.ts[i] / 1000;
        series = {x: x, t: c.t, h: c.h, p: c.p};
        redraw();
        $('range-info').textContent = n + ' points' +
          (data.bucket_s ? ' (averaged per ' + data.bucket_s + ' s)' : '');
      })
      .catch(function (e) {
        if (mine === historyRequest) $('range-info').textContent = 'history unavailable: ' + e.message;
      });
  }

  function activate(button) {
    document.querySelectorAll('#ranges button').forEach(function (o) { o.classList.remove('active'); });
    if (button) button.classList.add('active');
  }

  document.querySelectorAll('#ranges button[data-range]').forEach(function (b) {
    b.addEventListener('click', function () {
      activate(b);
      mode = b.dataset.range;
      loadHistory('range=' + (mode === 'live' ? '1h' : mode));
    });
  });

  // custom window: two datetime-local inputs (the browser's local time) -> unix ms for the API
  var customForm = $('custom-range');
  function localInput(ms) {  // unix ms -> 'YYYY-MM-DDTHH:MM' in the browser's zone (a datetime-local value)
    var d = new Date(ms);
    return new Date(ms - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  }
  if (customForm) {
    $('range-end').value = localInput(Date.now() + 60000);
    $('range-start').value = localInput(Date.now() - 24 * 3600 * 1000);
    customForm.addEventListener('submit', function (ev) {
      ev.preventDefault();
      var start = new Date($('range-start').value).getTime(), end = new Date($('range-end').value).getTime();
      if (isNaN(start) || isNaN(end) || start >= end) {
        $('range-info').textContent = 'choose a start before the end';
        return;
      }
      activate(customForm.querySelector('button'));
      mode = 'custom';
      loadHistory('start=' + start + '&end=' + end);
    });
  }
  loadHistory('range=1h');

  // --- live values -----------------------------------------------------------------------------------------
  function setValues(r) {
    METRICS.forEach(function (m) { if (r[m.key] !== undefined) $('cur-' + m.key).textContent = Live.fmt(r[m.key], m.digits); });
    if (r.rssi !== undefined && r.rssi !== null) $('cur-rssi').textContent = String(r.rssi);
  }

  function addReadingRow(r) {
    var tbody = $('readings');
    var tr = document.createElement('tr');
    var cells = [Live.timeText(r.ts || Date.now()), r.t, r.h, r.p, r.rssi, r.boot, r.seq];
    cells.forEach(function (v, i) {
      var td = document.createElement('td');
      if (i > 0) td.className = 'num';
      td.textContent = (v === null || v === undefined) ? '' : String(v);
      tr.appendChild(td);
    });
    tbody.insertBefore(tr, tbody.firstChild);
    while (tbody.children.length > 20) tbody.removeChild(tbody.lastChild);
  }

  function setStatus(status) {
    var b = $('dev-status');
    b.textContent = status;
    b.className = 'badge ' + status;
  }

  document.querySelectorAll('#readings td.ts').forEach(function (td) { td.textContent = Live.timeText(td.dataset.ms); });
  var seen = $('dev-last-seen');
  function tick() { if (seen.dataset.iso) seen.textContent = Live.ago(seen.dataset.iso); }
  tick();
  setInterval(tick, 5000);

  Live.on(function (ev) {
    if (ev.type === 'resync') { refreshLatest(); if (mode === 'live') loadHistory('range=1h'); refreshPending(true); return; }
    if (ev.device !== deviceId) return;
    if (ev.type === 'reading') {
      setValues(ev);
      setStatus('online');
      seen.dataset.iso = String(Date.now());
      tick();
      addReadingRow(ev);
      if (mode === 'live') {
        series.x.push((Live.toMs(ev.ts) || Date.now()) / 1000);
        METRICS.forEach(function (m) { series[m.key].push(ev[m.key] === undefined ? null : ev[m.key]); });
        if (series.x.length > LIVE_POINTS) ['x', 't', 'h', 'p'].forEach(function (k) { series[k].shift(); });
        redraw();
      }
    } else if (ev.type === 'status') {
      if (ev.state || ev.status) setStatus(ev.state || ev.status);
    } else if (ev.type === 'command') {
      setCommandStatus(ev.cid, ev.status || ev.state, ev);
    } else if (ev.type === 'alarm') {
      refreshLatest();
    }
  });

  function refreshLatest() {
    Live.api('GET', '/api/v1/devices/' + encodeURIComponent(deviceId)).then(function (d) {
      if (d.latest) setValues(d.latest);
      setStatus(d.status);
      if (d.last_seen) { seen.dataset.iso = d.last_seen; tick(); }
      $('dev-alarms').textContent = String(d.active_alarms);
    }).catch(function () {});
  }

  // --- commands ---------------------------------------------------------------------------------------------
  var TERMINAL = {delivered: 1, failed: 1, expired: 1};
  var RANK = {queued: 0, sent: 1, delivered: 2, failed: 2, expired: 2};

  function commandRow(cid) { return document.querySelector('#cmd-rows tr[data-cid="' + CSS.escape(cid) + '"]'); }

  function setCommandStatus(cid, status, detail) {
    var tr = commandRow(cid);
    if (!tr || !status) return;
    var badge = tr.querySelector('.cmd-status .badge');
    if ((RANK[status] || 0) < (RANK[badge.textContent] || 0)) return;  // states only move forward
    badge.textContent = status;
    badge.className = 'badge cmd-' + status;
    if (detail) {
      var text = detail.error || detail.err || (detail.result ? JSON.stringify(detail.result) : '');
      if (text) tr.querySelector('.cmd-result').textContent = text;
    }
    if (TERMINAL[status] && detail && detail.result === undefined && detail.error === undefined) {
      Live.api('GET', '/api/v1/commands/' + encodeURIComponent(cid)).then(function (c) {
        setCommandStatus(cid, c.status, c);
      }).catch(function () {});
    }
  }

  function addCommandRow(cmd, args) {
    var tr = document.createElement('tr');
    tr.dataset.cid = cmd.cid;
    var vals = [new Date().toLocaleTimeString(), cmd.op, JSON.stringify(args)];
    vals.forEach(function (v, i) {
      var td = document.createElement('td');
      if (i === 2) { var code = document.createElement('code'); code.textContent = v; td.appendChild(code); }
      else td.textContent = v;
      tr.appendChild(td);
    });
    var st = document.createElement('td'); st.className = 'cmd-status';
    var badge = document.createElement('span'); badge.className = 'badge cmd-queued'; badge.textContent = 'queued';
    st.appendChild(badge); tr.appendChild(st);
    var res = document.createElement('td'); res.className = 'cmd-result small'; tr.appendChild(res);
    var tbody = $('cmd-rows');
    tbody.insertBefore(tr, tbody.firstChild);
  }

  // Fallback if live updates are down: poll the commands that are not finished yet.
  function refreshPending(force) {
    if (!force && document.body.dataset.live === 'live') return;
    var rows = document.querySelectorAll('#cmd-rows tr[data-cid]');
    var n = 0;
    rows.forEach(function (tr) {
      var status = tr.querySelector('.cmd-status .badge').textContent;
      if (TERMINAL[status] || n >= 10) return;
      n += 1;
      Live.api('GET', '/api/v1/commands/' + encodeURIComponent(tr.dataset.cid)).then(function (c) {
        setCommandStatus(c.cid, c.status, c);
      }).catch(function () {});
    });
  }
  setInterval(refreshPending, 3000);

  var msg = $('cmd-msg');
  document.querySelectorAll('.cmd-panel button[data-op]').forEach(function (b) {
    b.addEventListener('click', function () {
      var op = b.dataset.op;
      var args = {};
      if (op === 'set_interval') args = {s: parseInt($('arg-interval').value, 10)};
      if (op === 'led') args = {state: $('arg-led').value};
      if (op === 'reboot' && !window.confirm('Reboot ' + deviceId + '?')) return;
      msg.textContent = 'sending ' + op + '…';
      msg.className = 'small';
      Live.api('POST', '/api/v1/devices/' + encodeURIComponent(deviceId) + '/commands', {op: op, args: args, ttl_s: 300})
        .then(function (cmd) { addCommandRow({cid: cmd.cid, op: op}, args); msg.textContent = op + ' queued'; })
        .catch(function (e) { msg.textContent = e.message; msg.className = 'small error'; });
    });
  });
})();
