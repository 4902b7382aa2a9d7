//! The proxy doing its job with no cluster: a stand-in KubeVirt VNC upstream
//! on loopback, the proxy in front of it, a freshly minted token, and the
//! commands to try it.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! `PORT` (default 5001), `SHUTDOWN_GRACE_SECONDS` (default 2 here) and
//! `RUST_LOG` are honoured. The log shows each session as the proxy's does:
//! an access line when it opens and one when it ends.
//!
//! Ctrl-C (or SIGTERM) stops it the way it stops the proxy, through the same
//! code: new sessions are refused, open ones get the grace and then close
//! 1001 `going away`, and the demo exits 0. A second Ctrl-C stops at once.

#[path = "../tests/support/tokens.rs"]
mod tokens;
#[path = "../tests/support/upstream.rs"]
mod upstream;

use std::process::ExitCode;

/// The VMI the printed token and commands are for.
const DEMO_VMI: &str = "vnc-demo";

use kubevirt_vnc_proxy::{Config, ConfigError, Proxy, StartError};
use signal_hook::consts::{SIGINT, SIGTERM};

/// The drain grace unless `SHUTDOWN_GRACE_SECONDS` says otherwise: shorter
/// than the proxy's 25 s, so that Ctrl-C on a demo with a session open does
/// not look like a hang.
const DEMO_GRACE_SECONDS: &str = "2";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            // As the proxy: 2 for a configuration to fix, 1 for the rest.
            let config =
                e.is::<ConfigError>() || matches!(e.downcast_ref(), Some(StartError::Config(_)));
            ExitCode::from(if config { 2 } else { 1 })
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    // The demo's VMI speaks VNC first; any other name the user mints a token for echoes.
    let standin = upstream::StandIn::start_with(
        upstream::StandInOptions::serving(upstream::Behaviour::Echo)
            .vmi(DEMO_VMI, upstream::Behaviour::Vnc),
    );
    let from_env = |var: &str, default: &str| {
        (
            var.to_owned(),
            std::env::var(var).unwrap_or_else(|_| default.to_owned()),
        )
    };
    // The proxy's own configuration parser, so PORT and the grace are
    // checked as the proxy checks them.
    let config = Config::from_sources(
        [
            ("LOCAL_DEV_MODE".to_owned(), "true".to_owned()),
            (
                "WS_REMOTE_URL".to_owned(),
                format!("ws://{}", standin.addr()),
            ),
            ("SECRET_KEY".to_owned(), tokens::SECRET.to_owned()),
            ("HOST".to_owned(), "127.0.0.1".to_owned()),
            from_env("PORT", "5001"),
            from_env("SHUTDOWN_GRACE_SECONDS", DEMO_GRACE_SECONDS),
        ],
        Vec::<String>::new(),
    )?;
    let grace = config.shutdown_grace;
    // The loop answers SIGINT/SIGTERM itself, as the proxy's binary does.
    let proxy = Proxy::builder(config)
        .stop_on_signals(&[SIGTERM, SIGINT])
        .bind()?;
    let addr = proxy.local_addr();
    let vmi = DEMO_VMI;
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
    println!(
        "Ctrl-C drains as the proxy does on SIGTERM: open sessions get {} s \
         (SHUTDOWN_GRACE_SECONDS), then close 1001; Ctrl-C again stops at once.",
        grace.as_secs()
    );
    log::info!("listening on {addr}");
    // Serve on this thread until a signal has drained the proxy.
    proxy.run()?;
    log::info!("stopped");
    Ok(())
}
