/* Live updates over /ws, shared by every page. Never uses innerHTML with data: only textContent. */
(function () {
  'use strict';
  var handlers = [];
  var stateEl = document.getElementById('live-state');
  var delay = 500;
  var connectedOnce = false;

  function setState(s) {
    document.body.dataset.live = s;
    if (stateEl) { stateEl.textContent = s; stateEl.className = 'live-state ' + s; }
  }

  function emit(ev) {
    handlers.forEach(function (h) {
      try { h(ev); } catch (e) { console.error(e); }
    });
  }

  function connect() {
    var proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    var ws;
    try { ws = new WebSocket(proto + '//' + location.host + '/ws'); } catch (e) { retry(); return; }
    ws.onmessage = function (m) {
      var ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      if (ev.type === 'hello') {
        delay = 500;
        setState('live');
        if (connectedOnce) emit({type: 'resync', reason: 'reconnected'});
        connectedOnce = true;
        return;
      }
      emit(ev);
    };
    ws.onclose = function () { setState('offline'); retry(); };
  }

  function retry() {
    setTimeout(connect, delay);
    delay = Math.min(delay * 2, 15000);
  }

  function csrf() { return document.body.dataset.csrf || ''; }

  function api(method, url, body) {
    var opts = {method: method, credentials: 'same-origin', headers: {'Accept': 'application/json'}};
    if (body !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    if (method !== 'GET') opts.headers['X-CSRF-Token'] = csrf();
    return fetch(url, opts).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (data) {
        if (!r.ok) { var err = new Error(data.error || ('HTTP ' + r.status)); err.status = r.status; throw err; }
        return data;
      });
    });
  }

  function fmt(v, digits) {
    return (v === null || v === undefined || v === '') ? '—' : Number(v).toFixed(digits);
  }

  function toMs(v) {
    if (v === null || v === undefined || v === '') return null;
    if (typeof v === 'number') return v < 1e11 ? v * 1000 : v;
    var n = Number(v);
    if (!isNaN(n)) return toMs(n);
    var t = Date.parse(v);
    return isNaN(t) ? null : t;
  }

  function ago(v) {
    var ms = toMs(v);
    if (ms === null) return '—';
    var s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 86400) return Math.floor(s / 3600) + ' h ago';
    return new Date(ms).toLocaleString();
  }

  function timeText(v) {
    var ms = toMs(v);
    return ms === null ? '—' : new Date(ms).toLocaleTimeString();
  }

  window.Live = {
    on: function (h) { handlers.push(h); },
    api: api, fmt: fmt, ago: ago, toMs: toMs, timeText: timeText
  };
  document.querySelectorAll('time[datetime]').forEach(function (el) {
    var ms = toMs(el.getAttribute('datetime'));
    if (ms !== null) { el.title = el.getAttribute('datetime'); el.textContent = new Date(ms).toLocaleString(); }
  });
  setState('connecting');
  if (stateEl !== null) connect();
})();
