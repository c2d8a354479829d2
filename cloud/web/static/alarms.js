/* Alarms page: rows already shown follow their alarm's events live (state; the acknowledge / clear buttons
   that no longer apply go away); a new alarm shows a hint to reload (its row needs the server's forms). */
(function () {
  'use strict';
  var hint = document.getElementById('alarm-hint');
  var table = document.getElementById('alarm-table');

  function rowOf(id) {
    var rows = table ? table.querySelectorAll('tr[data-alarm]') : [];
    for (var i = 0; i < rows.length; i++) if (rows[i].dataset.alarm === id) return rows[i];
    return null;
  }

  function drop(tr, selector) {
    var el = tr.querySelector(selector);
    if (el) el.parentNode.removeChild(el);
  }

  Live.on(function (ev) {
    if (ev.type !== 'alarm') return;
    var tr = ev.alarm_id ? rowOf(String(ev.alarm_id)) : null;
    if (!tr) { if (hint) hint.hidden = false; return; }
    var state = tr.querySelector('td.state');
    if (state && ev.state && state.firstChild && state.firstChild.nodeType === 3 &&
        state.firstChild.nodeValue.trim() === String(ev.state)) return;  // nothing new (e.g. our own ack)
    if (state && ev.state) state.textContent = String(ev.state);
    if (ev.state && ev.state !== 'raised') drop(tr, 'form.ack');
    if (ev.state === 'cleared') drop(tr, 'form.clear');
    tr.classList.add('changed');
  });
})();
