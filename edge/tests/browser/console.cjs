// Browser side of the console's end-to-end test, in headless Chromium (Debian's, driven by
// playwright-core) against a running edge node (API + embedded broker + consumer).
//
// As the admin: log in, create two clients (one field error first), a sensor of each, a
// site and a viewer, through the console's forms. Publish readings with the ready
// mosquitto_pub line the console shows with the new sensor's secret. As the viewer (logged
// in with the keyboard only): watch the latest value change live, open the sensor page and
// check that both charts draw the expected number of points, and check that admin pages,
// the other client's sensor and the API's admin operations stay closed, by URL too.
// Screenshots of each page go to $SHOTS.
//
// Environment: BASE (the API's URL), ADMIN_EMAIL, ADMIN_PASSWORD, SHOTS, CHROMIUM.
const { chromium } = require("playwright-core");
const { execFileSync } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");

const base = process.env.BASE;
const shots = process.env.SHOTS;
const TZ = "America/Sao_Paulo";
const WAIT = { timeout: 20000 };

function check(condition, what) {
  if (!condition) throw new Error("check failed: " + what);
  console.log("ok -", what);
}

/** Runs a mosquitto_pub line as shown by the console, with another message. */
function publish(line, payload) {
  check(/ -m '[^']*'$/.test(line), "the mosquitto_pub line ends with its message");
  execFileSync("bash", ["-c", line.replace(/ -m '[^']*'$/, ` -m '${JSON.stringify(payload)}'`)], { stdio: "pipe" });
}

const localDay = (ms) => new Intl.DateTimeFormat("en-CA", { timeZone: TZ }).format(new Date(ms));

(async () => {
  fs.mkdirSync(shots, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox"],
  });
  const shot = (page, name) => page.screenshot({ path: path.join(shots, name + ".png"), fullPage: true });
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    const page = await context.newPage();
    page.on("dialog", (d) => d.accept());
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("response", (r) => { if (r.status() >= 500) errors.push(`${r.status()} ${r.url()}`); });

    // Anyone opening a page is sent to the login page, and back after logging in.
    await page.goto(base + "/ui/admin/clients");
    check(page.url().startsWith(base + "/ui/login?next="), "a page without a session goes to the login page");
    await page.fill("#email", process.env.ADMIN_EMAIL);
    await page.fill("#password", "wrong-password");
    await page.click("button[type=submit]");
    await page.waitForSelector("#login-error", WAIT);
    check((await page.textContent("#login-error")).includes("Wrong e-mail or password"), "a wrong password is refused with a message");
    await shot(page, "01-login");
    await page.fill("#password", process.env.ADMIN_PASSWORD);
    await page.click("button[type=submit]");
    await page.waitForURL(base + "/ui/admin/clients", WAIT);
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === "termopar_session");
    check(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");

    // Clients: the API's validation message shows next to its field.
    async function create(fields) {
      await page.click("#new");
      await page.waitForSelector("#editor[open]", WAIT);
      for (const [name, value] of Object.entries(fields)) {
        const tag = await page.$eval(`[name=${name}]`, (e) => e.tagName);
        if (tag === "SELECT") await page.selectOption(`#editor [name=${name}]`, { label: value });
        else await page.fill(`#editor [name=${name}]`, value);
      }
      await page.click("#save");
    }
    await create({ name: "Cold Chain A", timezone: "Mars/Olympus_Mons" });
    await page.waitForSelector("#e-timezone:not(:empty)", WAIT);
    const tzError = await page.textContent("#e-timezone");
    check(/time ?zone/i.test(tzError), `the time zone error shows next to its field (${tzError})`);
    await shot(page, "02-client-field-error");
    await page.fill("#editor [name=timezone]", TZ);
    await page.click("#save");
    await page.waitForSelector("#editor", { state: "hidden", ...WAIT });
    await page.waitForSelector("text=Cold Chain A", WAIT);
    await create({ name: "Other Co", timezone: "UTC" });
    await page.waitForSelector("#rows >> text=Other Co", WAIT);
    await page.fill("#q", "other");
    await page.click("#search button[type=submit]");
    await page.waitForFunction(() => document.querySelectorAll("#rows tr").length === 1, null, WAIT);
    check((await page.textContent("#rows")).includes("Other Co"), "searching clients finds by part of the name");
    await shot(page, "03-clients");

    // Pages of 20: twenty more clients (through the API) make a second page.
    const token = (await (await fetch(base + "/api/v1/auth/login", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ email: process.env.ADMIN_EMAIL, password: process.env.ADMIN_PASSWORD }),
    })).json()).access_token;
    for (let k = 0; k < 20; k++) {
      const r = await fetch(base + "/api/v1/clients", {
        method: "POST", headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
        body: JSON.stringify({ name: `Filler ${k}`, timezone: "UTC" }),
      });
      if (r.status !== 201) throw new Error(`creating filler client ${k}: ${r.status}`);
    }
    await page.fill("#q", "");
    await page.click("#search button[type=submit]");
    await page.waitForFunction(() => document.getElementById("page-info").textContent.startsWith("Page 1 of 2 · 22"), null, WAIT);
    await page.click("#next");
    await page.waitForFunction(() => document.getElementById("page-info").textContent.startsWith("Page 2 of 2") && document.querySelectorAll("#rows tr").length === 2, null, WAIT);
    check((await page.textContent("#rows")).includes("Cold Chain A"), "the second page holds the oldest clients");

    // Edit and delete: a client renamed, then deleted.
    await page.click("#prev");
    await page.waitForFunction(() => document.getElementById("page-info").textContent.startsWith("Page 1 of 2"), null, WAIT);
    await page.click("button[aria-label='Edit Filler 19']");
    await page.waitForSelector("#editor[open]", WAIT);
    await page.fill("#editor [name=name]", "Filler renamed");
    await page.click("#save");
    await page.waitForSelector("#rows >> text=Filler renamed", WAIT);
    await page.click("button[aria-label='Delete Filler renamed']");
    await page.waitForFunction(() => document.getElementById("page-info").textContent.includes("21 in all") && !document.getElementById("rows").textContent.includes("Filler renamed"), null, WAIT);
    check(true, "a client is renamed and deleted from its row");

    // Sensors: the secret is shown once, with a ready mosquitto_pub line.
    await page.click("nav >> text=Manage sensors");
    await page.waitForURL(base + "/ui/admin/sensors", WAIT);
    async function newSensor(name, client) {
      await create({ name, location: "Room 1", client_id: client });
      await page.waitForSelector("#secret[open]", WAIT);
      const line = await page.inputValue("#secret-line");
      const secret = await page.inputValue("#secret-value");
      check(line.includes(`-P '${secret}'`) && line.startsWith("mosquitto_pub "), `the ${name} secret comes with its mosquitto_pub line`);
      return { line, secret, id: /-i ([0-9a-f-]{36})/.exec(line)[1] };
    }
    const other = await newSensor("Other sensor", "Other Co");
    await page.click("#secret-close");
    const quiet = await newSensor("Quiet room", "Cold Chain A");
    await page.click("#secret-close");
    const freezer = await newSensor("Freezer 1", "Cold Chain A");
    await shot(page, "04-sensor-secret");
    await page.click("#secret-close");
    await page.waitForSelector("#rows >> text=Freezer 1", WAIT);
    check(!(await page.textContent("main")).includes(freezer.secret), "the secret is not shown again");

    // A new secret from the row: shown once with its line; the old one stops connecting.
    await page.click("button[aria-label='New device secret for Freezer 1']");
    await page.waitForSelector("#secret[open]", WAIT);
    const rotated = await page.inputValue("#secret-line");
    check(rotated !== freezer.line && rotated.includes(`-u ${freezer.id} `), "a new secret comes with its own mosquitto_pub line");
    await page.click("#secret-close");
    const oldRefusedBy = Date.now() + 15000;
    for (;;) {
      // A payload that would only be dead-lettered, should the old secret still connect.
      try { publish(freezer.line, { temperature: "old secret" }); } catch { break; }
      if (Date.now() > oldRefusedBy) throw new Error("the old secret still connects");
      await new Promise((r) => setTimeout(r, 250));
    }
    check(true, "the old secret no longer connects");
    freezer.line = rotated;

    // A site of the client, and a viewer.
    await page.goto(base + "/ui/sites");
    await create({ name: "Shop", origins: "https://shop.example", client_id: "Cold Chain A" });
    await page.waitForSelector("#rows >> text=Shop", WAIT);
    await page.goto(base + "/ui/admin/users");
    await create({ email: "viewer@cold.example", password: "viewer-password-1", role: "viewer", client_id: "Cold Chain A" });
    await page.waitForSelector("#rows >> text=viewer@cold.example", WAIT);
    await shot(page, "05-users");
    for (const [href, name] of [["/ui/jobs", "08-jobs"], ["/ui/conversations", "09-conversations"]]) {
      await page.goto(base + href);
      await page.waitForSelector("#app:not([hidden])", WAIT);
      await shot(page, name);
    }

    // Readings over MQTT, with the console's own line: one as shown (measured now), then
    // eleven in the last hour and two days ago and five days ago.
    const now = Date.now();
    const stamps = [now];
    publish(freezer.line, { temperature: 21.5 });
    const older = [];
    for (let k = 1; k <= 11; k++) older.push({ ts: new Date(now - k * 240000).toISOString(), temperature: 20 + k / 10 });
    for (const days of [2, 5]) older.push({ ts: new Date(now - days * 86400000).toISOString(), temperature: 15 + days });
    publish(freezer.line, older);
    // A sensor whose last reading is an hour old: stale (the console's limit is 10 minutes).
    publish(quiet.line, { ts: new Date(now - 3600000).toISOString(), temperature: 3.5 });
    stamps.push(...older.map((r) => Date.parse(r.ts)));

    // Alarms: a rule on the other client's sensor; a reading above it opens an alarm
    // that appears live, the admin acknowledges it, and the next reading clears it live.
    await page.goto(base + "/ui/alarms");
    await page.waitForFunction(() => document.getElementById("page-info").textContent.includes("0 in all"), null, WAIT);
    const ruleStatus = await page.evaluate(async (sensor) => {
      const csrf = document.querySelector('meta[name="csrf-token"]').content;
      const r = await fetch("/api/v1/alarm-rules", { method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf }, body: JSON.stringify({ sensor_id: sensor, name: "Too warm", kind: "above", threshold: 30, hysteresis: 1, severity: "critical" }) });
      return r.status;
    }, other.id);
    check(ruleStatus === 201, "an alarm rule is created with the admin's session");
    const alarmLoads = [];
    page.on("load", () => alarmLoads.push(page.url()));
    publish(other.line, { temperature: 35.2 });
    await page.waitForSelector("#rows tr.alarm.active >> text=Too warm", WAIT);
    check(alarmLoads.length === 0, "the alarm appeared live, without reloading the page");
    await page.waitForFunction(() => document.getElementById("live").textContent.includes("opened"), null, WAIT);
    check((await page.textContent("#rows tr.alarm .peak")) === "35.2", "its peak is the reading");
    await page.click("button[aria-label='Acknowledge Too warm on Other sensor']");
    await page.waitForSelector("#ack[open]", WAIT);
    await page.fill("#ack-comment", "door closed again");
    await page.click("#ack-save");
    await page.waitForSelector("#rows td.acked >> text=door closed again", WAIT);
    check((await page.$$("#rows button")).length === 0, "an acknowledged alarm has no Acknowledge button");
    publish(other.line, { temperature: 20.0 });
    await page.waitForSelector("#rows tr.alarm.cleared >> text=Too warm", WAIT);
    check(alarmLoads.length === 0, "it cleared live too");
    await shot(page, "12-alarms");

    // The viewer logs in with the keyboard only.
    await page.goto(base + "/ui/sensors");
    await page.click("text=Log out");
    await page.waitForURL(/\/ui\/login/, WAIT);
    await page.goto(base + "/ui/login");
    // Keyboard only: the page puts the focus on the e-mail field by itself.
    await page.waitForFunction(() => document.activeElement?.id === "email", null, WAIT);
    await page.keyboard.type("viewer@cold.example");
    await page.keyboard.press("Tab");
    await page.keyboard.type("viewer-password-1");
    await page.keyboard.press("Enter");
    await page.waitForURL(base + "/ui/sensors", WAIT);
    const nav = await page.textContent("nav");
    check(!nav.includes("Users") && !nav.includes("Clients") && !nav.includes("Manage"), "the viewer's navigation has no admin pages");

    // The latest reading, then a new one arriving while the page stays open.
    const cell = `tr[data-sensor="${freezer.id}"] .temperature`;
    await page.waitForFunction((sel) => document.querySelector(sel)?.textContent === "21.5", cell, WAIT);
    check((await page.$$("#rows tr")).length === 2, "the viewer sees its client's two sensors, not the other client's");
    const quietStatus = `tr[data-sensor="${quiet.id}"] .status`;
    await page.waitForFunction((sel) => document.querySelector(sel)?.textContent === "stale", quietStatus, WAIT);
    check((await page.textContent(`tr[data-sensor="${quiet.id}"] .temperature`)) === "3.5", "a sensor silent for an hour shows its last value, marked stale");
    const loads = [];
    page.on("load", () => loads.push(page.url()));
    publish(freezer.line, { temperature: 27.8 });
    stamps.push(Date.now());
    await page.waitForFunction((sel) => document.querySelector(sel)?.textContent === "27.8", cell, WAIT);
    check(loads.length === 0, "the latest value changed live, without reloading the page");
    check((await page.textContent(`tr[data-sensor="${freezer.id}"] .status`)) === "live", "a sensor with a fresh reading is marked live");
    await shot(page, "06-live-sensors");
    await page.setViewportSize({ width: 390, height: 760 });
    await shot(page, "06b-live-sensors-phone");
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 0, `the sensors page fits a phone's width (overflow ${overflow}px)`);
    await page.setViewportSize({ width: 1280, height: 860 });

    // The sensor page: the history chart (last 24 hours) and the daily averages chart.
    await page.click(`text=Freezer 1`);
    await page.waitForURL(base + "/ui/sensors/" + freezer.id, WAIT);
    const inDay = stamps.filter((t) => t > Date.now() - 86400000).length;
    const days = new Set(stamps.map(localDay)).size;
    await page.waitForFunction((n) => document.getElementById("history").dataset.points === String(n), inDay, WAIT);
    await page.waitForFunction((n) => document.getElementById("daily").dataset.points === String(n), days, WAIT);
    check((await page.$$("#history canvas")).length === 1 && (await page.$$("#daily canvas")).length === 1, `both charts drawn: ${inDay} readings, ${days} days`);
    await page.click("[data-range='604800']");
    await page.waitForFunction((n) => document.getElementById("history").dataset.points === String(n), stamps.length, WAIT);
    check(true, `7 days of history draws all ${stamps.length} readings`);
    await shot(page, "07-sensor-charts");
    // Zoom: drag across the right half of the plot: fewer readings, fetched again.
    const box = await page.$eval("#history .u-over", (e) => { const r = e.getBoundingClientRect(); return { x: r.x, y: r.y, w: r.width, h: r.height }; });
    await page.mouse.move(box.x + box.w * 0.9, box.y + box.h / 2);
    await page.mouse.down();
    await page.mouse.move(box.x + box.w - 1, box.y + box.h / 2, { steps: 5 });
    await page.mouse.up();
    await page.waitForFunction((n) => Number(document.getElementById("history").dataset.points) === n, inDay, WAIT);
    check(true, "dragging over the last day zooms into it");
    await page.click("#pan-left");
    await page.waitForFunction(() => /readings$/.test(document.getElementById("history-range").textContent), null, WAIT);

    // Sites: a page view of the site, then its accesses per day, one point per day.
    await page.goto(base + "/ui/sites");
    const siteId = (await page.getAttribute("text=Shop", "href")).split("/").pop();
    const hit = await fetch(base + "/api/v1/track", {
      method: "POST",
      headers: { "Content-Type": "text/plain", Origin: "https://shop.example", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36" },
      body: JSON.stringify({ site_id: siteId, url: "https://shop.example/", context: ["home"], user: { id: "u1", device: "d1" } }),
    });
    const accepted = await hit.json();
    check(hit.status === 202 && accepted.accepted === 1, `a page view of the site is accepted (${JSON.stringify(accepted)})`);
    const today = localDay(Date.now());
    // The hit reaches the daily counts through the relay: poll the API, with a deadline.
    const counted = async () => page.evaluate(async ({ siteId, today }) => {
      const body = await (await fetch(`/api/v1/sites/${siteId}/accesses/daily`)).json();
      return body.items.some((i) => i.date === today && i.count === 1);
    }, { siteId, today });
    const deadline = Date.now() + 20000;
    while (!(await counted())) {
      if (Date.now() > deadline) throw new Error("the page view never reached the daily counts");
      await new Promise((r) => setTimeout(r, 250));
    }
    await page.click("text=Shop");
    await page.waitForFunction(() => document.getElementById("accesses").dataset.points === "30", null, WAIT);
    const firstRow = await page.textContent("#accesses-rows tr");
    check(firstRow.includes(today) && firstRow.trim().endsWith("1"), `today's row counts the page view (${firstRow.trim()})`);
    check(!(await page.textContent("#accesses-rows")).includes("undefined"), "every day has a number");
    await shot(page, "10-site");

    // What the viewer may not reach, by URL too, and the API behind the console.
    for (const href of ["/ui/admin/users", "/ui/admin/clients", "/ui/admin/sensors"]) {
      const r = await page.goto(base + href);
      check(r.status() === 403, `${href} is 403 for a viewer`);
    }
    await shot(page, "11-forbidden");
    await page.goto(base + "/ui/alarms");
    await page.waitForFunction(() => document.getElementById("page-info").textContent.includes("0 in all"), null, WAIT);
    check((await page.$$("#rows tr")).length === 0, "the viewer sees none of the other client's alarms");
    const r = await page.goto(base + "/ui/sensors/" + other.id);
    check(r.status() === 404, "another client's sensor page is 404 for a viewer");
    await page.goto(base + "/ui/sensors");
    const api = await page.evaluate(async ({ otherId }) => {
      const csrf = document.querySelector('meta[name="csrf-token"]').content;
      const users = await fetch("/api/v1/users");
      const sensor = await fetch(`/api/v1/sensors/${otherId}/readings/latest`);
      const noToken = await fetch("/api/v1/sites", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name: "x", origins: [] }) });
      const withToken = await fetch("/api/v1/sites", { method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf }, body: JSON.stringify({ name: "x", origins: [] }) });
      return { users: users.status, sensor: sensor.status, noToken: [noToken.status, (await noToken.json()).message], withToken: withToken.status };
    }, { otherId: other.id });
    check(api.users === 403, "the API refuses the viewer's session a list of users");
    check(api.sensor === 404, "the API hides the other client's sensor from the viewer's session");
    check(api.noToken[0] === 403 && api.noToken[1].includes("CSRF"), "a change without the CSRF token is refused");
    check(api.withToken === 403, "with the token, a viewer still cannot create a site");

    // Logging out ends the session on the server, not only in this browser.
    const viewerSession = (await context.cookies()).find((c) => c.name === "termopar_session").value;
    const me = (cookie) => fetch(base + "/api/v1/auth/me", { headers: { Cookie: `termopar_session=${cookie}` } });
    check((await me(viewerSession)).status === 200, "the viewer's session cookie authenticates");
    await page.click("text=Log out");
    await page.waitForURL(/\/ui\/login/, WAIT);
    check((await me(viewerSession)).status === 401, "after logging out, a copy of the cookie no longer authenticates");
    check((await me(session.value)).status === 401, "nor does the admin's, logged out earlier");

    check(errors.length === 0, "no script errors and no 5xx: " + errors.join("; "));
    console.log(JSON.stringify({ freezer: freezer.id, other: other.id, readings: stamps.length }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
