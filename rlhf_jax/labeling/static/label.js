// Keyboard for the labeling page: 1-9 pick a sample, s skips, f toggles the flag.
// The page works without this file: every pick and skip is a plain form post.
(function () {
  "use strict";
  var form = document.getElementById("label-form");
  if (!form) return;
  var sent = false;
  form.addEventListener("submit", function (event) {
    // One answer per page: a second key press while the first is on its way does nothing.
    if (sent) { event.preventDefault(); return; }
    sent = true;
    form.classList.add("sending");
  });
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    var target = event.target;
    if (target && (target.tagName === "TEXTAREA" ||
                   (target.tagName === "INPUT" && target.type !== "checkbox"))) return;
    var key = event.key;
    if (/^[1-9]$/.test(key)) {
      var button = form.querySelector('button.sample[data-key="' + key + '"]');
      if (button) { event.preventDefault(); button.click(); }
    } else if (key === "s" || key === "S") {
      event.preventDefault();
      document.getElementById("skip").click();
    } else if (key === "f" || key === "F") {
      event.preventDefault();
      var flag = document.getElementById("flag");
      flag.checked = !flag.checked;
    }
  });
})();
