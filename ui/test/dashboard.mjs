// Drives the Leasehold dashboard in headless Chromium (Debian's `chromium`)
// for tests/ui.rs, which starts the server, holds the locks and checks the
// server side. The two talk in lines: this script prints `ok STEP [figures]`
// when a step has passed in the browser (the Rust test waits for it) and
// reads commands from stdin (`released`: the test has just released a lock).
// Any surprise throws: the script prints `fail ...` and exits 1.
//
// Usage: node dashboard.mjs MODE, with LEASEHOLD_URL (http://127.0.0.1:PORT),
// SCREENSHOTS (a folder) and the mode's variables below.
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const mode = process.argv[2];
const base = process.env.LEASEHOLD_URL;
const shots = process.env.SCREENSHOTS;
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
mkdirSync(shots, { recursive: true });

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function command(expected) {
  const { value, done } = await lines.next();
  if (done || value.trim() !== expected) throw new Error(`expected ${expected} on stdin, got ${done ? "EOF" : value}`);
}
function ok(step, extra) {
  console.log(`ok ${step}${extra ? " " + extra : ""}`);
}
function check(cond, what) {
  if (!cond) throw new Error(what);
}
const row = (key) => `#locks tbody tr[data-key="${key}"]`;

async function setToken(page, token) {
  await page.fill("#token", token);
  await page.click("#token-form button[type=submit]");
}

// The admin flow on a server started with --ui --admin.
async function admin(page) {
  const key = process.env.HELD_KEY;
  const fence = process.env.HELD_FENCE;
  const gone = process.env.RELEASE_KEY;
  await page.goto(`${base}/ui`);
  await page.waitForSelector(row(key), { timeout: 10_000 });
  const cells = await page.locator(`${row(key)} td`).allInnerTexts();
  check(cells[0] === key, `key cell ${cells[0]}`);
  check(cells[1] === "exclusive", `mode cell ${cells[1]}`);
  check(cells[3] === "host-7", `owner cell ${cells[3]}`);
  check(cells[4].includes("deploy=4711"), `metadata cell ${cells[4]}`);
  check(cells[5] === fence, `fencing cell ${cells[5]} != ${fence}`);
  // The TTL counts down between refreshes.
  const ttl = () => page.locator(`${row(key)} td.ttl`).innerText().then(parseFloat);
  const first = await ttl();
  await page.waitForFunction(
    ([sel, t]) => parseFloat(document.querySelector(sel)?.textContent) < t,
    [`${row(key)} td.ttl`, first],
    { timeout: 5_000 },
  );
  const admin = await page.evaluate(() => document.body.dataset.admin);
  check(admin === "true", `admin flag ${admin}`);
  await page.waitForSelector(row(gone), { timeout: 5_000 });
  await page.screenshot({ path: `${shots}/list.png`, fullPage: true });
  // Searching by prefix narrows the list.
  await page.fill("#prefix", "jobs/");
  await page.waitForSelector(row("deploy/api"), { state: "detached", timeout: 5_000 });
  await page.waitForSelector(row(key), { timeout: 5_000 });
  await page.fill("#prefix", "");
  await page.waitForSelector(row("deploy/api"), { timeout: 5_000 });
  ok("listed", `ttl=${first}`);

  // The test releases RELEASE_KEY, then says so: the row must go within 1 s.
  await command("released");
  const t0 = Date.now();
  await page.waitForSelector(row(gone), { state: "detached", timeout: 1_000 });
  ok("gone", `ms=${Date.now() - t0}`);

  // The lock's page: one Watch, its STATE first, then force-release.
  await page.click(`${row(key)} td.owner`);
  await page.waitForSelector("#events tbody tr[data-kind=STATE]", { timeout: 5_000 });
  await page.waitForSelector("#force-form:not([hidden])", { timeout: 5_000 });
  check(await page.isDisabled("#force"), "the button waits for a reason");
  await page.fill("#reason", "dashboard test: holder host-7 is gone");
  await page.click("#force");
  await page.waitForSelector("#force-result.ok", { timeout: 5_000 });
  const result = await page.innerText("#force-result");
  check(result.includes("1 holder removed"), `force result ${result}`);
  const forced = page.locator("#events tbody tr[data-kind=FORCE_RELEASED]");
  await forced.waitFor({ timeout: 5_000 });
  const forcedFence = await forced.locator("td.fence").innerText();
  check(forcedFence === fence, `FORCE_RELEASED fencing token ${forcedFence} != ${fence}`);
  await page.waitForFunction(() => document.querySelector("#lock-summary").textContent === "Not held.", null, { timeout: 5_000 });
  await page.screenshot({ path: `${shots}/lock.png`, fullPage: true });
  ok("forced");

  // The test takes the lock again: the page shows ACQUIRED with a higher token.
  await command("reacquired");
  const acquired = page.locator("#events tbody tr[data-kind=ACQUIRED]");
  await acquired.waitFor({ timeout: 5_000 });
  const newFence = await acquired.locator("td.fence").innerText();
  await page.waitForSelector("#holders:not([hidden]) td.owner", { timeout: 5_000 });
  await page.screenshot({ path: `${shots}/lock-reacquired.png`, fullPage: true });
  ok("acquired", `fence=${newFence}`);
}

// A server with an auth file: no token, a non-admin token, an admin one.
async function scoped(page) {
  const user = process.env.USER_TOKEN;
  const ops = process.env.ADMIN_TOKEN;
  const key = process.env.HELD_KEY;
  await page.goto(`${base}/ui/`);
  await page.waitForSelector("#notice:not([hidden])", { timeout: 10_000 });
  let text = await page.innerText("#notice");
  check(text.includes("needs a bearer token"), `no-token notice ${text}`);
  ok("no-token");

  await setToken(page, user);
  await page.waitForFunction(() => document.querySelector("#notice").textContent.includes("no admin grant"), null, { timeout: 5_000 });
  check((await page.locator("#locks tbody tr").count()) === 0, "rows shown without the admin grant");
  check(await page.evaluate(() => sessionStorage.getItem("leasehold.token")) === user, "token kept in sessionStorage");
  await page.screenshot({ path: `${shots}/no-admin.png`, fullPage: true });
  // The lock's own page works with the scoped token, without the button.
  await page.fill("#open-key", key);
  await page.click("#open-form button");
  await page.waitForSelector("#events tbody tr[data-kind=STATE]", { timeout: 5_000 });
  await page.waitForFunction(() => document.body.dataset.admin === "false", null, { timeout: 5_000 });
  const summary = await page.innerText("#events tbody tr[data-kind=STATE]");
  check(summary.includes("team-a-worker"), `state row ${summary}`);
  check(await page.isHidden("#force-form"), "force-release shown to a non-admin token");
  check(await page.isVisible("#no-admin"), "no word on the missing admin grant");
  check((await page.locator("#force").count()) === 1 && !(await page.isVisible("#force")), "button visible");
  await page.screenshot({ path: `${shots}/no-admin-lock.png`, fullPage: true });
  ok("no-admin");

  // The admin token on the same page: the list, and the button.
  await setToken(page, ops);
  await page.waitForSelector("#force-form:not([hidden])", { timeout: 5_000 });
  await page.click("text=all locks");
  await page.waitForSelector(row(key), { timeout: 5_000 });
  ok("admin");
}

// Many locks: the first full render, as the page measured it.
async function thousand(page) {
  const count = process.env.LOCKS;
  const t0 = Date.now();
  await page.goto(`${base}/ui/`);
  await page.waitForFunction((n) => document.querySelector("#count").textContent === `${n} locks`, count, { timeout: 10_000 });
  const rows = await page.locator("#locks tbody tr").count();
  check(String(rows) === count, `rows ${rows}`);
  const firstListMs = await page.evaluate(() => document.body.dataset.firstListMs);
  await page.screenshot({ path: `${shots}/thousand.png` });
  ok("thousand", `first_list_ms=${firstListMs} wall_ms=${Date.now() - t0}`);
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  // Chromium refuses its sandbox to root (tests run as root in CI).
  args: process.getuid && process.getuid() === 0 ? ["--no-sandbox"] : [],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  const run = { admin, scoped, thousand }[mode];
  check(run, `unknown mode ${mode}`);
  await run(page);
} catch (e) {
  failed = true;
  console.log(`fail ${mode}: ${e.message.split("\n")[0]}`);
  console.error(e);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
