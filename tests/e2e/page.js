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
};
window.e2e = e2e;

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
