// Tiny static HTTP server for the browser end-to-end test, loopback only.
//
//   /                 -> page.html
//   /page.html, /page.js
//   /novnc/...        -> node_modules/@novnc/novnc/... (noVNC ships ES modules under core/ and
//                        vendor/, which import each other relatively, so one mount serves all)
//
// Run standalone: `node serve.mjs [--port N]` prints `serving on http://127.0.0.1:PORT/` on
// stdout (PORT 0, the default, picks a free port) and serves until killed or until stdin closes.
// Imported: `startServer({port})` resolves to {server, url}.

import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { dirname, extname, join, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const novncRoot = join(here, 'node_modules', '@novnc', 'novnc');

const MIME = {
    '.html': 'text/html; charset=utf-8',
    '.js': 'text/javascript; charset=utf-8',
    '.mjs': 'text/javascript; charset=utf-8',
    '.json': 'application/json',
    '.css': 'text/css; charset=utf-8',
    '.png': 'image/png',
    '.svg': 'image/svg+xml',
    '.ico': 'image/x-icon',
};

// Maps a URL path to a file under an allowed root, or null (no traversal out of the roots).
function resolvePath(urlPath) {
    let p;
    try {
        p = decodeURIComponent(urlPath);
    } catch {
        return null;
    }
    if (p === '/') p = '/page.html';
    let root = here;
    let rel;
    if (p.startsWith('/novnc/')) {
        root = novncRoot;
        rel = p.slice('/novnc/'.length);
    } else if (p === '/page.html' || p === '/page.js') {
        rel = p.slice(1);
    } else {
        return null;
    }
    const file = normalize(join(root, rel));
    if (file !== root && !file.startsWith(root + sep)) return null;
    return file;
}

export function startServer({ port = 0, host = '127.0.0.1' } = {}) {
    const server = createServer(async (req, res) => {
        const url = new URL(req.url, 'http://localhost');
        const file = resolvePath(url.pathname);
        if (req.method !== 'GET' && req.method !== 'HEAD') {
            res.writeHead(405).end();
            return;
        }
        if (url.pathname === '/favicon.ico') {
            res.writeHead(204).end();
            return;
        }
        if (!file) {
            res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
            return;
        }
        try {
            const body = await readFile(file);
            res.writeHead(200, {
                'content-type': MIME[extname(file)] ?? 'application/octet-stream',
                'cache-control': 'no-store',
            });
            res.end(req.method === 'HEAD' ? undefined : body);
        } catch {
            res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
        }
    });
    return new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => {
            const { port: actual } = server.address();
            resolve({ server, url: `http://${host}:${actual}/` });
        });
    });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === normalize(process.argv[1])) {
    const i = process.argv.indexOf('--port');
    const port = i >= 0 ? Number(process.argv[i + 1]) : 0;
    const { server, url } = await startServer({ port });
    console.log(`serving on ${url}`);
    const stop = () => server.close(() => process.exit(0));
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    // A parent that dies without killing us closes our stdin: exit then too.
    process.stdin.on('end', stop);
    process.stdin.on('error', stop);
    process.stdin.resume();
}
