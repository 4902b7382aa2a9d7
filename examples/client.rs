//! A minimal WebSocket client for trying the proxy: prints every message it
//! receives and sends each line typed on standard input as a text message.
//!
//! ```text
//! cargo run --release --example client -- ws://127.0.0.1:5001/TOKEN/VMI
//! ```
//!
//! It ends a session as a browser does. Whenever the server sends a close
//! frame (the proxy going away, say), it answers at once with the same code,
//! even while waiting for input, and exits once the server has closed the
//! connection. The end of input (Ctrl-D) sends a close 1000 and waits for
//! the server's answer. Every wait is bounded.

use std::io::BufRead;
use std::net::TcpStream;
use std::sync::mpsc::{self, TryRecvError};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

/// How often the socket is looked at while nothing arrives (and so how soon
/// a typed line goes out).
const POLL: Duration = Duration::from_millis(50);
/// How long a started closing handshake may take before the client gives up
/// and drops the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: client ws://HOST:PORT/TOKEN/VMI")?;
    let authority = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .ok_or("the URL must start with ws://")?;
    let stream = TcpStream::connect(authority)?;
    let (mut ws, resp) =
        tungstenite::client::client(url.as_str(), stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) => format!(
                "refused: HTTP {} {}",
                r.status(),
                String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).trim()
            ),
            other => other.to_string(),
        })?;
    println!("connected: HTTP {}", resp.status());
    ws.get_mut().set_read_timeout(Some(POLL))?;

    // Standard input on a thread of its own, so that the socket is read
    // (and a close answered) while the user types nothing.
    let (lines, typed) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
        // Dropping the sender tells the end of input.
    });
    session(&mut ws, &typed)
}

/// Relay typed lines and print what arrives until the WebSocket is closed.
fn session(
    ws: &mut WebSocket<TcpStream>,
    typed: &mpsc::Receiver<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Set once a close frame went either way: no more messages may be sent.
    let mut closing_since: Option<Instant> = None;
    loop {
        while closing_since.is_none() {
            match typed.try_recv() {
                Ok(line) => ws.send(Message::text(line))?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // End of input: close normally, then wait for the answer.
                    ws.close(None)?;
                    closing_since = Some(Instant::now());
                }
            }
        }
        match ws.read() {
            Ok(Message::Text(t)) => println!("< {t}"),
            Ok(Message::Binary(b)) => {
                println!("< {} bytes: {:?}", b.len(), String::from_utf8_lossy(&b))
            }
            Ok(Message::Close(f)) => {
                // A close we did not start: tungstenite has queued the
                // answer, the same code and reason; send it now. Either way
                // the server closes the connection next.
                println!("< close {f:?}");
                if let Err(e) = ws.flush() {
                    return ended(e);
                }
                closing_since.get_or_insert_with(Instant::now);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if closing_since.is_some_and(|t| t.elapsed() > CLOSE_TIMEOUT) {
                    eprintln!("the server did not close the connection; dropping it");
                    return Ok(());
                }
            }
            Err(e) if closing_since.is_some() => return ended(e),
            Err(e) => return Err(e.into()),
        }
    }
}

/// After the close frames: the connection ending is the normal end; any
/// other error is reported.
fn ended(e: tungstenite::Error) -> Result<(), Box<dyn std::error::Error>> {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => Ok(()),
        tungstenite::Error::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(())
        }
        e => Err(e.into()),
    }
}
