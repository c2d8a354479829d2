(function () {
  'use strict';
  var hint = document.getElementById('alarm-hint');
  Live.on(function (ev) { if (ev.type === 'alarm' && hint) hint.hidden = false; });
})();
