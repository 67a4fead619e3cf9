//! Where endpoints come from, and how they become routing tables.
//!
//! Sources ([`file`], [`kubernetes`], local [`process`] replicas) send [`index::Event`]s to
//! the [`index::Index`], which folds them into its state and publishes tables into the
//! proxy.

pub mod file;
mod guard;
pub mod index;
pub mod kubernetes;
pub mod process;

use crate::{config::AuthConfig, spec};

/// The token issuers `cfg` configures, by the names endpoints use for them.
pub fn known_issuers(cfg: &AuthConfig) -> Vec<String> {
    let builtin = cfg
        .token_issuer
        .as_ref()
        .map(|_| spec::BUILTIN_ISSUER.to_owned());
    builtin
        .into_iter()
        .chain(cfg.oidc.iter().map(|o| o.name.clone()))
        .collect()
}

/// An error for each issuer that `ep` trusts and the router config does not configure.
pub fn unknown_issuers<'a>(
    ep: &'a spec::Endpoint,
    known: &'a [String],
) -> impl Iterator<Item = spec::SpecError> + 'a {
    let trusted = match &ep.auth {
        spec::Auth::Token { issuers } => issuers.as_slice(),
        _ => &[],
    };
    trusted
        .iter()
        .filter(|name| !known.contains(name))
        .map(move |name| spec::SpecError {
            field: "spec.tokenIssuers".into(),
            message: format!(
                "`{name}` is not configured in the router config (configured: {}); `{}` \
                 needs auth.tokenIssuer, others auth.oidc",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                },
                spec::BUILTIN_ISSUER,
            ),
        })
}
