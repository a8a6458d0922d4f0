// The Leasehold dashboard: plain JavaScript, no build step, nothing loaded
// from anywhere but this server. It calls the server over the Connect
// protocol with JSON, as any client would, with the bearer token typed into
// the page (kept in sessionStorage: this tab only, gone when it closes).
//
// Why the list polls and only a lock's page watches: a browser opens at most
// six HTTP/1.1 connections to one host, and Watch is per key and holds its
// connection, so a Watch per row cannot work. The list re-reads with List
// (one page of up to 1000 locks, at most 200 ms old) every 500 ms and
// counts TTLs down locally in between; a lock's page holds ONE Watch on its key (and reads the TTL
// with Describe every second, since renewals are not events).
"use strict";

const POLL_MS = 500;
const PAGE_SIZE = 1000;
const MAX_PAGES = 10;
const DESCRIBE_MS = 1000;
const LIST_MAX_AGE_MS = 200;
const TOKEN_KEY = "leasehold.token";

const $ = (id) => document.getElementById(id);

class ConnectError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(contentType) {
  const h = { "content-type": contentType, "connect-protocol-version": "1" };
  const t = token();
  if (t) h.authorization = "Bearer " + t;
  return h;
}

// A Connect error from a non-200 reply (its JSON body), or a stand-in.
async function replyError(res) {
  try {
    const body = await res.json();
    if (body && body.code) return new ConnectError(body.code, body.message);
  } catch (_) {
    // not JSON: fall through
  }
  return new ConnectError("unknown", "HTTP " + res.status);
}

// One Connect unary call with JSON; `extra` headers added.
async function call(service, method, body, extra) {
  let res;
  try {
    res = await fetch("/leasehold.v1." + service + "/" + method, {
      method: "POST",
      headers: { ...headers("application/json"), "connect-timeout-ms": "10000", ...extra },
      body: JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    throw new ConnectError("unavailable", "cannot reach the server: " + e.message);
  }
  if (!res.ok) throw await replyError(res);
  return res.json();
}

// ---- formatting ------------------------------------------------------------

// Every holder of a lock as {owner, fencingToken, ttlMs, metadata, mode}.
function holdersOf(state) {
  if (!state || !state.held) return [];
  if (state.holders && state.holders.length) return state.holders;
  return [{
    owner: state.owner, fencingToken: state.fencingToken, ttlMs: state.ttlMs,
    metadata: state.metadata, mode: state.mode,
  }];
}

function modeName(mode) {
  return mode === "LOCK_MODE_SHARED" ? "shared" : "exclusive";
}

// Fencing tokens are uint64, strings in JSON: compare as decimal strings.
function maxToken(tokens) {
  let best = "";
  for (const t of tokens) {
    const s = String(t || "0");
    if (s.length > best.length || (s.length === best.length && s > best)) best = s;
  }
  return best || "0";
}

function metaText(metadata) {
  if (!metadata) return "";
  return Object.keys(metadata).sort().map((k) => k + "=" + metadata[k]).join(", ");
}

function ttlText(ms) {
  return ms <= 0 ? "0.0 s" : (ms / 1000).toFixed(1) + " s";
}

function clock(date) {
  return date.toISOString().slice(11, 23);
}

function td(text, cls) {
  const cell = document.createElement("td");
  cell.textContent = text;
  if (cls) cell.className = cls;
  return cell;
}

// ---- notices and the token -------------------------------------------------

function notice(text, isError) {
  const n = $("notice");
  n.hidden = !text;
  n.textContent = text || "";
  n.className = isError ? "error" : "";
}

function explain(err) {
  switch (err.code) {
    case "permission_denied":
      return "This token has no admin grant: the lock list needs one (List is an AdminService call), and no force-release button is shown. A lock's own page still works for keys in the token's scope: type its key in \"Open a key\".";
    case "unauthenticated":
      return token()
        ? "The server did not accept this token (" + err.message + ")."
        : "This server needs a bearer token: type it above.";
    case "unimplemented":
      return "This server does not serve the AdminService: start it with --admin (no auth file) or --auth-file with an admin tenant.";
    default:
      return err.code + ": " + err.message;
  }
}

function showTokenState() {
  $("token-state").textContent = token() ? "token set (kept in this tab only)" : "no token";
}

// ---- admin grant -----------------------------------------------------------

// null: not known yet; true: List answered; false: List was denied.
let admin = null;

function setAdmin(value) {
  admin = value;
  document.body.dataset.admin = String(value);
  $("force-form").hidden = value !== true || !current;
  $("no-admin").hidden = value !== false || !current;
}

// List needs the admin grant, so a List that is not PERMISSION_DENIED means
// this token may also force-release.
async function probeAdmin(key) {
  try {
    await call("AdminService", "List", { prefix: key, pageSize: 1 });
    setAdmin(true);
  } catch (e) {
    if (e.code === "permission_denied" || e.code === "unimplemented") {
      setAdmin(false);
    } else if (e.code === "unauthenticated") {
      setAdmin(false);
      notice(explain(e), true);
    }
  }
}

// ---- the list --------------------------------------------------------------

let listGen = 0;
let listTimer = null;
let ttlCells = [];
let firstRender = true;

async function listAll(prefix) {
  const locks = [];
  let pageToken = "";
  for (let i = 0; i < MAX_PAGES; i++) {
    // A page up to LIST_MAX_AGE_MS old will do: many open pages then
    // share one read of the store (server/service/recent_lists.rs).
    const reply = await call("AdminService", "List", { prefix, pageSize: PAGE_SIZE, pageToken },
      { "leasehold-list-max-age-ms": String(LIST_MAX_AGE_MS) });
    if (reply.locks) for (const l of reply.locks) locks.push(l);
    pageToken = reply.nextPageToken || "";
    if (!pageToken) return { locks, more: false };
  }
  return { locks, more: true };
}

function renderList({ locks, more }, at) {
  const rows = document.createDocumentFragment();
  const cells = [];
  for (const lock of locks) {
    const holders = holdersOf(lock.state);
    if (!holders.length) continue;
    const tr = document.createElement("tr");
    tr.dataset.key = lock.key;
    const keyCell = document.createElement("td");
    keyCell.className = "key";
    const link = document.createElement("a");
    link.href = "#/lock/" + encodeURIComponent(lock.key);
    link.textContent = lock.key;
    keyCell.append(link);
    const meta = holders.map((h) => metaText(h.metadata)).filter(Boolean).join(" | ");
    const metaCell = td(meta, "meta");
    metaCell.title = meta;
    const ttl = Math.max(...holders.map((h) => h.ttlMs || 0));
    const ttlCell = td(ttlText(ttl), "num ttl");
    cells.push({ cell: ttlCell, deadline: at + ttl, text: ttlCell.textContent });
    tr.append(
      keyCell,
      td(modeName(lock.state.mode), "mode"),
      td(String(holders.length), "num holders"),
      td(holders.map((h) => h.owner || "").join(", "), "owner"),
      metaCell,
      td(maxToken(holders.map((h) => h.fencingToken)), "num fence"),
      ttlCell,
    );
    rows.append(tr);
  }
  // One DOM change for the whole table.
  $("locks").tBodies[0].replaceChildren(rows);
  ttlCells = cells;
  $("empty").hidden = cells.length > 0;
  $("count").textContent = cells.length + (cells.length === 1 ? " lock" : " locks") +
    (more ? " (the first " + cells.length + "; narrow the prefix)" : "");
  $("refreshed").textContent = "refreshed " + clock(new Date()) + " UTC";
  if (firstRender) {
    firstRender = false;
    document.body.dataset.firstListMs = String(Math.round(performance.now()));
  }
}

async function pollList() {
  const gen = listGen;
  const started = performance.now();
  let delay = POLL_MS;
  try {
    const result = await listAll($("prefix").value);
    if (gen !== listGen) return;
    renderList(result, performance.now());
    setAdmin(true);
    notice("");
  } catch (e) {
    if (gen !== listGen) return;
    $("locks").tBodies[0].replaceChildren();
    ttlCells = [];
    $("count").textContent = "";
    notice(explain(e), e.code !== "permission_denied");
    if (e.code === "permission_denied" || e.code === "unimplemented" || e.code === "unauthenticated") {
      setAdmin(false);
      return; // nothing changes until the token does
    }
    delay = 2000;
  }
  if (gen === listGen) {
    listTimer = setTimeout(pollList, Math.max(0, delay - (performance.now() - started)));
  }
}

function startList() {
  stopList();
  pollList();
}

function stopList() {
  listGen++;
  clearTimeout(listTimer);
}

// Counts every TTL shown down between refreshes; only changed text is written.
function tick() {
  const now = performance.now();
  for (const c of ttlCells) {
    const left = c.deadline - now;
    const text = ttlText(left);
    if (text !== c.text) {
      c.text = text;
      c.cell.textContent = text;
      c.cell.classList.toggle("low", left < 2000);
    }
  }
}

// ---- a lock's page ---------------------------------------------------------

let current = null; // { key, abort, describeTimer }

const EVENT_NAMES = {
  KIND_STATE: "STATE", KIND_ACQUIRED: "ACQUIRED", KIND_RELEASED: "RELEASED",
  KIND_EXPIRED: "EXPIRED", KIND_FORCE_RELEASED: "FORCE_RELEASED",
};

function summary(state) {
  const holders = holdersOf(state);
  if (!holders.length) return "free";
  const who = holders.map((h) => (h.owner || "(no owner)") + " (fencing " + (h.fencingToken || "0") + ")");
  return modeName(state.mode) + ", held by " + who.join(", ");
}

function showState(state) {
  if (!current) return;
  const at = performance.now();
  const holders = holdersOf(state);
  $("lock-summary").textContent = holders.length
    ? "Held, " + modeName(state.mode) + (state.mode === "LOCK_MODE_SHARED" ? " (limit " + (state.sharedLimit || 0) + ")" : "") + "."
    : "Not held.";
  const rows = document.createDocumentFragment();
  const cells = [];
  for (const h of holders) {
    const tr = document.createElement("tr");
    const ttlCell = td(ttlText(h.ttlMs || 0), "num ttl");
    cells.push({ cell: ttlCell, deadline: at + (h.ttlMs || 0), text: ttlCell.textContent });
    tr.append(td(h.owner || "", "owner"), td(modeName(h.mode || state.mode), "mode"),
      td(String(h.fencingToken || "0"), "num fence"), ttlCell, td(metaText(h.metadata), "meta"));
    rows.append(tr);
  }
  $("holders").tBodies[0].replaceChildren(rows);
  $("holders").hidden = !holders.length;
  ttlCells = cells;
}

function addEvent(event) {
  const kind = EVENT_NAMES[event.kind] || String(event.kind);
  const tr = document.createElement("tr");
  tr.dataset.kind = kind;
  const fence = kind === "STATE" ? "" : String(event.fencingToken || "0");
  tr.append(td(clock(new Date()), "time"), td(kind, "kind ev-" + kind), td(fence, "num fence"),
    td(summary(event.state)));
  $("events").tBodies[0].prepend(tr);
}

function envelope(json) {
  const bytes = new TextEncoder().encode(json);
  const out = new Uint8Array(5 + bytes.length);
  new DataView(out.buffer).setUint32(1, bytes.length);
  out.set(bytes, 5);
  return out;
}

// One Watch stream: every event to `onEvent`; resolves at the stream's
// clean end, throws a ConnectError at its error end.
async function watchOnce(key, signal, onEvent) {
  const res = await fetch("/leasehold.v1.LockService/Watch", {
    method: "POST",
    headers: headers("application/connect+json"),
    body: envelope(JSON.stringify({ key })),
    signal,
    cache: "no-store",
  });
  if (!res.ok) throw await replyError(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ConnectError("unavailable", "the stream ended without its end message");
    const joined = new Uint8Array(buf.length + value.length);
    joined.set(buf);
    joined.set(value, buf.length);
    buf = joined;
    while (buf.length >= 5) {
      const len = new DataView(buf.buffer, buf.byteOffset).getUint32(1);
      if (buf.length < 5 + len) break;
      const flags = buf[0];
      const message = JSON.parse(decoder.decode(buf.subarray(5, 5 + len)));
      buf = buf.slice(5 + len);
      if (flags & 2) {
        if (message.error) throw new ConnectError(message.error.code, message.error.message);
        return;
      }
      onEvent(message);
    }
  }
}

async function watchLoop(page) {
  let backoff = 1000;
  while (current === page) {
    $("watch-state").textContent = "(connecting)";
    try {
      await watchOnce(page.key, page.abort.signal, (event) => {
        $("watch-state").textContent = "(live)";
        backoff = 1000;
        addEvent(event);
        showState(event.state);
      });
    } catch (e) {
      if (current !== page) return;
      if (e.name === "AbortError") return;
      $("watch-state").textContent = "(" + e.code + ": " + e.message + ")";
      if (e.code === "permission_denied" || e.code === "unauthenticated") {
        notice(explain(e), true);
        return;
      }
    }
    if (current !== page) return;
    await new Promise((r) => setTimeout(r, backoff));
    backoff = Math.min(backoff * 2, 10000);
  }
}

async function describeLoop(page) {
  while (current === page) {
    try {
      const state = await call("LockService", "Describe", { key: page.key });
      if (current === page) showState(state);
    } catch (_) {
      // The Watch line says what is wrong.
    }
    await new Promise((r) => { page.describeTimer = setTimeout(r, DESCRIBE_MS); });
  }
}

function openLock(key) {
  closeLock();
  const page = { key, abort: new AbortController(), describeTimer: null };
  current = page;
  $("lock-key").textContent = key;
  $("lock-summary").textContent = "";
  $("holders").tBodies[0].replaceChildren();
  $("events").tBodies[0].replaceChildren();
  $("force-result").textContent = "";
  $("reason").value = "";
  $("force").disabled = true;
  setAdmin(admin);
  if (admin === null) probeAdmin(key);
  watchLoop(page);
  describeLoop(page);
}

function closeLock() {
  if (!current) return;
  current.abort.abort();
  clearTimeout(current.describeTimer);
  current = null;
}

async function forceRelease(ev) {
  ev.preventDefault();
  const reason = $("reason").value.trim();
  if (!current || !reason) return;
  const result = $("force-result");
  $("force").disabled = true;
  try {
    const reply = await call("AdminService", "ForceRelease", { key: current.key, reason });
    const n = reply.released || 0;
    result.className = "ok";
    result.textContent = n ? "Force-released: " + n + " holder" + (n === 1 ? "" : "s") + " removed." : "Nothing to release: the lock was free.";
    $("reason").value = "";
  } catch (e) {
    result.className = "error";
    result.textContent = explain(e);
  }
  $("force").disabled = !$("reason").value.trim();
}

// ---- routing ---------------------------------------------------------------

function route() {
  const hash = location.hash;
  notice("");
  if (hash.startsWith("#/lock/")) {
    stopList();
    $("list-view").hidden = true;
    $("lock-view").hidden = false;
    openLock(decodeURIComponent(hash.slice("#/lock/".length)));
  } else {
    closeLock();
    $("lock-view").hidden = true;
    $("list-view").hidden = false;
    $("force-form").hidden = true;
    $("no-admin").hidden = true;
    startList();
  }
}

function init() {
  showTokenState();
  $("token").value = token();
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    else sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    admin = null;
    route();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    showTokenState();
    admin = null;
    route();
  });
  let typing = null;
  $("prefix").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(startList, 150);
  });
  $("open-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("open-key").value.trim();
    if (key) location.hash = "#/lock/" + encodeURIComponent(key);
  });
  $("locks").tBodies[0].addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr");
    if (tr && tr.dataset.key !== undefined && !ev.target.closest("a")) {
      location.hash = "#/lock/" + encodeURIComponent(tr.dataset.key);
    }
  });
  $("reason").addEventListener("input", () => {
    $("force").disabled = !$("reason").value.trim();
  });
  $("force-form").addEventListener("submit", forceRelease);
  window.addEventListener("hashchange", route);
  // A list in a tab nobody looks at stops polling, and catches up at once
  // when shown again (documentation/benchmarks.md: what open pages cost).
  document.addEventListener("visibilitychange", () => {
    if (!$("list-view").hidden) {
      if (document.hidden) stopList();
      else startList();
    }
  });
  setInterval(tick, 100);
  route();
}

init();
