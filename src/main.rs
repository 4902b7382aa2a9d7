//! The `kubevirt-vnc-proxy` binary: configuration from the environment and
//! flags, logging, signals, and the `token` and `check-config` subcommands.
//! A thin host around the library.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::SystemTime;

mod cli;

use kubevirt_vnc_proxy::config::{Lookalike, lookalike_variables};
use kubevirt_vnc_proxy::events::{LogFormat, write_json_record};
use kubevirt_vnc_proxy::{Config, Proxy, StartError};
use signal_hook::consts::{SIGINT, SIGTERM};

use cli::{Command, Failure};

fn main() -> ExitCode {
    // `kubevirt-vnc-proxy --port 5002 check-config` as well as
    // `kubevirt-vnc-proxy check-config --port 5002`.
    let argv = match cli::arguments(std::env::args_os().skip(1)) {
        Ok(argv) => argv,
        Err(line) => {
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    let cli = cli::parse(argv);
    match cli.command {
        Command::Token => return mint(&cli.args, cli.subcommand_at),
        Command::CheckConfig => return check_config(cli),
        Command::Help => {
            print!("{}", cli::help());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("kubevirt-vnc-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Serve => {}
    }
    let (env, unreadable) = cli::environment(std::env::vars_os());
    let lookalikes = lookalike_variables(env.iter().map(|(k, _)| k.as_str()));
    let config = match cli::configure(env, &unreadable, cli) {
        Ok(c) => c,
        Err(failure) => {
            report_start_errors(&lookalikes, &failure);
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    for l in &lookalikes {
        log::warn!("{l}");
    }
    raise_open_files_limit(&config);
    let workers = config.workers;
    let tls = match (&config.tls_cert_file, &config.client_ca_file) {
        (None, _) => None,
        (Some(cert), None) => Some(format!("TLS with {}", cert.display())),
        (Some(cert), Some(ca)) => Some(format!(
            "TLS with {}, client certificates from {} required",
            cert.display(),
            ca.display()
        )),
    };
    // WORKERS independent loops share the port through SO_REUSEPORT; the
    // first one binds (and picks the port when PORT=0), the others follow.
    // The first is the process's one place for signals (it answers
    // SIGTERM/SIGINT itself, and drains or stops the others with it) and
    // for /metrics (which counts every worker's sessions). Its signal
    // handlers are in place before it says it listens (tools take their
    // baseline from that line); with one loop the process stays
    // single-threaded (cheaper socket calls).
    let mut first = match Proxy::builder(config.clone())
        .stop_on_signals(&[SIGTERM, SIGINT])
        .bind()
    {
        Ok(p) => p,
        Err(e) => return start_failed(e),
    };
    let mut others = Vec::new();
    for _ in 1..workers {
        let mut c = config.clone();
        c.port = first.local_addr().port();
        c.metrics_addr = None;
        match Proxy::bind(c) {
            Ok(p) => {
                first.add_worker(p.handle());
                others.push(p);
            }
            Err(e) => return start_failed(e),
        }
    }
    // Tests and tools read the address from this exact line.
    log::info!("listening on {}", first.local_addr());
    if workers > 1 {
        log::info!("{workers} workers share the port");
    }
    if let Some(tls) = tls {
        log::info!("the listeners speak {tls}");
    }
    if let Some(m) = first.metrics_addr() {
        log::info!("serving /metrics, /healthz and /readyz on {m}");
    }
    let mut threads = Vec::new();
    for p in others {
        match p.spawn() {
            Ok(r) => threads.push(r),
            Err(e) => {
                fatal(&format!("cannot start a worker thread: {e}"));
                return ExitCode::FAILURE;
            }
        }
    }
    let worker_handles: Vec<_> = threads.iter().map(|r| r.handle()).collect();
    let mut result = first.run();
    // The first loop answers signals for all: if it failed, nothing else
    // would stop the workers. (Done, it drained them too.)
    if result.is_err() {
        worker_handles.iter().for_each(|h| h.shutdown());
    }
    for r in threads {
        result = result.and(r.wait());
    }
    match result {
        Ok(()) => {
            log::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            fatal(&format!("event loop failed: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn start_failed(e: StartError) -> ExitCode {
    /// 2 for what the configuration can fix, as for a bad value.
    fn configuration(e: &StartError) -> bool {
        match e {
            StartError::Config(_) | StartError::Resolve(_) => true,
            StartError::Several(all) => all.iter().all(configuration),
            // Bind, Io, and any kind added later (StartError is non_exhaustive).
            _ => false,
        }
    }
    // One log line (one JSON record) per failure.
    match &e {
        StartError::Several(all) => all.iter().for_each(|e| fatal(&e.to_string())),
        e => fatal(&e.to_string()),
    }
    if configuration(&e) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// Why the process stops: logged, and on stderr as it is when the log
/// filter (`RUST_LOG=off`, say) would drop it, so a failed start never exits
/// without a word.
fn fatal(message: &str) {
    if log::log_enabled!(log::Level::Error) {
        log::error!("{message}");
    } else {
        eprintln!("{message}");
    }
}

/// LOGLEVEL sets the default, RUST_LOG wins when set; LOG_FORMAT=json makes
/// every line one JSON object, access lines included, all through one writer
/// (`ts`, `level`, `target`, then the line's fields).
fn init_logging(config: &Config) {
    let mut b = env_logger::Builder::new();
    b.filter_level(config.log_level).parse_env("RUST_LOG");
    if config.log_format == LogFormat::Json {
        b.format(|out, record| {
            let (now, level, target) = (SystemTime::now(), record.level(), record.target());
            match record.args().as_str() {
                Some(msg) => write_json_record(out, now, level, target, msg),
                None => write_json_record(out, now, level, target, &record.args().to_string()),
            }
        });
    } else {
        b.format_timestamp_millis();
    }
    b.init();
}

/// Every proxied session holds two descriptors (client and upstream), so the
/// common default soft limit of 1,024 would stop a proxy at about 500
/// sessions, long before `MAX_CONNECTIONS`: raise the soft limit as far as
/// needed and the hard limit allows, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do, and say so when the hard limit leaves room for
/// fewer than 90 % of the sessions.
fn raise_open_files_limit(config: &Config) {
    // Listener, epoll, waker, signal pipe, credential files and some slack.
    const SPARE: u64 = 64;
    let needed = (config.max_connections as u64)
        .saturating_mul(config.workers as u64)
        .saturating_mul(2)
        .saturating_add(SPARE);
    let sessions = |limit: u64| limit.saturating_sub(SPARE) / 2;
    match rlimit::increase_nofile_limit(needed) {
        Ok(got) if sessions(got) < sessions(needed) * 9 / 10 => log::warn!(
            "the open-files limit is {got} (the hard limit), but MAX_CONNECTIONS={} x WORKERS={} \
             needs about {needed}: past about {} sessions new ones wait for a free descriptor \
             (raise the hard limit, or lower MAX_CONNECTIONS)",
            config.max_connections,
            config.workers,
            sessions(got)
        ),
        Ok(got) => log::debug!("open-files limit {got} (needed about {needed})"),
        Err(e) => log::warn!("cannot raise the open-files limit: {e}"),
    }
}

/// A start that cannot go ahead: every configuration error, one line each,
/// after the warnings that may explain them (`SECRET_KY` for `SECRET_KEY`);
/// as JSON records when `LOG_FORMAT=json`, as every other line would be.
fn report_start_errors(lookalikes: &[Lookalike], failure: &Failure) {
    let lines = lookalikes
        .iter()
        .map(|l| (log::Level::Warn, l.to_string()))
        .chain(failure.lines.iter().map(|e| (log::Level::Error, e.clone())));
    let mut err = std::io::stderr().lock();
    for (level, line) in lines {
        let _ = if failure.log_format == LogFormat::Json {
            write_json_record(&mut err, SystemTime::now(), level, module_path!(), &line)
        } else if level == log::Level::Warn {
            writeln!(err, "warning: {line}")
        } else {
            writeln!(err, "{line}")
        };
    }
}

/// `check-config`: everything the proxy checks at start, without listening;
/// every configuration error, one line each.
fn check_config(cli: cli::Cli) -> ExitCode {
    let (env, unreadable) = cli::environment(std::env::vars_os());
    for l in lookalike_variables(env.iter().map(|(k, _)| k.as_str())) {
        eprintln!("warning: {l}");
    }
    let config = match cli::configure(env, &unreadable, cli) {
        Ok(c) => c,
        Err(failure) => {
            eprintln!("{}", failure.lines.join("\n"));
            return ExitCode::from(2);
        }
    };
    match Proxy::check(&config) {
        Ok(summary) => {
            println!("configuration ok: {summary}");
            ExitCode::SUCCESS
        }
        Err(StartError::Several(all)) => {
            all.iter().for_each(|e| eprintln!("{e}"));
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// The version of `lab-orchestrator-lib-auth` whose `generate_auth_token`
/// the `token` subcommand mirrors.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LibAuth {
    /// 0.0.5, what production runs: no `additional_data`.
    V0_0_5,
    /// 2.x (2.2.0 the latest): `additional_data`, null unless given.
    V2,
}

/// The claims `generate_auth_token` writes, in its order (serde writes a
/// struct's fields in declaration order, as Python a dict's keys).
#[derive(serde::Serialize)]
struct LabClaims {
    id: serde_json::Value,
    /// `time.time() + expires_in`: seconds with a fraction.
    exp: f64,
    lab_instance: LabInstanceClaims,
}

#[derive(serde::Serialize)]
struct LabInstanceClaims {
    lab_id: serde_json::Value,
    lab_instance_id: serde_json::Value,
    namespace_name: String,
    allowed_vmi_names: Vec<String>,
    /// Absent in 0.0.5; `Some(Null)` is written as `null`, as 2.x does.
    #[serde(skip_serializing_if = "Option::is_none")]
    additional_data: Option<serde_json::Value>,
}

/// `token`: mint a token as LabOrchestrator's API does, for operators
/// testing a deployment. `args` are the command line's arguments but the
/// subcommand, which stood at `subcommand_at` (from 0).
fn mint(args: &[String], subcommand_at: Option<usize>) -> ExitCode {
    const USAGE: &str = "USAGE: kubevirt-vnc-proxy token --vmi NAME [--vmi NAME ...] --namespace NS [--ttl SECONDS] [--user-id ID] [--lab-id ID] [--lab-instance-id ID] [--lib-version 0.0.5|2.2.0] [--secret-key KEY]\n\
        Mints what LabOrchestrator's API mints with generate_auth_token of PyPI's\n\
        lab-orchestrator-lib-auth: the same claims in the same order, exp = now + SECONDS\n\
        (default 3600) with its fraction, HS256 with SECRET_KEY from the environment or\n\
        --secret-key. Prints the token.\n\
        --lib-version 0.0.5 (the default) mirrors 0.0.5, what lab-orchestrator-lib 1.0.1 and\n\
        the Python proxy pin: {id, exp, lab_instance: {lab_id, lab_instance_id,\n\
        namespace_name, allowed_vmi_names}}. --lib-version 2.2.0 mirrors 2.x, which adds\n\
        lab_instance.additional_data (null). IDs that are integers are written as numbers.";
    let mut vmis = Vec::new();
    let mut namespace = None;
    let mut ttl: f64 = 3600.0;
    let mut user_id = String::from("1");
    let mut lab_id = String::from("1");
    let mut lab_instance_id = String::from("1");
    let mut lib = LibAuth::V0_0_5;
    let mut secret = std::env::var("SECRET_KEY").ok();
    // Where an argument stood on the command line (from 1), to name one
    // without showing it.
    let position = |i: usize| i + 1 + usize::from(subcommand_at.is_some_and(|s| s <= i));
    let mut it = args.iter().enumerate();
    while let Some((i, a)) = it.next() {
        if !a.starts_with('-') {
            // Not a flag: maybe the secret, pasted without --secret-key.
            eprintln!(
                "token: unexpected argument {} (not shown: it may be a secret)\n{USAGE}",
                position(i)
            );
            return ExitCode::from(2);
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (a.as_str(), None),
        };
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        let Some(value) = inline.or_else(|| it.next().map(|(_, v)| v.clone())) else {
            eprintln!("token: {flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        match flag {
            "--vmi" => vmis.push(value),
            "--namespace" => namespace = Some(value),
            "--ttl" => match value.parse::<f64>() {
                Ok(v) if v.is_finite() && v.abs() < 1e10 => ttl = v,
                _ => {
                    eprintln!("token: --ttl: '{value}' is not a number of seconds");
                    return ExitCode::from(2);
                }
            },
            "--user-id" => user_id = value,
            "--lab-id" => lab_id = value,
            "--lab-instance-id" => lab_instance_id = value,
            "--lib-version" => {
                lib = match value.as_str() {
                    "0.0.5" => LibAuth::V0_0_5,
                    v if v.starts_with("2.") => LibAuth::V2,
                    _ => {
                        eprintln!("token: --lib-version: '{value}' is neither 0.0.5 nor 2.x");
                        return ExitCode::from(2);
                    }
                }
            }
            "--secret-key" => secret = Some(value),
            other => {
                eprintln!("token: unknown argument '{other}'\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(secret), Some(namespace)) = (secret.filter(|s| !s.is_empty()), namespace) else {
        eprintln!("token: SECRET_KEY and --namespace are required\n{USAGE}");
        return ExitCode::from(2);
    };
    if vmis.is_empty() {
        eprintln!("token: at least one --vmi is required\n{USAGE}");
        return ExitCode::from(2);
    }
    // Numbers stay numbers, as the Python API writes them.
    let id_value = |s: &str| {
        s.parse::<i64>().map_or_else(
            |_| serde_json::Value::String(s.to_owned()),
            serde_json::Value::from,
        )
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let claims = LabClaims {
        id: id_value(&user_id),
        exp: now + ttl,
        lab_instance: LabInstanceClaims {
            lab_id: id_value(&lab_id),
            lab_instance_id: id_value(&lab_instance_id),
            namespace_name: namespace,
            allowed_vmi_names: vmis,
            additional_data: (lib == LibAuth::V2).then_some(serde_json::Value::Null),
        },
    };
    let key = match jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("token: unusable secret: {e}");
            return ExitCode::from(2);
        }
    };
    match jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("token: {e}");
            ExitCode::FAILURE
        }
    }
}
