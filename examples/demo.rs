//! The proxy doing its job with no cluster: a stand-in KubeVirt VNC upstream
//! on loopback, the proxy in front of it, a freshly minted token, and the
//! commands to try it.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! `PORT` (default 5001) and `RUST_LOG` are honoured. Stop it with Ctrl-C.

#[path = "../tests/support/tokens.rs"]
mod tokens;
#[path = "../tests/support/upstream.rs"]
mod upstream;

use kubevirt_vnc_proxy::{Config, Proxy};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .parse_env("RUST_LOG")
        .init();
    let standin = upstream::StandIn::start();
    let mut config = Config::local_dev(
        &format!("ws://{}", standin.addr()),
        tokens::SECRET.as_bytes(),
    )?;
    config.port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5001);
    let proxy = Proxy::bind(config)?;
    let addr = proxy.local_addr();
    let vmi = "vnc-demo";
    let token = tokens::mint(tokens::SECRET, "lab-ns", &[vmi], tokens::now() + 3600);
    let url = format!("ws://{addr}/{token}/{vmi}");
    println!("stand-in KubeVirt VNC upstream on ws://{}", standin.addr());
    println!("proxy listening on {addr}");
    println!();
    println!("token (HS256, valid 1 h, namespace lab-ns, VMI {vmi}):\n  {token}");
    println!();
    println!("URL to open with a WebSocket/noVNC client:\n  {url}");
    println!();
    println!("try it (prints the upstream's VNC greeting, then echoes each line you type):");
    println!("  cargo run --release --example client -- '{url}'");
    println!();
    // Serve on this thread until the process is stopped.
    proxy.run()?;
    Ok(())
}
