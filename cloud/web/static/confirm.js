/* Forms that ask before they submit: <form data-confirm="question">. An attribute and this listener instead of an
   inline onsubmit, which the Content-Security-Policy (script-src 'self') refuses to run. */
(function () {
  'use strict';
  document.addEventListener('submit', function (ev) {
    var question = ev.target.getAttribute && ev.target.getAttribute('data-confirm');
    if (question && !window.confirm(question)) ev.preventDefault();
  });
})();
