// One question before an action that cannot be undone. The dialog opens
// with Cancel focused, so Enter or Escape right away changes nothing.

const $ = (id) => document.getElementById(id);

/** Asks *title* / *text*; resolves true only when the user chose *action*. */
export function confirmAction(title, text, action) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = action;
  dialog.returnValue = "cancel";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}
