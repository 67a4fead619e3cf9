//! The `scorefront` command: `serve`, `check-config` and `keys`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rand::{RngExt, distr::Alphanumeric};
use scorefront::{
    accesslog,
    app::{self, Listeners},
    discovery::file,
    spec::ReplicaSource,
};
use tokio::{net::TcpListener, signal::unix::SignalKind};

#[derive(Parser)]
#[command(
    version,
    about = "Inference front-end router: weighted model versions, replica slots, key auth"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve scoring traffic for the endpoints the config names.
    Serve {
        /// Router config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Check the router config and its endpoints file; exit 1 listing every error.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a fresh random primary/secondary key pair for an endpoint spec.
    Keys,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { config, log_format } => {
            let _flush_logs_on_exit = init_logs(log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::CheckConfig { config } => check_config(config),
        Cmd::Keys => {
            let key = || -> String {
                rand::rng()
                    .sample_iter(Alphanumeric)
                    .take(32)
                    .map(char::from)
                    .collect()
            };
            println!("keys:\n  primaryKey: {}\n  secondaryKey: {}", key(), key());
            ExitCode::SUCCESS
        }
    }
}

/// Logs go to stderr through a writer thread, so a request never waits on a write
/// syscall for its access-log line. The writer blocks rather than drop lines when it falls
/// behind; the returned guard flushes what is left at exit.
///
/// The writer thread flushes each time it has written every line waiting for it, so under
/// load one write(2) carries many lines instead of one each (never a partial line).
fn init_logs(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone());
    // The access log writes its lines itself, in the same layouts, except in colour.
    let access = match format {
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(ansi).init();
            (!ansi).then_some(accesslog::Format::Text)
        }
        LogFormat::Json => {
            builder.json().flatten_event(true).init();
            Some(accesslog::Format::Json)
        }
    };
    if let Some(access) = access {
        accesslog::install(writer, access);
    }
    guard
}

async fn serve(config: PathBuf) -> anyhow::Result<()> {
    let (cfg, _) = file::load_all(&config).map_err(|errors| {
        anyhow::anyhow!("configuration is invalid:\n  {}", errors.join("\n  "))
    })?;
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))
    };
    let listeners = Listeners {
        http: bind(cfg.listen.http).await?,
        admin: bind(cfg.listen.admin).await?,
    };
    let app = app::start(&config, listeners).await?;
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    app.shutdown().await;
    Ok(())
}

fn check_config(config: PathBuf) -> ExitCode {
    match file::load_all(&config) {
        Ok((cfg, endpoints)) => {
            let versions: usize = endpoints.iter().map(|e| e.versions.len()).sum();
            let local = endpoints
                .iter()
                .flat_map(|e| &e.versions)
                .filter(|v| matches!(v.replicas, ReplicaSource::Command { .. }))
                .count();
            println!(
                "ok: {} endpoint(s), {versions} version(s) ({local} with local replicas) from {}",
                endpoints.len(),
                cfg.endpoints.file.display()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s) found", errors.len());
            ExitCode::FAILURE
        }
    }
}
