// The login form: POST /api/sessions, and the server's refusal shown next
// to the field it is about (400 username or other named field, 401 password,
// anything else on the form).

import { ApiError, login } from "/static/api.js";
import * as store from "/static/store.js";

const $ = (id) => document.getElementById(id);

const FIELDS = {
  username: "login-username",
  aws_login: "login-aws",
  customer_name: "login-customer",
  password: "login-password",
};

function clearErrors() {
  for (const inputId of Object.values(FIELDS)) {
    $(inputId).removeAttribute("aria-invalid");
    $(`${inputId}-error`).textContent = "";
  }
  $("login-form-error").textContent = "";
  $("login-form-error").classList.remove("info");
}

/** Which field an error is about: the one a 400 names (the username unless another), the password on 401. */
function fieldOf(error) {
  if (error.status === 401) return "password";
  if (error.status !== 400) return null;
  const message = error.message.toLowerCase();
  if (message.includes("aws")) return "aws_login";
  if (message.includes("customer")) return "customer_name";
  if (message.includes("password")) return "password";
  return "username";
}

function showError(error) {
  const field = fieldOf(error);
  if (!field) {
    $("login-form-error").textContent = error.message;
    return;
  }
  const input = $(FIELDS[field]);
  input.setAttribute("aria-invalid", "true");
  $(`${FIELDS[field]}-error`).textContent = error.message;
  // A 401 teaches us this server wants passwords.
  if (error.status === 401) $("login-password-optional").textContent = "(this server requires one)";
  input.focus();
}

function readFields() {
  const form = new FormData($("login-form"));
  const fields = { username: String(form.get("username") || "").trim() };
  for (const name of ["aws_login", "customer_name"]) {
    const value = String(form.get(name) || "").trim();
    if (value) fields[name] = value;
  }
  // Spaces may belong to a password: sent as typed.
  const password = String(form.get("password") || "");
  if (password) fields.password = password;
  return fields;
}

/** Wires the form; *onLoggedIn* gets the new session, already saved for reloads. */
export function initLogin(onLoggedIn) {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const fields = readFields();
    $("login-submit").disabled = true;
    try {
      const answer = await login(fields);
      $("login-password").value = "";
      const session = {
        session_id: answer.session_id,
        token: answer.token,
        ws_url: answer.ws_url,
        stream_url: answer.stream_url,
        username: answer.username || fields.username,
        state: answer.state || "idle",
      };
      store.forgetAll();
      store.saveSession(session);
      onLoggedIn(session);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      showError(error);
    } finally {
      $("login-submit").disabled = false;
    }
  });
}

/** Shows the form, with *message* (why we are back here) above the button. */
export function showLogin(message) {
  $("session-view").hidden = true;
  $("login-view").hidden = false;
  document.title = "deskhive";
  clearErrors();
  if (message) {
    $("login-form-error").textContent = message;
    $("login-form-error").classList.add("info");
  }
  $("login-username").focus();
}
