//! scorefront: a high-performance inference front-end router.
//!
//! Layout: [`proxy`] is the data plane (one request top to bottom); [`discovery`] turns
//! endpoint sources into routing tables; [`server`] owns listeners and the admin port;
//! [`autoscale`] sets replica counts from demand; [`app`] wires them together and runs the
//! lifecycle.

pub mod accesslog;
pub mod app;
pub mod autoscale;
pub mod config;
pub mod discovery;
pub mod error;
pub mod gate;
pub mod logwriter;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod spec;
pub mod token;

/// Resolves once `flag` is true (or its sender is gone). Shutdown signals are
/// `watch<bool>` channels so that tests and the app drive them the same way.
pub(crate) async fn until_true(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
