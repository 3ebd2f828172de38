// Reviewer page behaviour: keyboard shortcuts, time spent, lease countdown, help panel,
// undo, and the leave beacon that gives the lease back when the reviewer goes elsewhere.
// Loaded as a file under a strict CSP: no eval, no inline handlers, addEventListener only.
(function () {
  "use strict";

  var started = performance.now();
  var labelForm = document.getElementById("label-form");
  var skipForm = document.getElementById("skip-form");
  var skipReason = document.getElementById("skip_reason");
  var help = document.getElementById("help");
  var helpToggle = document.getElementById("help-toggle");
  var lease = document.getElementById("lease");
  var leaveForm = document.getElementById("leave-form");
  var undoForm = document.getElementById("undo-form");
  var staying = false; // a form of this page was submitted: the server handles the lease

  function elapsedMs() {
    return Math.max(0, Math.round(performance.now() - started));
  }

  function fillTime(form) {
    var field = form.querySelector("input.time-spent");
    if (field) field.value = String(elapsedMs());
  }

  function submit(form) {
    if (typeof form.requestSubmit === "function") {
      form.requestSubmit(); // validates, then fires "submit" (which fills the time)
    } else if (form.reportValidity()) {
      fillTime(form);
      form.submit();
    }
  }

  Array.prototype.forEach.call(document.forms, function (form) {
    form.addEventListener("submit", function () {
      staying = true;
    });
  });

  // Leaving the page (another site, the admin page, closing the tab) gives the lease back at
  // once. The beacon names this view's lease by its expiry: a reload renews the lease first,
  // so the old view's beacon no longer matches it and releases nothing.
  window.addEventListener("pagehide", function () {
    if (staying || !leaveForm || typeof navigator.sendBeacon !== "function") return;
    navigator.sendBeacon(leaveForm.getAttribute("action"), new URLSearchParams(new FormData(leaveForm)));
  });

  [labelForm, skipForm].forEach(function (form) {
    if (!form) return;
    form.addEventListener("submit", function (ev) {
      if (form.getAttribute("data-submitted")) {
        ev.preventDefault(); // no double submit
        return;
      }
      fillTime(form);
      form.setAttribute("data-submitted", "1");
      var button = form.querySelector("button[type=submit]");
      if (button) button.disabled = true;
    });
  });

  // Back/forward cache: the lease shown may be stale; fetch the current item.
  window.addEventListener("pageshow", function (ev) {
    if (ev.persisted && labelForm) window.location.reload();
  });

  function setHelp(show) {
    if (!help) return;
    var inside = help.contains(document.activeElement);
    help.hidden = !show;
    if (helpToggle) helpToggle.setAttribute("aria-expanded", show ? "true" : "false");
    // Its own scroll region: focused when opened (arrow keys scroll it), focus back on close.
    if (show) help.focus();
    else if (inside && helpToggle) helpToggle.focus();
  }

  if (helpToggle) {
    helpToggle.addEventListener("click", function () {
      setHelp(help.hidden);
    });
  }

  function isTyping(el) {
    if (!el || !el.tagName) return false;
    if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") return true;
    return el.tagName === "INPUT" && /^(text|password|search|email|url|number|tel)$/i.test(el.type);
  }

  document.addEventListener("keydown", function (ev) {
    if (ev.defaultPrevented || ev.isComposing) return;
    var target = ev.target;
    var typing = isTyping(target);

    if (ev.key === "Escape") {
      if (help && !help.hidden) {
        setHelp(false);
        ev.preventDefault();
      } else if (typing) {
        target.blur();
        ev.preventDefault();
      }
      return;
    }
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      var form = (typing && target.form) || labelForm;
      if (form) {
        ev.preventDefault();
        submit(form);
      }
      return;
    }
    if (!typing && undoForm && (ev.ctrlKey || ev.metaKey) && !ev.altKey && ev.key.toLowerCase() === "z") {
      ev.preventDefault();
      undoForm.requestSubmit ? undoForm.requestSubmit() : undoForm.submit();
      return;
    }
    if (typing || ev.ctrlKey || ev.metaKey || ev.altKey) return;

    if (ev.key === "Enter") {
      var tag = target && target.tagName;
      if (tag === "BUTTON" || tag === "A" || tag === "SUMMARY") return; // their own Enter action
      if (labelForm) {
        ev.preventDefault();
        submit(labelForm);
      }
      return;
    }
    if (ev.key === "?") {
      if (help) {
        ev.preventDefault();
        setHelp(help.hidden);
      }
      return;
    }
    if (!labelForm || ev.key.length !== 1) return;
    var key = ev.key.toLowerCase();
    if (key === "s" && skipReason) {
      ev.preventDefault();
      skipReason.focus();
      return;
    }
    if (!/^[a-z0-9]$/.test(key)) return;
    var input = labelForm.querySelector('input[data-key="' + key + '"]');
    if (!input) return;
    ev.preventDefault();
    input.checked = input.type === "checkbox" ? !input.checked : true;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });

  // Lease countdown against the server's clock at render time (no client clock skew).
  if (lease) {
    var expires = Number(lease.getAttribute("data-expires"));
    var serverNow = Number(lease.getAttribute("data-now"));
    if (isFinite(expires) && isFinite(serverNow) && serverNow > 0) {
      var tick = function () {
        var left = expires - serverNow - elapsedMs() / 1000;
        if (left <= 0) {
          lease.textContent = "Lease expired: submitting will bring the next item";
          lease.classList.add("expired");
          return;
        }
        lease.textContent =
          "Lease expires in " + (left >= 120 ? Math.ceil(left / 60) + " min" : Math.ceil(left) + " s");
        window.setTimeout(tick, left > 150 ? 15000 : 1000);
      };
      tick();
    }
  }
})();
