// The console in Debian's Chromium, driven by Playwright (playwright-core; it never downloads
// a browser). Run by gatekeep-server/tests/console_browser.rs, which owns the service, the
// simulated agent and the OpenID provider, and answers this script's requests on stdin:
// this script prints `STEP <name>` and waits for `GO [data]`.
//
// Environment: BASE (https://127.0.0.1:PORT), SPKI (the service certificate's SPKI hash, so
// Chromium trusts exactly it), CHROMIUM, SHOTS (screenshot directory), FIRST, SECOND
// (pending request ids). Prints `FIGURE name value unit` lines and `PASS` at the end; any
// failed check throws (exit status 1) with a message.
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

const { BASE, SPKI, SHOTS, FIRST, SECOND } = process.env;
const TIMEOUT = 20000;
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function step(name) {
  console.log(`STEP ${name}`);
  const { value, done } = await lines.next();
  if (done || !value.startsWith('GO')) throw new Error(`no GO for step ${name}: ${value}`);
  return value.slice(2).trim();
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

const row = (id) => `#queue-rows tr[data-id="${id}"]`;

async function signIn(context, user) {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(`${BASE}/console/`);
  await page.locator('#oidc-sign-in').click();
  // The provider's sign-in page.
  await page.locator('#user').selectOption(user);
  await page.locator('#idp-sign-in').click();
  await page.waitForURL(`${BASE}/console/**`);
  await page.locator('#who').filter({ hasText: `${user}@example.com` }).waitFor();
  return page;
}

// Every form control has a label, every button and link a name, the tab order follows the
// page (no positive tabindex), and the page's text colours are AA contrast or better.
async function checkAccessible(page, where) {
  const problems = await page.evaluate(() => {
    const out = [];
    for (const control of document.querySelectorAll('main input, main select, main textarea')) {
      if (!control.labels || control.labels.length === 0) out.push(`unlabelled ${control.id || control.name}`);
    }
    for (const button of document.querySelectorAll('button, a[href]')) {
      const name = (button.getAttribute('aria-label') || button.textContent || '').trim();
      if (!name && button.offsetParent !== null) out.push(`unnamed ${button.outerHTML.slice(0, 60)}`);
    }
    for (const node of document.querySelectorAll('[tabindex]')) {
      if (Number(node.getAttribute('tabindex')) > 0) out.push(`positive tabindex on ${node.id}`);
    }
    const channel = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    const luminance = (rgb) => {
      const [r, g, b] = rgb.match(/\d+(\.\d+)?/g).map(Number);
      return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
    };
    const background = (node) => {
      for (let at = node; at; at = at.parentElement) {
        const colour = getComputedStyle(at).backgroundColor;
        if (colour && !/rgba\(0, 0, 0, 0\)|transparent/.test(colour)) return colour;
      }
      return 'rgb(255, 255, 255)';
    };
    for (const node of document.querySelectorAll('main *, header *')) {
      if (!node.childNodes.length || ![...node.childNodes].some((c) => c.nodeType === 3 && c.textContent.trim())) continue;
      if (node.offsetParent === null) continue;
      const fg = luminance(getComputedStyle(node).color);
      const bg = luminance(background(node));
      const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
      if (ratio < 4.5) out.push(`contrast ${ratio.toFixed(1)} on ${node.tagName} "${node.textContent.slice(0, 20)}"`);
    }
    return out;
  });
  check(problems.length === 0, `accessibility of the ${where} page: ${problems.join('; ')}`);
}

mkdirSync(SHOTS, { recursive: true });
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    `--ignore-certificate-errors-spki-list=${SPKI}`,
  ],
});
const violations = [];
const pages = [];
try {
  const alice = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await signIn(alice, 'alice');
  pages.push(['alice', page]);
  page.on('console', (message) => {
    if (/Content Security Policy|Refused to/.test(message.text())) violations.push(message.text());
  });

  // The queue: both pending requests, live.
  await page.locator(row(FIRST)).waitFor();
  await page.locator(row(SECOND)).waitFor();
  const firstRow = await page.locator(row(FIRST)).innerText();
  check(!firstRow.includes('\u001b'), 'no raw ESC reaches the page');
  check(firstRow.includes("$'\\x1b[2Jhello'"), `the ESC is shown escaped in the queue: ${firstRow}`);
  await page.screenshot({ path: `${SHOTS}/queue.png`, fullPage: true });
  await checkAccessible(page, 'queue');

  // A new request appears without a reload.
  await page.evaluate(() => { window.gkNoReload = true; });
  const started = Date.now();
  const live = await step('submit-live');
  await page.locator(row(live)).waitFor();
  console.log(`FIGURE live_request_visible ${Date.now() - started} ms (from the test's submit to the row, including the agent's round trip)`);
  check(await page.evaluate(() => window.gkNoReload === true), 'the page was not reloaded');

  // Filters: kind=connect hides the exec requests.
  await page.locator('#filter-kind').selectOption('connect');
  await page.locator(row(SECOND)).waitFor();
  await page.locator(row(FIRST)).waitFor({ state: 'detached' });
  await page.locator('#filter-kind').selectOption('');
  await page.locator(row(FIRST)).waitFor();

  // Keyboard: j/k select, o opens, Escape comes back.
  await page.locator('h1').first().click();
  await page.keyboard.press('j');
  await page.keyboard.press('k');
  const selected = await page.locator('#queue-rows tr.selected').getAttribute('data-id');
  await page.keyboard.press('o');
  await page.waitForURL(`**/console/#/request/${selected}`);
  await page.locator('h1').first().click();
  await page.keyboard.press('Escape');
  await page.waitForURL('**/console/#/queue');
  await page.locator(`${row(FIRST)} a`).click();

  // The detail: argv quoted unambiguously, escapes visible, environment, ancestry tree.
  await page.locator('#argv-line').waitFor();
  const argvLine = await page.locator('#argv-line').innerText();
  check(argvLine.includes("$'\\x1b[2Jhello'"), `argv shell-quoted: ${argvLine}`);
  check(argvLine.includes("'two words'"), `argv word with a space quoted: ${argvLine}`);
  const detail = await page.locator('main').innerText();
  check(!detail.includes('\u001b') && !detail.includes('\u202e'), 'no raw control or bidi characters');
  check(detail.includes('\\u202e'), 'the bidi override is shown escaped');
  check(detail.includes('LD_PRELOAD=/tmp/x.so'), 'the bound environment is shown');
  check(await page.locator('ul.tree li').count() >= 2, 'ancestry as a tree');
  check(await page.locator('img, script:not([src])').count() === 0, 'no injected element');
  // Its policy requires a reason: the field says so and why, and an approval without one
  // is held back (the service would refuse it too).
  const reasonLabel = await page.locator('label[for="reason"]').innerText();
  check(reasonLabel.includes('required to approve'), `the reason is marked required: ${reasonLabel}`);
  check(await page.locator('#reason').getAttribute('aria-required') === 'true', 'the reason is aria-required');
  const reasonWhy = await page.locator('#reason-why').innerText();
  check(reasonWhy.includes('ai-agents') && reasonWhy.includes('require_reason'), `and says why: ${reasonWhy}`);
  await page.screenshot({ path: `${SHOTS}/detail.png`, fullPage: true });
  await checkAccessible(page, 'detail');
  await page.locator('#approve').click();
  await page.locator('#notice p.error').filter({ hasText: 'requires a reason' }).waitFor();
  check(page.url().endsWith(`#/request/${FIRST}`), 'an approval without a reason stays on the request');
  check(await page.evaluate(() => document.activeElement.id) === 'reason', 'the reason field has the focus');

  // A forged CSRF token is refused (the page's own session cookie goes with it).
  const forged = await page.evaluate(async (id) => {
    const response = await fetch(`/api/v1/requests/${id}/decision`, {
      method: 'POST', headers: { 'content-type': 'application/json', 'x-csrf-token': 'gk_forged' },
      body: JSON.stringify({ verdict: 'allow' }),
    });
    return response.status;
  }, FIRST);
  check(forged === 403, `forged csrf refused: ${forged}`);

  // Approve the first: it leaves the queue.
  await page.locator('#reason').fill('ticket 42');
  await page.locator('#approve').click();
  await page.waitForURL(`${BASE}/console/#/queue`);
  await page.locator(row(FIRST)).waitFor({ state: 'detached' });
  await page.locator(row(SECOND)).waitFor();

  // Deny the second.
  await page.locator(`${row(SECOND)} a`).click();
  await page.locator('#reason').fill('not this host');
  await page.locator('#deny').click();
  await page.waitForURL(`${BASE}/console/#/queue`);
  await page.locator(row(SECOND)).waitFor({ state: 'detached' });

  // carol (group security) sees the live request but cannot approve it.
  const carolContext = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const carol = await signIn(carolContext, 'carol');
  pages.push(['carol', carol]);
  await carol.locator(row(live)).waitFor();
  await carol.locator(`${row(live)} a`).click();
  await carol.locator('#why-not').waitFor();
  check(await carol.locator('#approve').isDisabled(), 'approve is disabled for carol');
  check(await carol.locator('#deny').isDisabled(), 'deny is disabled for carol');
  const whyNot = await carol.locator('#why-not').innerText();
  check(whyNot.includes('not in a reviewer group'), `carol is told why: ${whyNot}`);
  await carol.screenshot({ path: `${SHOTS}/detail-not-in-group.png`, fullPage: true });
  await carolContext.close();

  // Grants and audit pages work.
  await page.goto(`${BASE}/console/#/audit`);
  await page.locator('#verify').click();
  await page.locator('#verify-result').filter({ hasText: 'Intact' }).waitFor();

  // 1,000 pending requests: measured, never asserted on time.
  const total = Number(await step('submit-1000'));
  const navigation = Date.now();
  await page.goto(`${BASE}/console/#/queue`);
  await page.waitForFunction((n) => Number(document.body.dataset.queueRows) >= n, total, { timeout: 120000 });
  console.log(`FIGURE queue_1000_first_view ${Date.now() - navigation} ms (navigation, sign-in check, SSE snapshot of ${total} requests, render)`);
  const renders = await page.evaluate(() => {
    const times = [];
    for (let i = 0; i < 5; i += 1) {
      const start = performance.now();
      renderQueueRows();
      document.body.getBoundingClientRect(); // force layout
      times.push(performance.now() - start);
    }
    return times;
  });
  renders.sort((a, b) => a - b);
  console.log(`FIGURE queue_render_rows ${renders[2].toFixed(1)} ms (median of 5 re-renders of ${total} rows, DOM build and layout)`);
  await page.screenshot({ path: `${SHOTS}/queue-1000.png` });
  check(violations.length === 0, `no CSP violation: ${violations.join('; ')}`);
  await alice.close();
  console.log('PASS');
} catch (error) {
  // Enough to tell what the page showed when a check failed.
  for (const [who, page] of pages) {
    try {
      const seen = await page.evaluate(() => ({
        url: location.href,
        rows: [...document.querySelectorAll('#queue-rows tr')].map((tr) => tr.dataset.id),
        filters: document.getElementById('filter-kind')?.value,
        main: document.getElementById('main')?.innerText.slice(0, 300),
      }));
      console.log(`DEBUG ${who} ${JSON.stringify(seen)}`);
      await page.screenshot({ path: `${SHOTS}/failure-${who}.png`, fullPage: true });
    } catch (_) { /* the page is gone */ }
  }
  console.log(`DEBUG ids first=${FIRST} second=${SECOND}`);
  throw error;
} finally {
  await browser.close();
}
process.exit(0);
