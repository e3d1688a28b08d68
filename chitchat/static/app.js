// The chat page: keeps the conversation in memory and sends all of it with every request
// (the server is stateless), reading the streamed reply as server-sent events.
// Model text only ever reaches the page through textContent, never as HTML.
"use strict";

const TEXT = {
  zh: { newChat: "新对话", send: "发送", stop: "停止", empty: "说点什么吧。",
        placeholder: "输入消息，回车发送，Shift+回车换行", keyLabel: "API 密钥", save: "保存",
        emptyReply: "（空回复）", needKey: "服务器需要 API 密钥。", error: "出错了：",
        network: "连接服务器失败。", lang: "English" },
  en: { newChat: "New chat", send: "Send", stop: "Stop", empty: "Say something.",
        placeholder: "Type a message; Enter sends, Shift+Enter adds a line", keyLabel: "API key",
        save: "Save", emptyReply: "(empty reply)", needKey: "The server needs an API key.",
        error: "Error: ", network: "Could not reach the server.", lang: "中文" },
};

const $ = (id) => document.getElementById(id);
const state = {
  lang: localStorage.getItem("chitchat.lang") ||
        ((navigator.language || "").toLowerCase().startsWith("zh") ? "zh" : "en"),
  history: [],          // [{role, content}] as the API takes it
  controller: null,     // AbortController of the reply being streamed
  key: sessionStorage.getItem("chitchat.key") || "",
  model: "chitchat",
};

function t(name) { return TEXT[state.lang][name]; }

function applyLanguage() {
  document.documentElement.lang = state.lang;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
  $("lang").textContent = t("lang");
  for (const el of document.querySelectorAll(".msg.assistant.empty")) {
    el.textContent = t("emptyReply");
  }
}

function showStatus(text) { $("status").textContent = text; }

function addMessage(role, text) {
  $("empty").hidden = true;
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;
  $("messages").appendChild(el);
  scrollDown();
  return el;
}

function scrollDown() { const m = document.querySelector("main"); m.scrollTop = m.scrollHeight; }

function setBusy(busy) {
  $("send").disabled = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// Splits a growing buffer of SSE text into complete events; returns [events, rest].
function takeEvents(buffer) {
  const parts = buffer.replace(/\r\n?/g, "\n").split("\n\n");
  const rest = parts.pop();
  const events = parts.map((block) => block.split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, ""))
    .join("\n")).filter((data) => data !== "");
  return [events, rest];
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON: fall through to the status line */ }
  return `HTTP ${res.status}`;
}

async function send(text) {
  showStatus("");
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.dataset.state = "streaming";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let reply = "";
  let failed = null;
  try {
    const headers = { "Content-Type": "application/json" };
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    const res = await fetch("v1/chat/completions", {
      method: "POST", headers, signal: controller.signal,
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true }),
    });
    if (!res.ok) {
      if (res.status === 401) { $("key-form").hidden = false; $("key").focus(); }
      failed = res.status === 401 ? t("needKey") : t("error") + await errorMessage(res);
    } else {
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      reading: for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let events;
        [events, buffer] = takeEvents(buffer);
        for (const data of events) {
          if (data === "[DONE]") break reading;
          const chunk = JSON.parse(data);
          if (chunk.error) { failed = t("error") + chunk.error.message; break reading; }
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            reply += delta.content;
            bubble.textContent = reply;
            scrollDown();
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") failed = t("network");
  } finally {
    if (state.controller === controller) { state.controller = null; setBusy(false); }
  }
  if (controller.signal.aborted && !bubble.isConnected) return;  // "new chat" cleared it
  if (failed) {
    // The exchange did not happen: take the message back so it can be sent again.
    state.history.pop();
    bubble.remove();
    $("input").value = $("input").value || text;
    showStatus(failed);
  } else {
    state.history.push({ role: "assistant", content: reply });
    if (!reply) { bubble.classList.add("empty"); bubble.textContent = t("emptyReply"); }
  }
  bubble.dataset.state = "done";
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  setBusy(false);
  state.history = [];
  for (const el of document.querySelectorAll("#messages .msg")) el.remove();
  $("empty").hidden = false;
  showStatus("");
  $("input").focus();
}

function submit(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
}

async function loadModelName() {
  try {
    const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
    const res = await fetch("v1/models", { headers });
    if (!res.ok) return;
    const body = await res.json();
    if (body.data && body.data[0]) {
      state.model = body.data[0].id;
      $("model").textContent = state.model;
    }
  } catch (e) { /* the name is cosmetic; a chat request will report real problems */ }
}

document.addEventListener("DOMContentLoaded", () => {
  applyLanguage();
  $("chat-form").addEventListener("submit", submit);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) submit(e);
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("lang").addEventListener("click", () => {
    state.lang = state.lang === "zh" ? "en" : "zh";
    localStorage.setItem("chitchat.lang", state.lang);
    applyLanguage();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem("chitchat.key", state.key);
    $("key-form").hidden = true;
    showStatus("");
    loadModelName();
  });
  loadModelName();
});
