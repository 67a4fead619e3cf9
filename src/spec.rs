//! The `ScoringEndpoint` schema (`scorefront.io/v1`), shared by the endpoints file and,
//! later, the Kubernetes custom resource, and its validation.
//!
//! [`EndpointDocument`] is what users write; [`validate`] turns it into an [`Endpoint`] with
//! every default of DESIGN.md 1.4 applied, or into the full list of [`SpecError`]s, each
//! naming the field at fault. Nothing downstream ever sees an unvalidated spec.

use std::{fmt, net::SocketAddr, time::Duration};

use serde::Deserialize;

pub const API_VERSION: &str = "scorefront.io/v1";
pub const KIND: &str = "ScoringEndpoint";

/// At most this many versions per endpoint, as in azureml.
pub const MAX_VERSIONS: usize = 6;
/// Upper bound of `scoringTimeoutMs`.
pub const MAX_SCORING_TIMEOUT_MS: u64 = 300_000;
/// Keys shorter than this are refused: they would be guessable.
pub const MIN_KEY_LEN: usize = 16;

/// One YAML document of the endpoints file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointDocument {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: EndpointSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    #[serde(default)]
    pub auth_mode: AuthMode,
    #[serde(default)]
    pub keys: Option<KeysSpec>,
    /// With `authMode: token`: the issuers whose tokens are accepted, by name (the built-in
    /// issuer is `scorefront`, OIDC issuers go by their `auth.oidc` name in the router
    /// config). Default: the built-in issuer only.
    #[serde(default)]
    pub token_issuers: Option<Vec<String>>,
    #[serde(default)]
    pub versions: Vec<VersionSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Key,
    Token,
    None,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeysSpec {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VersionSpec {
    pub name: String,
    pub traffic_percentile: Option<u32>,
    pub is_default: Option<bool>,
    pub role: Option<Role>,
    pub max_concurrent_requests_per_container: Option<u32>,
    pub max_request_wait_time_ms: Option<u64>,
    pub max_pending_requests: Option<u32>,
    pub scoring_timeout_ms: Option<u64>,
    /// Fixed replica addresses, `IP:port`.
    pub replicas: Option<Vec<String>>,
    /// A command template with `{port}`; scorefront runs `replicaCount` copies of it.
    pub command: Option<String>,
    pub replica_count: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Control,
    #[default]
    Treatment,
}

/// A validated scoring endpoint: what the router routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub auth: Auth,
    /// In the order written; exactly one has `is_default` unless the list is empty.
    pub versions: Vec<Version>,
}

/// How an endpoint's callers prove who they are.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Key {
        primary: String,
        secondary: Option<String>,
    },
    /// JWTs from the named issuers (checked against the router's issuers by
    /// [`crate::token::Verifier`]).
    Token {
        issuers: Vec<String>,
    },
}

impl fmt::Debug for Auth {
    // Never print keys, not even in debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Token { issuers } => write!(f, "Token {{ issuers: {issuers:?} }}"),
            Auth::Key { secondary, .. } => write!(
                f,
                "Key {{ primary: <redacted>, secondary: {} }}",
                if secondary.is_some() {
                    "<redacted>"
                } else {
                    "None"
                }
            ),
        }
    }
}

/// A validated model version with every default applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub name: String,
    pub traffic_percentile: u32,
    pub is_default: bool,
    pub role: Role,
    pub slots_per_replica: u32,
    pub max_wait: Duration,
    /// `None`: 2 x slots x replicas, recomputed as replicas come and go.
    pub max_pending: Option<usize>,
    pub scoring_timeout: Duration,
    pub replicas: ReplicaSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReplicaSource {
    /// Addresses the operator runs; always considered ready.
    Fixed(Vec<SocketAddr>),
    /// Local processes scorefront starts, probes, restarts and stops.
    Command { template: String, count: u32 },
}

/// One problem with a spec, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// Dotted path of the field, e.g. `spec.versions[1].trafficPercentile`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Whether `name` is a valid endpoint or version name (a DNS label).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty() && b.len() <= 63 && edge(&b[0]) && edge(&b[b.len() - 1]) && b.iter().all(inner)
}

const NAME_RULE: &str = "must be 1-63 characters of a-z, 0-9 and '-', starting and ending \
                         with a letter or digit";

/// Validates a document, returning every error found (not just the first).
pub fn validate(doc: &EndpointDocument) -> Result<Endpoint, Vec<SpecError>> {
    let mut errs = Errors::default();
    if doc.api_version != API_VERSION {
        errs.push(
            "apiVersion",
            format!("must be '{API_VERSION}', not '{}'", doc.api_version),
        );
    }
    if doc.kind != KIND {
        errs.push("kind", format!("must be '{KIND}', not '{}'", doc.kind));
    }
    if !valid_name(&doc.metadata.name) {
        errs.push(
            "metadata.name",
            format!("'{}' {NAME_RULE}", doc.metadata.name),
        );
    }
    let auth = validate_auth(&doc.spec, &mut errs);
    let versions = validate_versions(&doc.spec.versions, &mut errs);
    errs.finish(Endpoint {
        name: doc.metadata.name.clone(),
        auth,
        versions,
    })
}

fn validate_auth(spec: &EndpointSpec, errs: &mut Errors) -> Auth {
    let keys = spec.keys.clone().unwrap_or_default();
    if spec.auth_mode != AuthMode::Token && spec.token_issuers.is_some() {
        errs.push(
            "spec.tokenIssuers",
            "tokenIssuers is set but authMode is not token; remove it or set authMode: token",
        );
    }
    match spec.auth_mode {
        AuthMode::Token => {
            if keys.primary_key.is_some() || keys.secondary_key.is_some() {
                errs.push(
                    "spec.keys",
                    "keys are set but authMode is token (key and token are exclusive); \
                     remove them or set authMode: key",
                );
            }
            let issuers = spec
                .token_issuers
                .clone()
                .unwrap_or_else(|| vec![crate::token::BUILTIN.to_owned()]);
            if issuers.is_empty() {
                errs.push(
                    "spec.tokenIssuers",
                    "lists no issuer, so no token could pass; name at least one",
                );
            }
            Auth::Token { issuers }
        }
        AuthMode::None => {
            if keys.primary_key.is_some() || keys.secondary_key.is_some() {
                errs.push(
                    "spec.keys",
                    "keys are set but authMode is none; remove them or set authMode: key",
                );
            }
            Auth::None
        }
        AuthMode::Key => {
            let Some(primary) = keys.primary_key else {
                errs.push(
                    "spec.keys.primaryKey",
                    "authMode is key (the default) but no key is set; add \
                     'keys: {primaryKey: ..., secondaryKey: ...}' to the spec (run \
                     'scorefront keys' for a fresh random pair) or set 'authMode: none'",
                );
                return Auth::None;
            };
            for (field, key) in [
                ("spec.keys.primaryKey", Some(&primary)),
                ("spec.keys.secondaryKey", keys.secondary_key.as_ref()),
            ] {
                if let Some(key) = key {
                    check_key(field, key, errs);
                }
            }
            Auth::Key {
                primary,
                secondary: keys.secondary_key,
            }
        }
    }
}

fn check_key(field: &str, key: &str, errs: &mut Errors) {
    if key.len() < MIN_KEY_LEN {
        errs.push(
            field,
            format!("a key must be at least {MIN_KEY_LEN} characters ('scorefront keys' makes good ones)"),
        );
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        errs.push(field, "a key must be printable ASCII without spaces");
    }
}

fn validate_versions(specs: &[VersionSpec], errs: &mut Errors) -> Vec<Version> {
    if specs.len() > MAX_VERSIONS {
        errs.push(
            "spec.versions",
            format!(
                "{} versions; at most {MAX_VERSIONS} are allowed",
                specs.len()
            ),
        );
    }
    let mut versions: Vec<Version> = specs
        .iter()
        .enumerate()
        .map(|(i, v)| validate_version(&format!("spec.versions[{i}]"), v, errs))
        .collect();

    for (i, v) in versions.iter().enumerate() {
        if versions[..i].iter().any(|w| w.name == v.name) {
            errs.push(
                format!("spec.versions[{i}].name"),
                format!("'{}' is used by an earlier version", v.name),
            );
        }
    }
    let total: u32 = versions.iter().map(|v| v.traffic_percentile).sum();
    if total > 100 {
        errs.push(
            "spec.versions",
            format!("trafficPercentile values add up to {total}; at most 100 is allowed"),
        );
    }
    let defaults: Vec<usize> = specs
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_default == Some(true))
        .map(|(i, _)| i)
        .collect();
    match defaults.as_slice() {
        [] => {
            if let Some(first) = versions.first_mut() {
                first.is_default = true;
            }
        }
        [_] => {}
        many => errs.push(
            "spec.versions",
            format!("versions {many:?} all say isDefault: true; exactly one may"),
        ),
    }
    let controls = versions.iter().filter(|v| v.role == Role::Control).count();
    if controls > 1 {
        errs.push(
            "spec.versions",
            format!("{controls} versions have role: control; at most one may"),
        );
    }
    versions
}

fn validate_version(path: &str, v: &VersionSpec, errs: &mut Errors) -> Version {
    let field = |name: &str| format!("{path}.{name}");
    if !valid_name(&v.name) {
        errs.push(field("name"), format!("'{}' {NAME_RULE}", v.name));
    }
    let traffic_percentile = v.traffic_percentile.unwrap_or(0);
    if traffic_percentile > 100 {
        errs.push(
            field("trafficPercentile"),
            format!("{traffic_percentile} is not within 0..=100"),
        );
    }
    let slots_per_replica = v.max_concurrent_requests_per_container.unwrap_or(1);
    if !(1..=10_000).contains(&slots_per_replica) {
        errs.push(
            field("maxConcurrentRequestsPerContainer"),
            format!("{slots_per_replica} is not within 1..=10000"),
        );
    }
    let max_wait_ms = v.max_request_wait_time_ms.unwrap_or(500);
    if max_wait_ms > MAX_SCORING_TIMEOUT_MS {
        errs.push(
            field("maxRequestWaitTimeMs"),
            format!("{max_wait_ms} is over the maximum of {MAX_SCORING_TIMEOUT_MS}"),
        );
    }
    let timeout_ms = v.scoring_timeout_ms.unwrap_or(60_000);
    if !(1..=MAX_SCORING_TIMEOUT_MS).contains(&timeout_ms) {
        errs.push(
            field("scoringTimeoutMs"),
            format!("{timeout_ms} is not within 1..={MAX_SCORING_TIMEOUT_MS}"),
        );
    }
    let replicas = validate_replicas(path, v, errs);
    Version {
        name: v.name.clone(),
        traffic_percentile,
        is_default: v.is_default.unwrap_or(false),
        role: v.role.unwrap_or_default(),
        slots_per_replica,
        max_wait: Duration::from_millis(max_wait_ms),
        max_pending: v.max_pending_requests.map(|n| n as usize),
        scoring_timeout: Duration::from_millis(timeout_ms),
        replicas,
    }
}

/// Placeholder a command template must contain.
pub const PORT_PLACEHOLDER: &str = "{port}";
/// Upper bound of `replicaCount`.
pub const MAX_REPLICA_COUNT: u32 = 100;

fn validate_replicas(path: &str, v: &VersionSpec, errs: &mut Errors) -> ReplicaSource {
    let field = |name: &str| format!("{path}.{name}");
    match (&v.replicas, &v.command) {
        (Some(_), Some(_)) => {
            errs.push(
                path,
                "give either 'replicas' (fixed addresses) or 'command' (local processes), not both",
            );
            ReplicaSource::Fixed(Vec::new())
        }
        (None, None) => {
            errs.push(
                path,
                "no replicas: give 'replicas: [\"127.0.0.1:5001\"]' or 'command' with 'replicaCount'",
            );
            ReplicaSource::Fixed(Vec::new())
        }
        (Some(list), None) => {
            if v.replica_count.is_some() {
                errs.push(
                    field("replicaCount"),
                    "goes with 'command'; with fixed 'replicas' the list is the count",
                );
            }
            if list.is_empty() {
                errs.push(field("replicas"), "the list is empty");
            }
            let mut addrs = Vec::with_capacity(list.len());
            for (i, a) in list.iter().enumerate() {
                match a.parse::<SocketAddr>() {
                    Ok(addr) if addrs.contains(&addr) => errs.push(
                        format!("{path}.replicas[{i}]"),
                        format!("'{a}' is listed twice"),
                    ),
                    Ok(addr) => addrs.push(addr),
                    Err(_) => errs.push(
                        format!("{path}.replicas[{i}]"),
                        format!("'{a}' is not an IP:port address such as 127.0.0.1:5001"),
                    ),
                }
            }
            ReplicaSource::Fixed(addrs)
        }
        (None, Some(template)) => {
            if !template.contains(PORT_PLACEHOLDER) {
                errs.push(
                    field("command"),
                    format!("must contain {PORT_PLACEHOLDER}, where the replica's port goes"),
                );
            }
            let count = match v.replica_count {
                Some(n) if (1..=MAX_REPLICA_COUNT).contains(&n) => n,
                Some(n) => {
                    errs.push(
                        field("replicaCount"),
                        format!("{n} is not within 1..={MAX_REPLICA_COUNT}"),
                    );
                    1
                }
                None => {
                    errs.push(field("replicaCount"), "is required with 'command'");
                    1
                }
            };
            ReplicaSource::Command {
                template: template.clone(),
                count,
            }
        }
    }
}

#[derive(Default)]
struct Errors(Vec<SpecError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(SpecError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<SpecError>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> EndpointDocument {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const BASE: &str = "
apiVersion: scorefront.io/v1
kind: ScoringEndpoint
metadata: {name: fraud}
spec:
  keys: {primaryKey: aaaaaaaaaaaaaaaaaaaa}
  versions:
";

    fn errors(versions: &str) -> Vec<String> {
        let d = doc(&format!("{BASE}{versions}"));
        validate(&d)
            .unwrap_err()
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn defaults_are_azureml_defaults() {
        let d = doc(&format!(
            "{BASE}  - {{name: blue, replicas: ['127.0.0.1:5001']}}\n"
        ));
        let ep = validate(&d).unwrap();
        let v = &ep.versions[0];
        assert!(v.is_default, "the first version is the default");
        assert_eq!(v.traffic_percentile, 0);
        assert_eq!(v.role, Role::Treatment);
        assert_eq!(v.slots_per_replica, 1);
        assert_eq!(v.max_wait, Duration::from_millis(500));
        assert_eq!(v.max_pending, None);
        assert_eq!(v.scoring_timeout, Duration::from_millis(60_000));
    }

    #[test]
    fn every_error_is_reported_with_its_field() {
        let errs = errors(
            "  - {name: Blue, trafficPercentile: 70, isDefault: true, role: control, replicas: ['x']}
  - {name: green, trafficPercentile: 40, isDefault: true, role: control, command: run}
",
        );
        let want = [
            "spec.versions[0].name: 'Blue'",
            "spec.versions[0].replicas[0]: 'x' is not an IP:port",
            "spec.versions[1].command: must contain {port}",
            "spec.versions[1].replicaCount: is required",
            "spec.versions: trafficPercentile values add up to 110",
            "spec.versions: versions [0, 1] all say isDefault",
            "spec.versions: 2 versions have role: control",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "missing {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }

    #[test]
    fn key_mode_without_keys_says_how_to_fix_it() {
        let d = doc("
apiVersion: scorefront.io/v1
kind: ScoringEndpoint
metadata: {name: fraud}
spec:
  versions: [{name: blue, replicas: ['127.0.0.1:1']}]
");
        let errs = validate(&d).unwrap_err();
        assert_eq!(errs[0].field, "spec.keys.primaryKey");
        assert!(
            errs[0].message.contains("scorefront keys"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn names_follow_dns_label_rules() {
        for ok in ["a", "blue", "v-2", "0x"] {
            assert!(valid_name(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", long.as_str()] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn too_many_versions_and_bad_timeouts_are_rejected() {
        let mut v = String::new();
        for i in 0..7 {
            v += &format!("  - {{name: v{i}, replicas: ['127.0.0.1:{}']}}\n", 5000 + i);
        }
        assert!(errors(&v).iter().any(|e| e.contains("at most 6")));
        let errs = errors("  - {name: a, scoringTimeoutMs: 300001, replicas: ['127.0.0.1:1']}\n");
        assert!(
            errs[0].starts_with("spec.versions[0].scoringTimeoutMs"),
            "{errs:?}"
        );
    }
}
