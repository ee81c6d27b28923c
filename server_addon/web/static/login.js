// The login form: posts the farm secret; the server answers with a session cookie.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("login-form");
  const line = document.getElementById("login-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    line.textContent = "";
    try {
      const response = await fetch("/login", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Requested-With": "MicroFarm" },
        body: JSON.stringify({ secret: document.getElementById("secret").value }),
        credentials: "same-origin",
      });
      if (response.ok) {
        window.location.assign("/");
        return;
      }
      const reply = await response.json().catch(() => null);
      line.textContent = reply && reply.error ? reply.error : `Login failed (${response.status}).`;
    } catch {
      line.textContent = "The server cannot be reached.";
    }
  });
});
