// Opens the gateway's timeline page in headless Chromium (Debian's, at
// CHROMIUM or /usr/bin/chromium) and follows it until the order is
// CONFIRMED and the saga finished (90 s at most): prints each status the
// page shows as `status <STATUS>` and each event row count as `rows <N>`,
// then takes a screenshot and prints `done CONFIRMED`.
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
  // Every change of the status badge and of the number of rows is
  // reported as the page makes it (a MutationObserver, no polling).
  await page.exposeFunction("report", (line) => console.log(line));
  await page.addInitScript(() => {
    let status = null;
    let rows = null;
    const check = () => {
      const badge = document.querySelector("#status");
      if (!badge) return;
      const shown = badge.textContent.trim();
      if (shown !== status) {
        status = shown;
        window.report(`status ${shown}`);
      }
      const count = document.querySelectorAll("#steps tr").length;
      if (count !== rows) {
        rows = count;
        window.report(`rows ${count}`);
      }
    };
    new MutationObserver(check).observe(document, {
      subtree: true,
      childList: true,
      characterData: true,
    });
  });
  await page.goto(url);
  await page.waitForFunction(
    () =>
      document.querySelector("#status").textContent.trim() === "CONFIRMED" &&
      document.querySelector("#state").textContent.trim() === "saga finished",
    null,
    { timeout: 90_000 },
  );
  await page.screenshot({ path: screenshot });
  console.log("done CONFIRMED");
} finally {
  await browser.close();
}
