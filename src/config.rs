//! Router settings: the YAML file given to `scorefront serve --config`.
//!
//! ```yaml
//! listen:
//!   http: 127.0.0.1:8080      # data plane (HTTP/1.1 and h2c)
//!   admin: 127.0.0.1:9090     # /healthz /readyz /metrics
//! endpoints:
//!   file: endpoints.yaml      # relative to this file
//! maxRequestBodyBytes: 104857600
//! shutdownGracePeriodSeconds: 30
//! reloadIntervalMs: 1000
//! upstream:
//!   connectTimeoutMs: 3000    # then the request is retried on another replica, or 502
//!   idleTimeoutMs: 1000       # pooled replica connections idle longer are not reused
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use serde::Deserialize;

use crate::proxy::DEFAULT_MAX_BODY;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterConfig {
    #[serde(default)]
    pub listen: Listen,
    pub endpoints: EndpointsSource,
    /// Larger request bodies get 413. Default 100 MiB.
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: u64,
    /// How long in-flight requests may take to finish after SIGTERM. Default 30.
    #[serde(default = "default_grace")]
    pub shutdown_grace_period_seconds: u64,
    /// How often both files are checked for changes. Default 1000.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
    #[serde(default)]
    pub upstream: UpstreamConfig,
}

/// Connections to replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A replica that has not accepted a connection within this long counts as
    /// unreachable: the request, not yet sent, is retried on another replica. Default 3000.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections to replicas are not reused after this long, so that a
    /// request is never written into a connection the replica is closing (servers
    /// commonly close idle connections after 2 to 5 s). Default 1000.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout_ms: default_connect_ms(),
            idle_timeout_ms: default_idle_ms(),
        }
    }
}

impl UpstreamConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listen {
    /// Data plane address. Default `0.0.0.0:8080`.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// Admin address (health, readiness, metrics). Default `0.0.0.0:9090`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointsSource {
    /// The endpoints file; a relative path is relative to the router config file.
    pub file: PathBuf,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: default_http(),
            admin: default_admin(),
        }
    }
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn default_max_body() -> u64 {
    DEFAULT_MAX_BODY
}
fn default_grace() -> u64 {
    30
}
fn default_reload_ms() -> u64 {
    1000
}
fn default_connect_ms() -> u64 {
    3000
}
fn default_idle_ms() -> u64 {
    1000
}

impl RouterConfig {
    /// Reads and checks the router config; the endpoints path comes back absolute.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read router config {}", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let mut cfg: RouterConfig = serde_yaml_ng::from_str(text)
            .with_context(|| format!("{}: invalid router config", path.display()))?;
        for (field, value) in [
            ("reloadIntervalMs", cfg.reload_interval_ms),
            ("upstream.connectTimeoutMs", cfg.upstream.connect_timeout_ms),
        ] {
            if value == 0 {
                anyhow::bail!("{}: {field} must be at least 1", path.display());
            }
        }
        if cfg.endpoints.file.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            cfg.endpoints.file = base.join(&cfg.endpoints.file);
        }
        Ok(cfg)
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_period_seconds)
    }

    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let cfg = RouterConfig::parse(
            "endpoints: {file: eps.yaml}",
            Path::new("/etc/sf/router.yaml"),
        )
        .unwrap();
        assert_eq!(cfg.endpoints.file, Path::new("/etc/sf/eps.yaml"));
        assert_eq!(cfg.max_request_body_bytes, 100 * 1024 * 1024);
        assert_eq!(cfg.grace_period(), Duration::from_secs(30));
        assert_eq!(cfg.listen.http.port(), 8080);
        let err = RouterConfig::parse(
            "endpoints: {file: x}\nlisten: {htp: 1}",
            Path::new("r.yaml"),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `htp`"),
            "{err:#}"
        );
    }
}
