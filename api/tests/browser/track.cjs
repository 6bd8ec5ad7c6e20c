// Browser side of the tracker's end-to-end test: opens the test site's page a.html in
// headless Chromium (Debian's, driven by playwright-core), follows its link to b.html,
// then navigates inside b.html as a single-page app would. Each step waits until the
// page has sent its hit. Usage: node track.cjs <site base URL>
const { chromium } = require("playwright-core");

(async () => {
  const base = process.argv[2];
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox"],
  });
  try {
    const page = await browser.newPage();
    const hit = () =>
      page.waitForRequest((r) => r.url().endsWith("/api/v1/track") && r.method() === "POST", {
        timeout: 15000,
      });
    let sent = hit();
    await page.goto(`${base}/a.html`);
    await sent;
    sent = hit();
    await page.click("a#next");
    await sent;
    sent = hit();
    await page.evaluate(() => {
      window.termoparContext = ["spa"];
      history.pushState({}, "", "/b.html#reviews");
    });
    await sent;
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
