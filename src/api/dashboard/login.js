// Posts the pasted token once; the node answers with an HttpOnly session cookie.
"use strict";

// The cookie is SameSite=Strict, so a link from another site opens this page without it
// even when the browser is logged in; a same-origin read tells, and a reload sends it.
fetch("/api/status").then((res) => {
  if (res.ok) location.replace("/");
}, () => {});

document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const error = document.getElementById("error");
  const input = document.getElementById("token");
  error.textContent = "";
  try {
    const res = await fetch("/api/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: input.value.trim() }),
    });
    if (res.ok) {
      input.value = "";
      location.replace("/");
      return;
    }
    const body = await res.json().catch(() => ({}));
    error.textContent = body.detail || `login failed (${res.status})`;
  } catch (e) {
    error.textContent = `the node did not answer: ${e}`;
  }
});
