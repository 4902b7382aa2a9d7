// The page under test: a bare noVNC RFB client. The WebSocket URL comes from `?url=`.
// State for the test driver is kept on `window.e2e`.
import RFB from './novnc/core/rfb.js';

const status = document.getElementById('status');
const screen = document.getElementById('screen');
const e2e = {
    url: null,
    connected: false,
    disconnected: false,
    clean: null,
    securityFailure: null,
    error: null,
    events: [],
    // WebSocket messages (and their bytes) received by noVNC, counted as they arrive: after
    // the handshake nearly all are framebuffer updates, so a growing count shows the remote
    // screen still being sent (the rotation case checks it on a session opened before the
    // certificate changed).
    rxMessages: 0,
    rxBytes: 0,
};
window.e2e = e2e;

// noVNC creates its WebSocket with `new WebSocket(url, protocols)`, checks that the object has
// WebSocket's own properties, and reads it through `onmessage`. A constructor that returns a
// real WebSocket with one more listener of its own changes nothing else (a subclass would fail
// noVNC's property check).
const NativeWebSocket = window.WebSocket;
function CountingWebSocket(...args) {
    const ws = new NativeWebSocket(...args);
    ws.addEventListener('message', (ev) => {
        e2e.rxMessages += 1;
        e2e.rxBytes += ev.data?.byteLength ?? ev.data?.size ?? String(ev.data).length;
    });
    return ws;
}
CountingWebSocket.prototype = NativeWebSocket.prototype;
for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) CountingWebSocket[k] = NativeWebSocket[k];
window.WebSocket = CountingWebSocket;

function note(what) {
    e2e.events.push(`${Math.round(performance.now())}ms ${what}`);
    status.textContent = what;
}

// Looks at noVNC's canvas: `colours` counts distinct colours among painted (opaque) pixels,
// stopping at `limit`; `lit` counts the painted pixels that differ from the top-left one (the
// text on the background). Unpainted pixels are transparent and are not counted, so a canvas
// half painted black is still one colour.
window.e2eCanvasColours = (limit = 16) => {
    const canvas = screen.querySelector('canvas');
    if (!canvas || canvas.width === 0 || canvas.height === 0) {
        return { width: 0, height: 0, colours: 0, lit: 0 };
    }
    const { width, height } = canvas;
    const data = canvas.getContext('2d').getImageData(0, 0, width, height).data;
    const seen = new Set();
    const bg = (data[0] << 16) | (data[1] << 8) | data[2];
    let lit = 0;
    for (let i = 0; i < data.length; i += 4) {
        if (data[i + 3] !== 255) continue;
        const rgb = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
        if (seen.size < limit) seen.add(rgb);
        if (rgb !== bg) lit++;
    }
    return { width, height, colours: seen.size, lit };
};

// A cheap fingerprint of the whole canvas (FNV-1a over the RGB of every pixel), so the test
// can tell whether the picture changed between two moments.
window.e2eCanvasHash = () => {
    const canvas = screen.querySelector('canvas');
    if (!canvas || canvas.width === 0 || canvas.height === 0) return 0;
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let h = 0x811c9dc5;
    for (let i = 0; i < data.length; i += 4) {
        h = Math.imul(h ^ ((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]), 0x01000193) >>> 0;
    }
    return h;
};

try {
    const url = new URLSearchParams(location.search).get('url');
    if (!url) throw new Error('no ?url= given');
    e2e.url = url;
    note(`connecting to ${url.replace(/\/[^/]+(\/[^/]+)$/, '/…$1')}`);
    const rfb = new RFB(screen, url);
    rfb.scaleViewport = false;
    rfb.viewOnly = true;
    rfb.addEventListener('connect', () => {
        e2e.connected = true;
        note('connect');
    });
    rfb.addEventListener('disconnect', (ev) => {
        e2e.disconnected = true;
        e2e.clean = ev.detail.clean;
        note(`disconnect (clean: ${ev.detail.clean})`);
    });
    rfb.addEventListener('securityfailure', (ev) => {
        e2e.securityFailure = { status: ev.detail.status, reason: ev.detail.reason };
        note(`securityfailure ${ev.detail.status} ${ev.detail.reason ?? ''}`);
    });
    rfb.addEventListener('credentialsrequired', () => note('credentialsrequired'));
    rfb.addEventListener('desktopname', (ev) => note(`desktopname ${ev.detail.name}`));
    window.e2eRfb = rfb;
} catch (err) {
    e2e.error = String(err && err.stack || err);
    note(`error: ${err}`);
}
