/* Fleet overview: keeps every row's values live; reloads the rows from the API on a resync hint. */
(function () {
  'use strict';
  var table = document.getElementById('fleet');
  if (!table) return;
  var rows = new Map();
  table.querySelectorAll('tr[data-device]').forEach(function (tr) { rows.set(tr.dataset.device, tr); });

  function cell(tr, cls) { return tr.querySelector('.' + cls); }

  function setStatus(tr, status) {
    var badge = cell(tr, 'status').querySelector('.badge');
    badge.textContent = status;
    badge.className = 'badge ' + status;
  }

  function setSeen(tr, ts) {
    var c = cell(tr, 'last-seen');
    c.dataset.iso = String(ts);
    c.textContent = Live.ago(ts);
  }

  function flash(tr) {
    tr.classList.remove('flash-row');
    void tr.offsetWidth;
    tr.classList.add('flash-row');
  }

  function applyReading(tr, r) {
    if (r.t !== undefined) cell(tr, 't').textContent = Live.fmt(r.t, 2);
    if (r.h !== undefined) cell(tr, 'h').textContent = Live.fmt(r.h, 1);
    if (r.p !== undefined) cell(tr, 'p').textContent = Live.fmt(r.p, 1);
  }

  Live.on(function (ev) {
    if (ev.type === 'resync') { reload(); return; }
    var tr = rows.get(ev.device);
    if (!tr) return;
    if (ev.type === 'reading') {
      applyReading(tr, ev);
      setStatus(tr, 'online');
      setSeen(tr, ev.received_at || Date.now());
      flash(tr);
    } else if (ev.type === 'status') {
      if (ev.state || ev.status) setStatus(tr, ev.state || ev.status);
      if (ev.last_seen) setSeen(tr, ev.last_seen);
    } else if (ev.type === 'alarm') {
      scheduleReload();
    }
  });

  var pending = null;
  function scheduleReload() {
    if (pending) return;
    pending = setTimeout(function () { pending = null; reload(); }, 1000);
  }

  function reload() {
    var q = new URLSearchParams({sort: table.dataset.sort || 'name', limit: table.dataset.limit || '200',
                                 offset: table.dataset.offset || '0'});
    if (table.dataset.search) q.set('search', table.dataset.search);
    Live.api('GET', '/api/v1/devices?' + q.toString()).then(function (data) {
      data.items.forEach(function (d) {
        var tr = rows.get(d.id);
        if (!tr) return;
        setStatus(tr, d.status);
        if (d.last_seen) setSeen(tr, d.last_seen);
        if (d.latest) applyReading(tr, d.latest);
        cell(tr, 'alarms').textContent = String(d.active_alarms);
      });
    }).catch(function (e) { console.warn('fleet reload failed', e); });
  }

  function tick() {
    rows.forEach(function (tr) {
      var c = cell(tr, 'last-seen');
      if (c.dataset.iso) c.textContent = Live.ago(c.dataset.iso);
    });
  }
  tick();
  setInterval(tick, 5000);
})();
