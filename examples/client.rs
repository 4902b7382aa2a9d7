//! A minimal WebSocket client for trying the proxy: prints every message it
//! receives and sends each line typed on standard input as a text message.
//!
//! ```text
//! cargo run --release --example client -- ws://127.0.0.1:5001/TOKEN/VMI
//! ```

use std::io::BufRead;
use std::net::TcpStream;
use std::time::Duration;

use tungstenite::{Message, WebSocket};

fn print_incoming(ws: &mut WebSocket<TcpStream>) -> Result<bool, tungstenite::Error> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => println!("< {t}"),
            Ok(Message::Binary(b)) => {
                println!("< {} bytes: {:?}", b.len(), String::from_utf8_lossy(&b))
            }
            Ok(Message::Close(f)) => {
                println!("< close {f:?}");
                return Ok(false);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(true);
            }
            Err(e) => return Err(e),
        }
    }
}

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
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))?;
    if !print_incoming(&mut ws)? {
        return Ok(());
    }
    for line in std::io::stdin().lock().lines() {
        ws.send(Message::text(line?))?;
        if !print_incoming(&mut ws)? {
            return Ok(());
        }
    }
    ws.close(None)?;
    let _ = print_incoming(&mut ws);
    Ok(())
}
