// Drives a real noVNC (page.html) in Debian's headless Chromium through playwright-core.
//
//   node run.mjs --url ws://127.0.0.1:PORT/TOKEN/VMI --expect connect|disconnect|rotate
//                [--screenshot out.png] [--timeout-ms 60000] [--page http://127.0.0.1:N/]
//                [--chromium /usr/bin/chromium] [--expect-status 401|4xx]
//                [--home DIR] [--cert-origin https://127.0.0.1:PORT] [--rotated-flag PATH]
//                [--net-log PATH]
//
// --expect connect:    noVNC must report `connect`, then its canvas must show more than one
//                      colour (the remote screen really arrived) before the timeout.
// --expect disconnect: noVNC must report `disconnect` and never `connect` before the timeout.
//                      With --expect-status, the browser must also have seen the server answer
//                      the upgrade with that HTTP status (`4xx` matches any 400-499), so that a
//                      refused TCP connection (no server at all) cannot pass for a refusal.
// --expect rotate:     the certificate rotation case, for a wss:// URL (needs --cert-origin and
//                      --rotated-flag). Prints `certificate before: <hex DER>` (what Chromium
//                      got from a fresh TLS connection to --cert-origin), connects a first
//                      session as `connect` does, prints `rotate now` and waits for the file
//                      --rotated-flag to exist (the test has published the new certificate
//                      then), prints `certificate after: <hex DER>`, connects a second
//                      session in a second page as `connect` does, and checks that the first
//                      session is still connected and still receiving its screen (WebSocket
//                      messages and a canvas change after the new certificate was served).
// --net-log PATH:      Chromium writes its NetLog there; once it has closed, prints
//                      `websocket certificates: <hex DER>,...`: for every wss:// WebSocket the
//                      page opened, in the order they were opened, the leaf certificate the
//                      server presented on that WebSocket's own TLS connection.
// --home DIR:          HOME for Chromium, whose NSS database ($HOME/.pki/nssdb) is where the
//                      test puts the CA it trusts.
// Without --page the static server (serve.mjs) is started in this process.
// Exit 0 on the expected outcome, 1 otherwise (with the reason on stderr), 2 on bad usage.

import { existsSync, mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { chromium } from 'playwright-core';
import { startServer } from './serve.mjs';

const USAGE = 'usage: node run.mjs --url ws://... --expect connect|disconnect|rotate '
    + '[--screenshot PATH] [--timeout-ms N] [--page URL] [--chromium PATH] [--expect-status 401|4xx] '
    + '[--home DIR] [--cert-origin https://HOST:PORT] [--rotated-flag PATH] [--net-log PATH]';

function parseArgs(argv) {
    const opts = {
        url: null,
        expect: null,
        screenshot: null,
        timeoutMs: 60_000,
        page: null,
        chromium: '/usr/bin/chromium',
        expectStatus: null,
        home: null,
        certOrigin: null,
        rotatedFlag: null,
        netLog: null,
    };
    const keys = {
        '--url': 'url', '--expect': 'expect', '--screenshot': 'screenshot',
        '--timeout-ms': 'timeoutMs', '--page': 'page', '--chromium': 'chromium',
        '--expect-status': 'expectStatus', '--home': 'home', '--cert-origin': 'certOrigin',
        '--rotated-flag': 'rotatedFlag', '--net-log': 'netLog',
    };
    for (let i = 0; i < argv.length; i += 2) {
        const key = keys[argv[i]];
        if (!key || i + 1 >= argv.length) usage(`unexpected argument '${argv[i]}'`);
        opts[key] = argv[i + 1];
    }
    opts.timeoutMs = Number(opts.timeoutMs);
    if (!opts.url) usage('--url is required');
    if (!/^wss?:\/\//.test(opts.url)) usage('--url must be ws:// or wss://');
    if (!['connect', 'disconnect', 'rotate'].includes(opts.expect)) usage('--expect connect|disconnect|rotate');
    if (opts.expect === 'rotate' && !(opts.certOrigin && opts.rotatedFlag && opts.url.startsWith('wss://'))) {
        usage('--expect rotate needs a wss:// --url, --cert-origin and --rotated-flag');
    }
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
    let page2 = null;
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
                ...(opts.netLog ? [`--log-net-log=${opts.netLog}`] : []),
            ],
            viewport: { width: 820, height: 520 },
            timeout: Math.min(30_000, left()),
            // Chromium on Linux trusts the CAs of $HOME/.pki/nssdb (besides the system's).
            ...(opts.home ? { env: { ...process.env, HOME: opts.home } } : {}),
        });
        // Hooks a page's console and WebSockets into the report, and opens page.html on it.
        const openPage = async (p, name) => {
            p.on('console', (m) => {
                consoleLines.push(`${name} console.${m.type()}: ${m.text()}`);
                if (/WebSocket connection to .* failed/.test(m.text())) wsErrors.push(m.text());
            });
            p.on('pageerror', (e) => consoleLines.push(`${name} pageerror: ${e.message}`));
            p.on('websocket', (ws) => {
                consoleLines.push(`${name} websocket to ${ws.url()}`);
                ws.on('close', () => consoleLines.push(`${name} websocket closed`));
                ws.on('socketerror', (e) => {
                    consoleLines.push(`${name} websocket error: ${e}`);
                    wsErrors.push(String(e));
                });
            });
            const pageUrl = new URL('page.html', pageBase);
            pageUrl.searchParams.set('url', opts.url);
            await p.goto(pageUrl.href, { waitUntil: 'load', timeout: Math.max(1, left()) });
            // The module must have loaded and set window.e2e (a wrong MIME type or a missing
            // noVNC file shows up here).
            await p.waitForFunction(() => window.e2e !== undefined, null, { timeout: Math.max(1, left()) })
                .catch(() => { throw new Error('page.js did not load (window.e2e missing): is noVNC served?'); });
        };

        const state = (p) => p.evaluate(() => ({
            connected: window.e2e.connected,
            disconnected: window.e2e.disconnected,
            clean: window.e2e.clean,
            securityFailure: window.e2e.securityFailure,
            error: window.e2e.error,
            events: window.e2e.events,
            rxMessages: window.e2e.rxMessages,
            rxBytes: window.e2e.rxBytes,
        }));

        // `connect`: the RFB handshake completes, then the canvas shows more than one colour.
        // With `settle`, then waits (bounded) for the picture to settle before a screenshot.
        const waitScreen = async (p, name, settle) => {
            let st = await state(p);
            if (st.error) throw new Error(`${name}: page error: ${st.error}`);
            // 1. the RFB handshake through the proxy completes.
            while (!st.connected && !st.disconnected && left() > 0) {
                await sleep(100);
                st = await state(p);
            }
            if (!st.connected) {
                throw new Error(`${name}: ` + (st.disconnected
                    ? `noVNC disconnected without connecting (clean: ${st.clean}`
                        + `${st.securityFailure ? `, securityfailure: ${JSON.stringify(st.securityFailure)}` : ''})`
                        + (wsErrors.length ? `; ${wsErrors.join('; ')}` : '')
                    : `noVNC did not connect within ${opts.timeoutMs} ms`));
            }
            log(`${name}: connect after ${Date.now() - started} ms`);
            // 2. the remote screen is drawn: more than one colour on the canvas.
            let c = { width: 0, height: 0, colours: 0, lit: 0 };
            while (left() > 0) {
                c = await p.evaluate(() => window.e2eCanvasColours(16));
                st = await state(p);
                if (c.colours > 1 || st.disconnected) break;
                await sleep(250);
            }
            if (st.disconnected) {
                throw new Error(`${name}: noVNC disconnected (clean: ${st.clean}) before the screen was drawn`);
            }
            if (c.colours <= 1) {
                throw new Error(`${name}: canvas ${c.width}x${c.height} still shows ${c.colours} colour(s) `
                    + `after ${opts.timeoutMs} ms: the remote screen never arrived`);
            }
            log(`${name}: canvas ${c.width}x${c.height} shows ${c.colours >= 16 ? '16+' : c.colours} colours `
                + `(${c.lit} pixels off the background) after ${Date.now() - started} ms`);
            if (settle && opts.screenshot) {
                // Let the screen finish painting before the picture: wait (bounded) until the
                // number of text pixels stays the same for a moment.
                let prev = -1;
                for (let i = 0; i < 20 && left() > 2_000; i++) {
                    const now = (await p.evaluate(() => window.e2eCanvasColours(16))).lit;
                    if (now === prev) break;
                    prev = now;
                    await sleep(400);
                }
            }
            return st;
        };

        // The certificate Chromium was served on a new TLS connection to `origin`: a new page
        // opens `origin`/healthz (the proxy answers 200 on its main port; `Connection: close`,
        // so every probe is a connection of its own), and CDP's Network.getCertificate gives
        // the chain Chromium verified for that origin (base64 DER, leaf first). Returned as hex
        // DER of the leaf. A certificate Chromium does not trust fails the navigation
        // (net::ERR_CERT_AUTHORITY_INVALID), so this also proves the CA is trusted.
        const certificateOf = async (origin) => {
            const p = await context.newPage();
            try {
                const cdp = await context.newCDPSession(p);
                await cdp.send('Network.enable');
                const resp = await p.goto(new URL('/healthz', origin).href, { timeout: Math.max(1, left()) });
                if (!resp || resp.status() !== 200) {
                    throw new Error(`GET ${origin}/healthz answered ${resp ? resp.status() : 'nothing'}`);
                }
                const sec = await resp.securityDetails();
                const { tableNames } = await cdp.send('Network.getCertificate', { origin });
                if (!tableNames || tableNames.length === 0) throw new Error(`no certificate for ${origin}`);
                log(`${origin}: ${sec?.protocol}, subject ${sec?.subjectName}, issuer ${sec?.issuer}, `
                    + `valid to ${sec?.validTo}, chain of ${tableNames.length}, after ${Date.now() - started} ms`);
                return Buffer.from(tableNames[0], 'base64').toString('hex');
            } finally {
                await p.close().catch(() => {});
            }
        };

        page = context.pages()[0] ?? await context.newPage();
        let s;
        if (opts.expect === 'rotate') {
            log(`certificate before: ${await certificateOf(opts.certOrigin)}`);
            await openPage(page, 'first');
            // No settling here: the screenshots are taken at the end.
            await waitScreen(page, 'first', false);
            log(`rotate now (after ${Date.now() - started} ms)`);
            while (!existsSync(opts.rotatedFlag)) {
                if (left() <= 0) throw new Error(`${opts.rotatedFlag} did not appear: no rotation`);
                await sleep(100);
            }
            // This probe is the first connection after the new files were published, so the
            // proxy checks them on its accept (CREDENTIALS_CHECK_SECONDS=1 has passed: the test
            // waited for it) and serves the new certificate from this handshake on.
            log(`certificate after: ${await certificateOf(opts.certOrigin)}`);
            const mark = {
                rx: (await state(page)).rxMessages,
                hash: await page.evaluate(() => window.e2eCanvasHash()),
                at: Date.now(),
            };
            // A new session, opened after the rotation, in a second page.
            page2 = await context.newPage();
            await openPage(page2, 'second');
            await waitScreen(page2, 'second', false);
            // The session opened before the rotation still gets its screen: more framebuffer
            // updates arrived on its WebSocket and the picture changed (the VGA text cursor
            // blinks) after the new certificate was served.
            let first = await state(page);
            let hash = mark.hash;
            while (left() > 0 && !first.disconnected) {
                hash = await page.evaluate(() => window.e2eCanvasHash());
                first = await state(page);
                if (first.rxMessages > mark.rx && hash !== mark.hash) break;
                await sleep(250);
            }
            if (first.disconnected) throw new Error(`first: noVNC disconnected (clean: ${first.clean}) after the rotation`);
            if (first.rxMessages <= mark.rx || hash === mark.hash) {
                throw new Error(`first: after the rotation ${first.rxMessages - mark.rx} more messages arrived and `
                    + `the canvas ${hash === mark.hash ? 'did not change' : 'changed'}: its screen stopped updating`);
            }
            log(`first: still connected; ${first.rxMessages - mark.rx} messages (${first.rxBytes} bytes in all) `
                + `and a canvas change within ${Date.now() - mark.at} ms of the new certificate being served `
                + '(the second session was opened meanwhile)');
            if (opts.screenshot) {
                const second = opts.screenshot.replace(/(\.png)?$/, '-second.png');
                await page2.screenshot({ path: second, timeout: Math.max(5_000, left()) });
                log(`screenshot: ${second}`);
            }
            s = first;
        } else if (opts.expect === 'connect') {
            await openPage(page, 'page');
            s = await waitScreen(page, 'page', true);
        } else {
            await openPage(page, 'page');
            s = await state(page);
            if (s.error) throw new Error(`page error: ${s.error}`);
            while (!s.connected && !s.disconnected && left() > 0) {
                await sleep(100);
                s = await state(page);
            }
            if (s.connected) throw new Error('noVNC reported connect, but a refusal was expected');
            if (!s.disconnected) {
                throw new Error(`noVNC reported neither connect nor disconnect within ${opts.timeoutMs} ms`);
            }
            // Connect must not follow late either: watch a little longer (bounded).
            await sleep(Math.min(500, left()));
            s = await state(page);
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
    if (!failure && opts.netLog) {
        try {
            const certs = websocketCertificates(opts.netLog);
            log(`websocket certificates: ${certs.join(',')}`);
        } catch (err) {
            failure = new Error(`reading the NetLog: ${err.message ?? err}`);
        }
    }
    if (failure) {
        log(`FAILED (expect ${opts.expect}): ${failure.message ?? failure}`);
        for (const line of consoleLines) log(`  ${line}`);
        process.exit(1);
    }
    process.exit(0);
}

// The leaf certificate of each wss:// WebSocket in Chromium's NetLog (written in full once the
// browser has closed), in the order the WebSockets were created, as hex DER. The chain of
// events: the WebSocket's URL_REQUEST (REQUEST_ALIVE with its url) is bound to an
// HTTP_STREAM_JOB (HTTP_STREAM_REQUEST_BOUND_TO_JOB), the job to a SOCKET
// (SOCKET_POOL_BOUND_TO_SOCKET), and that socket logged the server's certificates
// (SSL_CERTIFICATES_RECEIVED, PEM, leaf first) during its handshake.
function websocketCertificates(path) {
    const netlog = JSON.parse(readFileSync(path, 'utf8'));
    const types = netlog.constants.logEventTypes;
    const byType = (name) => netlog.events.filter((e) => e.type === types[name]);
    const dep = (e) => e.params?.source_dependency?.id;
    const jobOf = new Map();
    for (const e of byType('HTTP_STREAM_REQUEST_BOUND_TO_JOB')) {
        if (!jobOf.has(e.source.id)) jobOf.set(e.source.id, dep(e));
    }
    const socketOf = new Map(byType('SOCKET_POOL_BOUND_TO_SOCKET').map((e) => [e.source.id, dep(e)]));
    const leafOf = new Map(byType('SSL_CERTIFICATES_RECEIVED')
        .map((e) => [e.source.id, e.params?.certificates?.[0]]));
    const sockets = byType('REQUEST_ALIVE')
        .filter((e) => String(e.params?.url).startsWith('wss://'))
        .sort((a, b) => a.source.id - b.source.id);
    return sockets.map((e) => {
        const pem = leafOf.get(socketOf.get(jobOf.get(e.source.id)));
        if (!pem) throw new Error(`no certificate on the connection of WebSocket request ${e.source.id}`);
        const b64 = pem.replace(/-----(BEGIN|END) CERTIFICATE-----/g, '').replace(/\s+/g, '');
        return Buffer.from(b64, 'base64').toString('hex');
    });
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
