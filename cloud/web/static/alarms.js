/* Alarms page, live. A row already shown follows its alarm's events (state; the acknowledge / clear forms that
   no longer apply go away). An alarm not shown yet is looked up (GET /api/v1/alarms/<id>: the server's row,
   scoped to the user's tenant) and added in its place by raised time when it passes the page's filters (state,
   severity, device, as the server applied them), with the same forms as the server's rows (CSRF token
   included). Only DOM nodes and textContent: device-provided text is never parsed as HTML. */
(function () {
  'use strict';
  var hint = document.getElementById('alarm-hint');
  var table = document.getElementById('alarm-table');
  var count = document.getElementById('alarm-count');
  if (!table) return;
  var tbody = table.tBodies[0];
  var filters = {state: table.dataset.state || 'active', severity: table.dataset.severity || '',
                 device: table.dataset.device || ''};
  var canOperate = table.dataset.operate === 'yes';
  var RANK = {raised: 0, acknowledged: 1, cleared: 2};
  var pending = {};  // alarm id -> the newest event seen while its row is being fetched

  function rowOf(id) {
    var rows = tbody.querySelectorAll('tr[data-alarm]');
    for (var i = 0; i < rows.length; i++) if (rows[i].dataset.alarm === id) return rows[i];
    return null;
  }

  function matches(a) {
    var state = String(a.state || '');
    if (filters.state === 'active') { if (state === 'cleared') return false; }
    else if (filters.state !== 'all' && state !== filters.state) return false;
    if (filters.severity && String(a.severity) !== filters.severity) return false;
    if (filters.device && String(a.device) !== filters.device) return false;
    return true;
  }

  function drop(tr, selector) {
    var el = tr.querySelector(selector);
    if (el) el.parentNode.removeChild(el);
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function shownState(tr) {
    var td = tr.querySelector('td.state');
    var first = td && td.firstChild;
    return first && first.nodeType === 3 ? first.nodeValue.trim() : '';
  }

  function follow(tr, ev) {  // an event for a row on the page
    if (!ev.state) return;
    var now = shownState(tr);
    if (now === String(ev.state)) return;  // nothing new (e.g. our own acknowledge)
    if (now in RANK && ev.state in RANK && RANK[ev.state] < RANK[now]) return;  // an older event, late
    var td = tr.querySelector('td.state');
    if (td) td.textContent = String(ev.state);
    if (ev.state !== 'raised') drop(tr, 'form.ack');
    if (ev.state === 'cleared') drop(tr, 'form.clear');
    tr.classList.add('changed');
  }

  function actionForm(id, action, label) {
    var form = el('form', 'inline ' + action);
    form.method = 'post';
    form.action = table.dataset.actionUrl.replace('__id__', encodeURIComponent(id)).replace('__action__', action);
    var csrf = el('input');
    csrf.type = 'hidden';
    csrf.name = 'csrf_token';
    csrf.value = document.body.dataset.csrf || '';
    form.appendChild(csrf);
    var button = el('button', null, label);
    button.type = 'submit';
    form.appendChild(button);
    return form;
  }

  function number(v) { return v === null || v === undefined ? '—' : String(v); }

  function buildRow(a) {
    var tr = el('tr', 'changed live-added');
    tr.dataset.alarm = String(a.id);
    tr.dataset.raised = a.raised_at ? String(a.raised_at) : '';
    var td = el('td', 'small');
    var time = el('time');
    var ms = Live.toMs(a.raised_at);
    if (a.raised_at) { time.setAttribute('datetime', String(a.raised_at)); time.title = String(a.raised_at); }
    time.textContent = ms === null ? '—' : new Date(ms).toLocaleString();
    td.appendChild(time);
    tr.appendChild(td);
    td = el('td');
    var link = el('a', null, a.device);
    link.href = table.dataset.deviceUrl.replace('__id__', encodeURIComponent(String(a.device)));
    td.appendChild(link);
    if (a.device_name && a.device_name !== a.device) {
      td.appendChild(document.createTextNode(' '));
      td.appendChild(el('span', 'muted small device-name', a.device_name));
    }
    tr.appendChild(td);
    tr.appendChild(el('td', null, a.rule));
    tr.appendChild(el('td', null, a.metric));
    tr.appendChild(el('td', 'num', number(a.value)));
    tr.appendChild(el('td', 'num', number(a.threshold)));
    td = el('td');
    td.appendChild(el('span', 'badge sev-' + String(a.severity).replace(/[^a-z0-9_-]/gi, ''), a.severity));
    tr.appendChild(td);
    td = el('td', 'state', a.state);
    if (a.acknowledged_by) {
      td.appendChild(document.createTextNode(' '));
      td.appendChild(el('span', 'muted small', 'by ' + a.acknowledged_by));
    }
    tr.appendChild(td);
    td = el('td', 'actions');
    if (canOperate) {
      if (a.state === 'raised') td.appendChild(actionForm(a.id, 'ack', 'Acknowledge'));
      if (a.state !== 'cleared') td.appendChild(actionForm(a.id, 'clear', 'Clear'));
    }
    tr.appendChild(td);
    return tr;
  }

  function insert(tr) {  // newest first, as the server orders them
    var empty = tbody.querySelector('tr.empty');
    if (empty) empty.parentNode.removeChild(empty);
    var ms = Live.toMs(tr.dataset.raised);
    var rows = tbody.querySelectorAll('tr[data-alarm]');
    var before = null;
    for (var i = 0; i < rows.length && ms !== null; i++) {
      var other = Live.toMs(rows[i].dataset.raised);
      if (other !== null && other < ms) { before = rows[i]; break; }
    }
    tbody.insertBefore(tr, before);
    if (count && /^\d+$/.test(count.textContent.trim())) count.textContent = String(Number(count.textContent) + 1);
  }

  function fetchNew(id, ev) {
    if (id in pending) { pending[id] = ev; return; }  // already on its way: remember the newest event
    pending[id] = null;
    Live.api('GET', '/api/v1/alarms/' + encodeURIComponent(id)).then(function (a) {
      var later = pending[id];
      delete pending[id];
      if (rowOf(id) || !matches(a)) return;  // the server's row decides (it has the tenant and the filters)
      var tr = buildRow(a);
      insert(tr);
      if (later) follow(tr, later);
    }, function (err) {
      delete pending[id];
      if (err && err.status === 404) return;  // not this tenant's, or gone
      if (hint) hint.hidden = false;
    });
  }

  Live.on(function (ev) {
    if (ev.type === 'resync') { if (hint) hint.hidden = false; return; }  // events may have been missed
    if (ev.type !== 'alarm' || !ev.alarm_id) return;
    var id = String(ev.alarm_id);
    var tr = rowOf(id);
    if (tr) { follow(tr, ev); return; }
    if (id in pending) { pending[id] = ev; return; }
    if (matches(ev)) fetchNew(id, ev);  // the event's own fields first: no request for a filtered-out alarm
  });
})();
