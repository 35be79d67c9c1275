// Keyboard answers for the labelling page: 1-4 press the matching button.
// Loaded from /static (the Content Security Policy allows no inline script).
(function () {
  "use strict";
  const form = document.getElementById("label-form");
  if (!form) return;
  let submitted = false;

  // One answer per page: a second key press while the first is in flight would be refused
  // by the server anyway, but we stop it here so the annotator never sees a warning.
  form.addEventListener("submit", function (event) {
    if (submitted) event.preventDefault();
    submitted = true;
  });

  document.addEventListener("keydown", function (event) {
    const target = event.target;
    if (event.key === "Escape" && target instanceof HTMLTextAreaElement) {
      target.blur();
      return;
    }
    // Digits typed into the comment box are text, not answers.
    if (target instanceof HTMLTextAreaElement || target instanceof HTMLInputElement) return;
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const button = form.querySelector('button[data-key="' + event.key + '"]');
    if (!button) return;
    event.preventDefault();
    button.classList.add("pressed");
    form.requestSubmit(button);
  });
})();
