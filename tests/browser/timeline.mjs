// Opens the gateway's timeline page in headless Chromium (Debian's, at
// CHROMIUM or /usr/bin/chromium) and follows it until the order is
// CONFIRMED: prints each status the page shows as `status <STATUS>` and
// each event row count as `rows <N>`, then takes a screenshot.
//
//   node timeline.mjs <page-url> <screenshot.png>

import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node timeline.mjs <page-url> <screenshot.png>");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
  page.on("pageerror", (error) => console.log(`pageerror ${error.message}`));
  await page.goto(url);
  let status = "";
  let rows = -1;
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    const shown = (await page.textContent("#status")).trim();
    if (shown !== status) {
      status = shown;
      console.log(`status ${status}`);
    }
    const count = await page.locator("#steps tr").count();
    if (count !== rows) {
      rows = count;
      console.log(`rows ${rows}`);
    }
    const state = (await page.textContent("#state")).trim();
    if (status === "CONFIRMED" && state === "saga finished") break;
    await page.waitForTimeout(100);
  }
  await page.screenshot({ path: screenshot });
  console.log(`done ${status}`);
} finally {
  await browser.close();
}
