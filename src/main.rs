//! The `scorefront` command: `serve`, `check-config`, `keys` and `token`.

use std::{io::Write, path::PathBuf, process::ExitCode, time::SystemTime};

use std::os::unix::fs::OpenOptionsExt;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rand::{RngExt, distr::Alphanumeric};
use scorefront::{
    accesslog,
    app::{self, Listeners},
    discovery::{file, kubernetes},
    logwriter::{self, LogWriter},
    server::tls::LoadedCert,
    spec::{Auth, ReplicaSource},
    token::{
        self,
        issuer::{KeyKind, Signer},
    },
};
use tokio::{net::TcpListener, signal::unix::SignalKind};

/// The allocator is jemalloc: each request takes and frees a dozen blocks, some of a few
/// KiB, and jemalloc serves them in fewer instructions than glibc's malloc (38.4k against
/// 39.5k per request in `loadtest/scenarios.py instructions`), with CPU per request a few
/// percent lower or within noise at every load (see `loadtest/README.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, which it reads before `main`. A background thread gives pages
/// that have lain free for a second back to the system, so the memory of a burst of
/// connections or requests is returned soon after they end, with no call from the
/// router and no work on its request path.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: a C string literal lives as long as the program, and ends with its NUL.
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

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
        /// Threads serving requests [default: the CPUs this process may use, by its
        /// affinity and cgroup CPU limit]. With 1, the router runs on a single-threaded
        /// scheduler, which spares every task wake-up the cost of work stealing.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Print the ScoringEndpoint CustomResourceDefinition (YAML, for kubectl apply).
    Crd,
    /// Check the router config and its endpoints file; exit 1 listing every error.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a fresh random primary/secondary key pair for an endpoint spec, or with
    /// --token-signing a private key for the built-in token issuer.
    Keys {
        /// Make a token signing key (PKCS#8 PEM) of this kind instead.
        #[arg(long, value_enum)]
        token_signing: Option<KeyKind>,
        /// Write the signing key to this new file (mode 0600) instead of stdout.
        #[arg(long, requires = "token_signing")]
        out: Option<PathBuf>,
    },
    /// Mint a token for an `authMode: token` endpoint with the built-in issuer; prints
    /// JSON {accessToken, tokenType, expiryOn, refreshAfter}.
    Token {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, short)]
        endpoint: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (the Kubernetes client asks for it).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Cmd::Serve {
            config,
            log_format,
            workers,
        } => {
            let _flush_logs_on_exit = match init_logs(log_format) {
                Ok(flush) => flush,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = runtime(workers).expect("tokio runtime");
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::CheckConfig { config } => check_config(config),
        Cmd::Crd => {
            print!("{}", scorefront::spec::crd_yaml());
            ExitCode::SUCCESS
        }
        Cmd::Keys {
            token_signing: None,
            ..
        } => {
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
        Cmd::Keys {
            token_signing: Some(kind),
            out,
        } => report(signing_key(kind, out)),
        Cmd::Token { config, endpoint } => report(mint(&config, &endpoint)),
    }
}

/// The scheduler `serve` runs on: `workers` threads, by default one per CPU the process
/// may use; a single thread gets the current-thread scheduler.
fn runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn signing_key(kind: KeyKind, out: Option<PathBuf>) -> anyhow::Result<()> {
    let pem = token::issuer::generate(kind)?;
    match out {
        None => print!("{pem}"),
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            file.write_all(pem.as_bytes())?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn mint(config: &std::path::Path, endpoint: &str) -> anyhow::Result<()> {
    let (cfg, endpoints) = file::load_all(config)?;
    let issuer = cfg
        .auth
        .token_issuer
        .as_ref()
        .with_context(|| format!("{}: auth.tokenIssuer is not configured", config.display()))?;
    // In a cluster the endpoints are objects the command does not read; the token is
    // bound to the endpoint by its audience either way.
    let auth = match endpoints.iter().find(|e| e.name == endpoint) {
        Some(ep) => &ep.auth,
        None if cfg.endpoints.kubernetes.is_some() => &Auth::Token {
            issuers: vec![token::BUILTIN.to_owned()],
        },
        None => anyhow::bail!("no endpoint named {endpoint}"),
    };
    match auth {
        Auth::Token { issuers } if issuers.iter().any(|i| i == token::BUILTIN) => {}
        Auth::Token { .. } => anyhow::bail!(
            "endpoint {endpoint} does not trust the built-in issuer; add `{}` to its \
             spec.tokenIssuers",
            token::BUILTIN
        ),
        _ => anyhow::bail!("endpoint {endpoint} does not take tokens (authMode is not token)"),
    }
    let signer = Signer::load(
        &issuer.signing_key_file,
        issuer.issuer.clone(),
        issuer.ttl_seconds,
    )?;
    let token = signer.mint(endpoint, SystemTime::now())?;
    println!("{}", serde_json::to_string(&token)?);
    Ok(())
}

/// Logs go to stderr through [`LogWriter`]'s thread, in batches, so a request never waits
/// on a write syscall for its access-log line; if stderr stalls, lines are dropped and
/// counted rather than waited for. The returned guard writes what is left at exit.
fn init_logs(format: LogFormat) -> Result<logwriter::Flush, String> {
    let gap_format = match format {
        LogFormat::Text => accesslog::Format::Text,
        LogFormat::Json => accesslog::Format::Json,
    };
    let (writer, flush) = LogWriter::spawn(
        std::io::stderr(),
        logwriter::max_pending_from_env()?,
        move |gap| accesslog::gap_line(gap_format, gap),
    );
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
    Ok(flush)
}

async fn serve(config: PathBuf) -> anyhow::Result<()> {
    let (cfg, _) = file::load_all(&config)?;
    let bind = |addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))
    };
    let listeners = Listeners {
        http: match cfg.listen.http {
            Some(a) => Some(bind(a).await?),
            None => None,
        },
        https: match cfg.listen.https {
            Some(a) => Some(bind(a).await?),
            None => None,
        },
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

/// Everything `serve` would refuse at start besides the two files: the certificate and
/// key, the token signing key and JWKS files.
fn check_secrets(cfg: &scorefront::config::RouterConfig) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(tls) = &cfg.tls
        && let Err(e) = LoadedCert::load(&tls.cert_file, &tls.key_file, SystemTime::now())
    {
        errors.push(format!("tls: {e}"));
    }
    if let Some(ti) = &cfg.auth.token_issuer
        && let Err(e) = Signer::load(&ti.signing_key_file, ti.issuer.clone(), ti.ttl_seconds)
    {
        errors.push(format!("auth.tokenIssuer: {e:#}"));
    }
    for o in &cfg.auth.oidc {
        if let Some(path) = &o.jwks_file {
            let checked = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|json| token::jwk::parse_jwks(&json));
            if let Err(e) = checked {
                errors.push(format!("auth.oidc {}: {}: {e}", o.name, path.display()));
            }
        }
    }
    errors
}

fn check_config(config: PathBuf) -> ExitCode {
    // Every error at once: the certificate and keys are checked even when the endpoints
    // file has errors of its own.
    let loaded = scorefront::config::RouterConfig::load(&config)
        .map_err(|e| vec![format!("{e:#}")])
        .and_then(|cfg| {
            let mut errors = check_secrets(&cfg);
            match file::load_endpoints_for(&cfg) {
                Ok(endpoints) if errors.is_empty() => return Ok((cfg, endpoints)),
                Ok(_) => {}
                Err(more) => errors.extend(more),
            }
            Err(errors)
        });
    match loaded {
        Ok((ref cfg, _)) if let Some(k) = &cfg.endpoints.kubernetes => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(kubernetes::client_config(k)) {
                Ok(kc) => {
                    let namespaces = if k.namespaces.is_empty() {
                        "every namespace".to_owned()
                    } else {
                        format!("namespaces {}", k.namespaces.join(", "))
                    };
                    println!(
                        "ok: ScoringEndpoints from {namespaces} through the API server at {}",
                        kc.cluster_url
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    eprintln!("1 error(s) found");
                    ExitCode::FAILURE
                }
            }
        }
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
                cfg.endpoints
                    .file
                    .as_deref()
                    .unwrap_or_else(|| "".as_ref())
                    .display()
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
