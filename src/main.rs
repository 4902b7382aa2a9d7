//! The `kubevirt-vnc-proxy` binary: configuration from the environment and
//! flags, logging, signals, run.

use std::process::ExitCode;

use kubevirt_vnc_proxy::{Command, Config, Proxy, StartError};

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(Command::Run(c)) => *c,
        Ok(Command::Help) => {
            print!("{}", kubevirt_vnc_proxy::config::help_text());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("kubevirt-vnc-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // LOGLEVEL sets the default; RUST_LOG, when set, wins.
    env_logger::Builder::new()
        .filter_level(config.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    let proxy = match Proxy::bind(config) {
        Ok(p) => p,
        Err(e @ (StartError::Config(_) | StartError::Resolve(_))) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    log::info!("listening on {}", proxy.local_addr());
    match proxy.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}
