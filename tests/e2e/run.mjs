// Drives a real noVNC (page.html) in Debian's headless Chromium through playwright-core.
//
//   node run.mjs --url ws://127.0.0.1:PORT/TOKEN/VMI --expect connect|disconnect
//                [--screenshot out.png] [--timeout-ms 60000] [--page http://127.0.0.1:N/]
//                [--chromium /usr/bin/chromium] [--expect-status 401|4xx]
//
// --expect connect:    noVNC must report `connect`, then its canvas must show more than one
//                      colour (the remote screen really arrived) before the timeout.
// --expect disconnect: noVNC must report `disconnect` and never `connect` before the timeout.
//                      With --expect-status, the browser must also have seen the server answer
//                      the upgrade with that HTTP status (`4xx` matches any 400-499), so that a
//                      refused TCP connection (no server at all) cannot pass for a refusal.
// Without --page the static server (serve.mjs) is started in this process.
// Exit 0 on the expected outcome, 1 otherwise (with the reason on stderr), 2 on bad usage.

import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { chromium } from 'playwright-core';
import { startServer } from './serve.mjs';

const USAGE = 'usage: node run.mjs --url ws://... --expect connect|disconnect '
    + '[--screenshot PATH] [--timeout-ms N] [--page URL] [--chromium PATH] [--expect-status 401|4xx]';

function parseArgs(argv) {
    const opts = {
        url: null,
        expect: null,
        screenshot: null,
        timeoutMs: 60_000,
        page: null,
        chromium: '/usr/bin/chromium',
        expectStatus: null,
    };
    const keys = {
        '--url': 'url', '--expect': 'expect', '--screenshot': 'screenshot',
        '--timeout-ms': 'timeoutMs', '--page': 'page', '--chromium': 'chromium',
        '--expect-status': 'expectStatus',
    };
    for (let i = 0; i < argv.length; i += 2) {
        const key = keys[argv[i]];
        if (!key || i + 1 >= argv.length) usage(`unexpected argument '${argv[i]}'`);
        opts[key] = argv[i + 1];
    }
    opts.timeoutMs = Number(opts.timeoutMs);
    if (!opts.url) usage('--url is required');
    if (!/^wss?:\/\//.test(opts.url)) usage('--url must be ws:// or wss://');
    if (opts.expect !== 'connect' && opts.expect !== 'disconnect') usage('--expect connect|disconnect');
    if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0) usage('--timeout-ms must be > 0');
    if (opts.expectStatus !== null && !/^[1-5]([0-9]{2}|xx)$/.test(opts.expectStatus)) {
        usage('--expect-status must be like 401 or 4xx');
    }
    if (opts.expectStatus !== null && opts.expect !== 'disconnect') {
        usage('--expect-status goes with --expect disconnect');
    }
    return opts;
}

function usage(msg) {
    console.error(`run.mjs: ${msg}\n${USAGE}`);
    process.exit(2);
}

// Tokens travel in the path: keep them out of what we print.
function redact(s) {
    return String(s).replace(/eyJ[\w-]*\.[\w-]*\.[\w-]*/g, '<token>');
}

const log = (msg) => console.error(`run.mjs: ${redact(msg)}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
    const opts = parseArgs(process.argv.slice(2));
    const started = Date.now();
    const deadline = started + opts.timeoutMs;
    const left = () => Math.max(0, deadline - Date.now());

    let server = null;
    let pageBase = opts.page;
    if (!pageBase) {
        const s = await startServer();
        server = s.server;
        pageBase = s.url;
    }

    if (opts.screenshot) mkdirSync(dirname(resolve(opts.screenshot)), { recursive: true });
    const profile = mkdtempSync(join(tmpdir(), 'kvp-e2e-chromium-'));
    let context = null;
    let page = null;
    const consoleLines = [];
    // What Chromium said about failed WebSocket handshakes, e.g. "Error during WebSocket
    // handshake: Unexpected response code: 401" or "net::ERR_CONNECTION_REFUSED".
    const wsErrors = [];
    let failure = null;
    try {
        context = await chromium.launchPersistentContext(profile, {
            executablePath: opts.chromium,
            headless: true,
            // The flags this machine needs: no sandbox as root, and no background traffic (the
            // closed network refuses it).
            args: [
                '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
            ],
            viewport: { width: 820, height: 520 },
            timeout: Math.min(30_000, left()),
        });
        page = context.pages()[0] ?? await context.newPage();
        page.on('console', (m) => {
            consoleLines.push(`console.${m.type()}: ${m.text()}`);
            if (/WebSocket connection to .* failed/.test(m.text())) wsErrors.push(m.text());
        });
        page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
        page.on('websocket', (ws) => {
            consoleLines.push(`websocket to ${ws.url()}`);
            ws.on('close', () => consoleLines.push('websocket closed'));
            ws.on('socketerror', (e) => {
                consoleLines.push(`websocket error: ${e}`);
                wsErrors.push(String(e));
            });
        });

        const pageUrl = new URL('page.html', pageBase);
        pageUrl.searchParams.set('url', opts.url);
        await page.goto(pageUrl.href, { waitUntil: 'load', timeout: Math.max(1, left()) });
        // The module must have loaded and set window.e2e (a wrong MIME type or a missing
        // noVNC file shows up here).
        await page.waitForFunction(() => window.e2e !== undefined, null, { timeout: Math.max(1, left()) })
            .catch(() => { throw new Error('page.js did not load (window.e2e missing): is noVNC served?'); });

        const state = () => page.evaluate(() => ({
            connected: window.e2e.connected,
            disconnected: window.e2e.disconnected,
            clean: window.e2e.clean,
            securityFailure: window.e2e.securityFailure,
            error: window.e2e.error,
            events: window.e2e.events,
        }));

        let s = await state();
        if (s.error) throw new Error(`page error: ${s.error}`);

        if (opts.expect === 'connect') {
            // 1. the RFB handshake through the proxy completes.
            while (!s.connected && !s.disconnected && left() > 0) {
                await sleep(100);
                s = await state();
            }
            if (!s.connected) {
                throw new Error(s.disconnected
                    ? `noVNC disconnected without connecting (clean: ${s.clean}`
                        + `${s.securityFailure ? `, securityfailure: ${JSON.stringify(s.securityFailure)}` : ''})`
                    : `noVNC did not connect within ${opts.timeoutMs} ms`);
            }
            log(`connect after ${Date.now() - started} ms`);
            // 2. the remote screen is drawn: more than one colour on the canvas.
            let c = { width: 0, height: 0, colours: 0, lit: 0 };
            while (left() > 0) {
                c = await page.evaluate(() => window.e2eCanvasColours(16));
                s = await state();
                if (c.colours > 1 || s.disconnected) break;
                await sleep(250);
            }
            if (s.disconnected) {
                throw new Error(`noVNC disconnected (clean: ${s.clean}) before the screen was drawn`);
            }
            if (c.colours <= 1) {
                throw new Error(`canvas ${c.width}x${c.height} still shows ${c.colours} colour(s) `
                    + `after ${opts.timeoutMs} ms: the remote screen never arrived`);
            }
            log(`canvas ${c.width}x${c.height} shows ${c.colours >= 16 ? '16+' : c.colours} colours `
                + `(${c.lit} pixels off the background) after ${Date.now() - started} ms`);
            if (opts.screenshot) {
                // Let the screen finish painting before the picture: wait (bounded) until the
                // number of text pixels stays the same for a moment.
                let prev = -1;
                for (let i = 0; i < 20 && left() > 2_000; i++) {
                    const now = (await page.evaluate(() => window.e2eCanvasColours(16))).lit;
                    if (now === prev) break;
                    prev = now;
                    await sleep(400);
                }
            }
        } else {
            while (!s.connected && !s.disconnected && left() > 0) {
                await sleep(100);
                s = await state();
            }
            if (s.connected) throw new Error('noVNC reported connect, but a refusal was expected');
            if (!s.disconnected) {
                throw new Error(`noVNC reported neither connect nor disconnect within ${opts.timeoutMs} ms`);
            }
            // Connect must not follow late either: watch a little longer (bounded).
            await sleep(Math.min(500, left()));
            s = await state();
            if (s.connected) throw new Error('noVNC reported connect after disconnect');
            // Chromium words a 401 answer differently from the others.
            const codes = wsErrors.flatMap((e) => [
                ...[...e.matchAll(/response code: (\d{3})/g)].map((m) => m[1]),
                ...(/HTTP Authentication failed/.test(e) ? ['401'] : []),
            ]);
            const status = codes[0] ?? null;
            if (opts.expectStatus !== null) {
                const want = opts.expectStatus;
                const ok = status !== null && (want.endsWith('xx') ? status[0] === want[0] : status === want);
                if (!ok) {
                    throw new Error(`expected the upgrade to be answered with HTTP ${want}, but the browser saw `
                        + (status ? `HTTP ${status}` : `no HTTP answer (${wsErrors.join('; ') || 'no error reported'})`));
                }
            }
            log(`disconnect (clean: ${s.clean}${status ? `, HTTP ${status}` : ''}) after `
                + `${Date.now() - started} ms, as expected`);
        }

        if (opts.screenshot) {
            await page.screenshot({ path: opts.screenshot, timeout: Math.max(5_000, left()) });
            log(`screenshot: ${opts.screenshot}`);
        }
        log(`events: ${s.events.join(' | ')}`);
    } catch (err) {
        failure = err;
        // A picture of the failure helps more than the message alone.
        if (page && opts.screenshot) {
            await page.screenshot({ path: opts.screenshot, timeout: 5_000 })
                .then(() => log(`screenshot of the failure: ${opts.screenshot}`))
                .catch(() => {});
        }
    } finally {
        if (context) await context.close().catch(() => {});
        rmSync(profile, { recursive: true, force: true });
        if (server) server.close();
    }
    if (failure) {
        log(`FAILED (expect ${opts.expect}): ${failure.message ?? failure}`);
        for (const line of consoleLines) log(`  ${line}`);
        process.exit(1);
    }
    process.exit(0);
}

// A hard stop in case something hangs outside the polling loops (browser launch, close).
const hard = setTimeout(() => {
    console.error('run.mjs: FAILED: hard timeout');
    process.exit(1);
}, (() => {
    const i = process.argv.indexOf('--timeout-ms');
    const t = i >= 0 ? Number(process.argv[i + 1]) : 60_000;
    return (Number.isFinite(t) && t > 0 ? t : 60_000) + 30_000;
})());
hard.unref();

main().catch((err) => {
    log(`FAILED: ${err && err.stack || err}`);
    process.exit(1);
});
