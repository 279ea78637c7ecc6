// picochat web chat: streams /v1/chat/completions (server-sent events) into the page.
// Vanilla JS, no build step. Model text only ever reaches the page as DOM text nodes
// (textContent / append(string)), never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), empty: $("empty"), form: $("composer"), input: $("input"), send: $("send"),
    stop: $("stop"), regen: $("regen"), newChat: $("new-chat"), temperature: $("temperature"),
    maxTokens: $("max-tokens"), model: $("model"),
  };
  let history = []; // {role: "user"|"assistant", parts: [{part, text}], el, body}
  let controller = null; // the AbortController of the answer being streamed
  let modelId = "picochat";
  let contextLength = Infinity;  // from /v1/models: a reply can never be longer than the context

  // ------------------------------------------------------------ markdown -> DOM nodes
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // tool-call chips ride through the markdown as private-use sentinels: \uE000<index>\uE001
  const CHIP = /\uE000(\d+)\uE001/g;
  const INLINE = new RegExp([
    "`([^`\\n]+)`", // 1: inline code
    "\\*\\*(?!\\s)([^\\n]+?)\\*\\*", // 2: bold
    "(?<![\\w*])\\*(?![\\s*])([^*\\n]+?)\\*(?![\\w*])", // 3: italic
    "\\uE000(\\d+)\\uE001", // 4: a tool chip
  ].join("|"), "g");

  function inline(parent, text, chips) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      if (m[1] !== undefined) parent.append(el("code", null, m[1]));
      else if (m[2] !== undefined) inline(parent.appendChild(el("strong")), m[2], chips);
      else if (m[3] !== undefined) inline(parent.appendChild(el("em")), m[3], chips);
      else parent.append(chipNode(chips[+m[4]] || []));
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  // A tiny markdown subset: paragraphs, ``` fenced code, `code`, **bold**, *italic*, lists,
  // headings. Returns a DocumentFragment; an unclosed fence (mid-stream) renders as code so far.
  function renderMarkdown(text, chips = []) {
    const out = document.createDocumentFragment();
    const lines = String(text).split(/\r?\n/);
    let para = [], list = null;
    const flush = () => {
      if (para.length) inline(out.appendChild(el("p")), para.join("\n"), chips);
      para = [];
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+#.-]*)/);
      if (fence) {
        flush();
        const code = [];
        while (++i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i]);
        const pre = out.appendChild(el("pre"));
        if (fence[1]) pre.dataset.lang = fence[1];
        pre.appendChild(el("code", null, code.join("\n").replace(CHIP, (_, n) => chipText(chips[+n] || []))));
        continue;
      }
      const item = line.match(/^\s*(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/);
      const head = line.match(/^(#{1,6})\s+(.*)$/);
      if (item) {
        const tag = item[1] ? "UL" : "OL";
        if (para.length) flush();
        if (!list || list.tagName !== tag) {
          list = out.appendChild(el(tag.toLowerCase()));
          if (item[2] && +item[2] !== 1) list.start = +item[2];
        }
        inline(list.appendChild(el("li")), item[3], chips);
      } else if (head) {
        flush();
        inline(out.appendChild(el("h" + Math.min(6, head[1].length + 2))), head[2], chips);
      } else if (!line.trim()) {
        flush();
      } else if (list && /^\s+\S/.test(line)) { // an indented line continues the list item
        list.lastChild.append("\n");
        inline(list.lastChild, line.trim(), chips);
      } else {
        list = null;
        para.push(line);
      }
    }
    flush();
    return out;
  }

  // ------------------------------------------------------------ answers: text + tool parts
  const chipText = (segs) => segs.map((s) => s.text).join("");

  function chipNode(segs) { // "[calc: 12*7] = 84" -> a chip reading "calc: 12*7 = 84"
    const chip = el("span", "tool");
    for (const s of segs) {
      const text = s.part === "call" ? s.text.replace(/^\[/, "").replace(/\]$/, "") : s.text;
      if (text) chip.appendChild(el("span", s.part, text));
    }
    return chip;
  }

  // parts: [{part: "text"|"call"|"output", text}] -> DocumentFragment
  function renderParts(parts) {
    let text = "";
    const chips = [];
    let open = false; // whether the last chip is still the last thing in the text
    for (const p of parts) {
      if (p.part !== "call" && p.part !== "output") {
        text += p.text.replace(/[\uE000\uE001]/g, "");
        open = false;
      } else if (open && !(p.part === "call" && chips.at(-1).at(-1).part === "output")) {
        chips.at(-1).push(p);
      } else {
        chips.push([p]);
        text += `\uE000${chips.length - 1}\uE001`;
        open = true;
      }
    }
    return renderMarkdown(text, chips);
  }

  // ------------------------------------------------------------ messages
  function addMessage(role, text) {
    ui.empty.hidden = true;
    const msg = {role, parts: text === undefined ? [] : [{part: "text", text}]};
    msg.el = el("div", `msg ${role}`);
    msg.body = msg.el.appendChild(el("div", "body"));
    if (role === "user") msg.body.textContent = text;
    ui.messages.appendChild(msg.el);
    history.push(msg);
    scroll(true);
    return msg;
  }

  function removeMessage(msg) {
    msg.el.remove();
    history = history.filter((m) => m !== msg);
  }

  function append(msg, text, part) {
    const last = msg.parts.at(-1);
    if (last && last.part === part) last.text += text;
    else msg.parts.push({part, text});
  }

  function render(msg) {
    const stick = nearBottom();
    msg.body.replaceChildren(renderParts(msg.parts));
    scroll(stick);
  }

  let pending = null; // one re-render per animation frame while tokens stream in
  function scheduleRender(msg) {
    if (pending) return;
    pending = requestAnimationFrame(() => { pending = null; render(msg); });
  }

  function note(msg, text) { msg.el.appendChild(el("div", "note", text)); }

  function showError(text) {
    ui.empty.hidden = true;
    const stick = nearBottom();
    ui.messages.appendChild(el("div", "msg error", text));
    scroll(stick);
  }

  const nearBottom = () => ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 60;
  function scroll(stick) { if (stick) ui.messages.scrollTop = ui.messages.scrollHeight; }

  // ------------------------------------------------------------ talking to the server
  // An answer with tool calls goes back as picochat's parts, so the model sees its own tool tokens again.
  const TOOL = {call: (t) => ({type: "python", text: t.replace(/^\[calc: ?/, "").replace(/\]$/, "")}),
    output: (t) => ({type: "python_output", text: t.replace(/^ = /, "")}), text: (t) => ({type: "text", text: t})};
  const wire = (msgs) => msgs.map((m) => ({role: m.role,
    content: m.parts.every((p) => p.part === "text") ? m.parts.map((p) => p.text).join("")
      : m.parts.map((p) => (TOOL[p.part] || TOOL.text)(p.text))}));

  function number(input, fallback, int) {
    const v = int ? parseInt(input.value, 10) : parseFloat(input.value);
    return Number.isFinite(v) ? v : fallback;
  }

  async function errorText(res) {
    let text = "";
    try { text = await res.text(); } catch (_) { /* the body is lost: the status is all we have */ }
    try {
      const j = JSON.parse(text);
      if (j && j.error) return `error ${res.status}: ${j.error.message || JSON.stringify(j.error)}`;
    } catch (_) { /* not JSON: show the text itself */ }
    return `error ${res.status}: ${text.trim().slice(0, 300) || res.statusText}`;
  }

  // Read a text/event-stream body; call onData with each parsed `data:` JSON until [DONE].
  async function readEvents(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      buf += done ? decoder.decode() + "\n\n" : decoder.decode(value, {stream: true});
      const events = buf.split(/\r\n\r\n|\n\n|\r\r/);
      buf = events.pop();
      for (const ev of events) {
        const data = ev.split(/\r\n|\n|\r/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data.trim() === "[DONE]") { reader.cancel().catch(() => {}); return; }
        onData(JSON.parse(data));
      }
      if (done) return;
    }
  }

  // Stream an answer to the conversation as it stands (its last message is the user's).
  async function complete() {
    const messages = wire(history);  // before the answer's own (empty) message joins the history
    const request = {
      model: modelId, stream: true,
      temperature: number(ui.temperature, 0.6),
      max_tokens: Math.min(number(ui.maxTokens, 256, true), contextLength - 1),
    };
    const msg = addMessage("assistant");
    msg.el.dataset.state = "streaming";
    controller = new AbortController();
    setBusy(true);
    let state = "done", cut = false, skip = 0;
    try {
      let res;
      for (;;) {  // a conversation longer than the context: leave out its oldest exchanges
        request.messages = messages.slice(skip);
        res = await fetch("/v1/chat/completions", {
          method: "POST", headers: {"Content-Type": "application/json"},
          body: JSON.stringify(request), signal: controller.signal,
        });
        if (res.status !== 400 || skip + 2 >= messages.length) break;
        const body = await res.clone().json().catch(() => null);
        if (!body || !body.error || body.error.code !== "context_length_exceeded" || body.error.param !== "messages") break;
        skip += 2;
      }
      if (!res.ok) throw new Error(await errorText(res));
      await readEvents(res.body, (chunk) => {
        if (chunk.error) throw new Error(`error: ${chunk.error.message || JSON.stringify(chunk.error)}`);
        const choice = (chunk.choices && chunk.choices[0]) || {};
        if (choice.finish_reason === "length") cut = true;
        const delta = choice.delta || {};
        if (typeof delta.content !== "string" || !delta.content) return;
        append(msg, delta.content, (delta.picochat && delta.picochat.part) || "text");
        scheduleRender(msg);
      });
    } catch (err) {
      if (err.name === "AbortError") state = "stopped";
      else {
        state = "error";
        showError(err instanceof TypeError ? `network error: ${err.message}` : err.message);
      }
    } finally {
      if (pending) { cancelAnimationFrame(pending); pending = null; }
      controller = null;
      if (!msg.parts.length && state !== "done") removeMessage(msg);
      else {
        render(msg);
        msg.el.dataset.state = state;
        if (state === "stopped") note(msg, "stopped");
        if (state === "done" && cut) note(msg, "reached the max-tokens limit");
        if (skip) note(msg, `the ${skip} oldest messages no longer fit in the model's context and were left out`);
        if (!msg.parts.length) note(msg, "(empty answer)");
      }
      setBusy(false);
    }
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.regen.disabled = busy || !history.some((m) => m.role === "user");
    document.body.classList.toggle("busy", busy);
  }

  function send() {
    const text = ui.input.value.trim();
    if (!text || controller) return;
    ui.input.value = "";
    addMessage("user", text);
    complete();
  }

  function regenerate() {
    if (controller) return;
    const last = history.at(-1);
    if (last && last.role === "assistant") removeMessage(last);
    if (history.length && history.at(-1).role === "user") complete();
  }

  function newChat() {
    if (controller) controller.abort();
    history = [];
    ui.messages.replaceChildren(ui.empty);
    ui.empty.hidden = false;
    setBusy(false);
    ui.input.focus();
  }

  // ------------------------------------------------------------ wiring
  ui.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && controller) controller.abort(); });
  ui.stop.addEventListener("click", () => { if (controller) controller.abort(); });
  ui.regen.addEventListener("click", regenerate);
  ui.newChat.addEventListener("click", newChat);

  fetch("/v1/models").then((r) => (r.ok ? r.json() : null)).then((j) => {
    const id = j && j.data && j.data[0] && j.data[0].id;
    if (id) { modelId = id; ui.model.textContent = id; }
    const context = j && j.data && j.data[0] && j.data[0].context_length;
    if (context) contextLength = context;
  }).catch(() => { /* the chat still works without the model's name */ });

  setBusy(false);
  ui.input.focus();
  // for tests and the curious: the renderers, which build DOM nodes only
  window.picochat = {renderMarkdown, renderParts};
})();
