//! The `ScoringEndpoint` schema (`scorefront.io/v1`), shared by the endpoints file and the
//! Kubernetes custom resource, and its validation.
//!
//! [`EndpointSpec`] is what users write, in a file document ([`EndpointDocument`]) or in a
//! [`ScoringEndpoint`] object; the CRD is generated from these types, so the file and the
//! cluster cannot drift apart. [`validate`] turns a spec into an [`Endpoint`] with every
//! default of DESIGN.md 1.4 applied, or into the full list of [`SpecError`]s, each naming
//! the field at fault. Where the spec came from ([`Origin`]) decides which fields it may
//! use: addresses, commands and inline keys in a file; Services and a key Secret in a
//! cluster. Nothing downstream ever sees an unvalidated spec.
//!
//! This module is schema only: it knows no runtime.

use std::{fmt, net::SocketAddr, ops::RangeInclusive, time::Duration};

use k8s_openapi::apimachinery::pkg::{apis::meta::v1::Condition, util::intstr::IntOrString};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "scorefront.io/v1";
pub const KIND: &str = "ScoringEndpoint";

/// At most this many versions per endpoint, as in azureml.
pub const MAX_VERSIONS: usize = 6;
/// Upper bound of `scoringTimeoutMs`.
pub const MAX_SCORING_TIMEOUT_MS: u64 = 300_000;
/// Keys shorter than this are refused: they would be guessable.
pub const MIN_KEY_LEN: usize = 16;
/// The name endpoints use in `tokenIssuers` for the router's built-in token issuer.
pub const BUILTIN_ISSUER: &str = "scorefront";
/// Endpoint and version names: DNS labels.
pub const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

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

/// A scoring endpoint: up to six model versions behind one name, with a traffic split.
#[derive(CustomResource, KubeSchema, Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[kube(
    group = "scorefront.io",
    version = "v1",
    kind = "ScoringEndpoint",
    namespaced,
    status = "ScoringEndpointStatus",
    shortname = "se",
    doc = "A scoring endpoint served by scorefront at /api/v1/endpoint/{name}/: up to six \
           model versions, each the ready pods of a Service, with a weighted traffic split.",
    printcolumn(name = "Versions", type_ = "string", json_path = ".status.traffic"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$')")
        .message("the name is the {name} of the scoring URL: 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit")
)]
#[x_kube(
    validation = Rule::new(
        "!has(self.versions) || self.versions.map(v, has(v.trafficPercentile) ? v.trafficPercentile : 0).sum() <= 100"
    ).message("trafficPercentile values must add up to at most 100"),
    validation = Rule::new(
        "!has(self.versions) || self.versions.filter(v, has(v.isDefault) && v.isDefault).size() <= 1"
    ).message("at most one version may say isDefault: true (without one, the first version is the default)"),
    validation = Rule::new(
        "!has(self.versions) || self.versions.filter(v, has(v.role) && v.role == 'control').size() <= 1"
    ).message("at most one version may have role: control"),
    validation = Rule::new(
        "!has(self.versions) || self.versions.all(v, self.versions.exists_one(w, w.name == v.name))"
    ).message("version names must be unique"),
    validation = Rule::new("!has(self.keys)")
        .message("keys never sit in the resource: put them in a Secret and name it in keysSecret"),
    validation = Rule::new("(has(self.authMode) && self.authMode != 'key') || has(self.keysSecret)")
        .message("authMode key (the default) needs keysSecret, the Secret holding primaryKey and secondaryKey"),
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    /// How callers authenticate: `key` (default; `Authorization: Bearer <key>`), `token`
    /// (JWTs) or `none`.
    #[serde(default)]
    pub auth_mode: AuthMode,
    /// Endpoints file only: the keys inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeysSpec>,
    /// Cluster only: the Secret in this namespace holding `primaryKey` and `secondaryKey`.
    /// It must carry the label `scorefront.io/keys` (the router watches only such Secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_secret: Option<String>,
    /// With `authMode: token`: the issuers whose tokens are accepted, by name (the built-in
    /// issuer is `scorefront`, OIDC issuers go by their `auth.oidc` name in the router
    /// config). Default: the built-in issuer only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_issuers: Option<Vec<String>>,
    /// The model versions, at most 6, keyed by name (so server-side apply merges them
    /// one by one).
    #[serde(default)]
    #[schemars(length(max = 6))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub versions: Vec<VersionSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Key,
    Token,
    None,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeysSpec {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
}

/// One model version.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VersionSpec {
    /// The version's name, a DNS label; sent back in `azureml-model-deployment`.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// Share of unpinned traffic, 0-100; the rest goes to the default version. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub traffic_percentile: Option<u32>,
    /// The version that takes the traffic no other version takes. Default: the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_default: Option<bool>,
    /// `control` or `treatment` (default); at most one control.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Role")]
    pub role: Option<Role>,
    /// Requests one replica serves at once. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrent_requests_per_container: Option<u32>,
    /// Longest wait for a free slot before 503. Default 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 300000))]
    pub max_request_wait_time_ms: Option<u64>,
    /// Queue bound, then 429. Default 2 x slots x replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Longest exchange with a replica before 504. Default 60000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300000))]
    pub scoring_timeout_ms: Option<u64>,
    /// Endpoints file only: fixed replica addresses, `IP:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<String>>,
    /// Endpoints file only: a command template with `{port}`; scorefront runs
    /// `replicaCount` copies of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Endpoints file only: how many copies of `command` run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_count: Option<u32>,
    /// Replica autoscaling from how busy the replicas are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSpec>,
    /// Cluster only: the Service (in the endpoint's namespace) whose ready pods, listed in
    /// its EndpointSlices, are this version's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Cluster only: the EndpointSlice port, by name or number. Default: the slice's only
    /// port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// Cluster only: the Deployment that runs these pods, for autoscaling. Default: the
    /// Service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
}

/// How a version's replica count follows demand (DESIGN.md 1.5).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscaleSpec {
    /// Default: true for `command` versions without `replicaCount` and for cluster
    /// versions; a fixed `replicaCount` and autoscaling are exclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub min_replicas: Option<u32>,
    /// Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: Option<u32>,
    /// Percent of the replicas' slots that should be busy (in flight or queued). Default 70.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_utilization: Option<u32>,
    /// How often the replica count is decided. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub refresh_seconds: Option<u32>,
    /// How long lower demand must last before scaling down. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 86400))]
    pub scale_down_delay_seconds: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Control,
    #[default]
    Treatment,
}

/// What the router observed, written by the router.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScoringEndpointStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready replicas of all versions.
    #[serde(default)]
    pub ready_replicas: u32,
    /// The split in force, e.g. `blue=90 green=10`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traffic: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionStatus>,
    /// `Accepted` (the spec is valid and served) and `Ready` (every version has a ready
    /// replica).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionStatus {
    pub name: String,
    /// Pods of the version's Service that are ready and routable.
    pub ready_replicas: u32,
    /// Replicas the autoscaler wants, when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<u32>,
}

/// The `ScoringEndpoint` CustomResourceDefinition as YAML, as `scorefront crd` prints it
/// and `deploy/base/crd.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml =
        serde_yaml_ng::to_string(&ScoringEndpoint::crd()).expect("a CRD always serializes to YAML");
    format!("# Generated by `scorefront crd` from the Rust types; do not edit.\n{yaml}")
}

/// Where a spec comes from, which decides what it may contain.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// The endpoints file: replicas are addresses or commands; keys are inline.
    File,
    /// A `ScoringEndpoint` object in `namespace`: replicas are the pods of Services; keys
    /// are the contents of the Secret that `keysSecret` names, or why they could not be
    /// read.
    Cluster {
        namespace: &'a str,
        keys: Result<&'a KeysSpec, &'a str>,
    },
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
    /// `None`: the replica count is fixed (or not the router's to set).
    pub autoscale: Option<Autoscale>,
}

/// Validated autoscaling settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Autoscale {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Percent, 1..=100.
    pub target_utilization: u32,
    pub refresh: Duration,
    pub scale_down_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReplicaSource {
    /// Addresses the operator runs; always considered ready.
    Fixed(Vec<SocketAddr>),
    /// Local processes scorefront starts, probes, restarts and stops.
    Command { template: String, count: u32 },
    /// The ready pods of a Kubernetes Service, from its EndpointSlices.
    Service(ServiceRef),
}

/// A version's pods in a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub service: String,
    /// The EndpointSlice port; `None`: the slice's only port.
    pub port: Option<PortRef>,
    /// The Deployment that runs the pods.
    pub deployment: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(name) => f.write_str(name),
        }
    }
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

/// Validates an endpoints file document, returning every error found (not just the first).
pub fn validate_document(doc: &EndpointDocument) -> Result<Endpoint, Vec<SpecError>> {
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
    match validate(&doc.metadata.name, &doc.spec, Origin::File) {
        Ok(ep) => errs.finish(ep),
        Err(more) => {
            errs.0.extend(more);
            Err(errs.0)
        }
    }
}

/// Validates the spec of the endpoint `name` from `origin`, returning every error found.
pub fn validate(
    name: &str,
    spec: &EndpointSpec,
    origin: Origin,
) -> Result<Endpoint, Vec<SpecError>> {
    let mut errs = Errors::default();
    if !valid_name(name) {
        errs.push("metadata.name", format!("'{name}' {NAME_RULE}"));
    }
    let auth = validate_auth(spec, origin, &mut errs);
    let versions = validate_versions(&spec.versions, origin, &mut errs);
    errs.finish(Endpoint {
        name: name.to_owned(),
        auth,
        versions,
    })
}

fn validate_auth(spec: &EndpointSpec, origin: Origin, errs: &mut Errors) -> Auth {
    if spec.auth_mode != AuthMode::Token && spec.token_issuers.is_some() {
        errs.push(
            "spec.tokenIssuers",
            "tokenIssuers is set but authMode is not token; remove it or set authMode: token",
        );
    }
    let inline = spec
        .keys
        .as_ref()
        .is_some_and(|k| *k != KeysSpec::default());
    let from_secret = spec.keys_secret.is_some();
    match origin {
        Origin::File if from_secret && spec.auth_mode == AuthMode::Key => errs.push(
            "spec.keysSecret",
            "names a Kubernetes Secret, which only a cluster has; in the endpoints file put \
             the keys inline under 'keys'",
        ),
        Origin::Cluster { .. } if inline && spec.auth_mode == AuthMode::Key => errs.push(
            "spec.keys",
            "keys never sit in the resource (far more people can read it than a Secret): \
             put them in a Secret and name it in keysSecret",
        ),
        _ => {}
    }
    let exclusive = |mode: &str, fix: &str, errs: &mut Errors| {
        for (set, field) in [(inline, "spec.keys"), (from_secret, "spec.keysSecret")] {
            if set {
                errs.push(
                    field,
                    format!("is set but authMode is {mode}; remove it or {fix}"),
                );
            }
        }
    };
    match spec.auth_mode {
        AuthMode::Token => {
            exclusive(
                "token (key and token are exclusive)",
                "set authMode: key",
                errs,
            );
            let issuers = spec
                .token_issuers
                .clone()
                .unwrap_or_else(|| vec![BUILTIN_ISSUER.to_owned()]);
            if issuers.is_empty() {
                errs.push(
                    "spec.tokenIssuers",
                    "lists no issuer, so no token could pass; name at least one",
                );
            }
            Auth::Token { issuers }
        }
        AuthMode::None => {
            exclusive("none", "set authMode: key", errs);
            Auth::None
        }
        AuthMode::Key => {
            let keys = match origin {
                Origin::File => spec.keys.clone().unwrap_or_default(),
                Origin::Cluster { keys, .. } => match (&spec.keys_secret, keys) {
                    (None, _) => {
                        errs.push(
                            "spec.keysSecret",
                            "authMode is key (the default) but no keysSecret is named; create \
                             a Secret with primaryKey and secondaryKey (run 'scorefront keys' \
                             for a fresh pair), label it scorefront.io/keys, and name it here; \
                             or set 'authMode: none'",
                        );
                        return Auth::None;
                    }
                    (Some(_), Ok(keys)) => keys.clone(),
                    (Some(_), Err(why)) => {
                        errs.push("spec.keysSecret", why);
                        return Auth::None;
                    }
                },
            };
            let (primary_field, secondary_field) = match origin {
                Origin::File => ("spec.keys.primaryKey", "spec.keys.secondaryKey"),
                Origin::Cluster { .. } => ("spec.keysSecret", "spec.keysSecret"),
            };
            let Some(primary) = keys.primary_key else {
                errs.push(
                    primary_field,
                    match origin {
                        Origin::File => {
                            "authMode is key (the default) but no key is set; add 'keys: \
                             {primaryKey: ..., secondaryKey: ...}' to the spec (run \
                             'scorefront keys' for a fresh random pair) or set 'authMode: none'"
                        }
                        Origin::Cluster { .. } => "the Secret has no primaryKey",
                    },
                );
                return Auth::None;
            };
            for (field, which, key) in [
                (primary_field, "primaryKey", Some(&primary)),
                (secondary_field, "secondaryKey", keys.secondary_key.as_ref()),
            ] {
                if let Some(key) = key {
                    check_key(field, which, key, errs);
                }
            }
            Auth::Key {
                primary,
                secondary: keys.secondary_key,
            }
        }
    }
}

fn check_key(field: &str, which: &str, key: &str, errs: &mut Errors) {
    if key.len() < MIN_KEY_LEN {
        errs.push(
            field,
            format!(
                "{which}: a key must be at least {MIN_KEY_LEN} characters ('scorefront keys' \
                 makes good ones)"
            ),
        );
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        errs.push(
            field,
            format!("{which}: a key must be printable ASCII without spaces"),
        );
    }
}

fn validate_versions(specs: &[VersionSpec], origin: Origin, errs: &mut Errors) -> Vec<Version> {
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
        .map(|(i, v)| validate_version(&format!("spec.versions[{i}]"), v, origin, errs))
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

fn validate_version(path: &str, v: &VersionSpec, origin: Origin, errs: &mut Errors) -> Version {
    let field = |name: &str| format!("{path}.{name}");
    if !valid_name(&v.name) {
        errs.push(field("name"), format!("'{}' {NAME_RULE}", v.name));
    }
    let traffic_percentile = v.traffic_percentile.unwrap_or(0);
    errs.within(field("trafficPercentile"), traffic_percentile, 0..=100);
    let slots_per_replica = v.max_concurrent_requests_per_container.unwrap_or(1);
    errs.within(
        field("maxConcurrentRequestsPerContainer"),
        slots_per_replica,
        1..=10_000,
    );
    let max_wait_ms = v.max_request_wait_time_ms.unwrap_or(500);
    if max_wait_ms > MAX_SCORING_TIMEOUT_MS {
        errs.push(
            field("maxRequestWaitTimeMs"),
            format!("{max_wait_ms} is over the maximum of {MAX_SCORING_TIMEOUT_MS}"),
        );
    }
    let timeout_ms = v.scoring_timeout_ms.unwrap_or(60_000);
    errs.within(
        field("scoringTimeoutMs"),
        timeout_ms,
        1..=MAX_SCORING_TIMEOUT_MS,
    );
    let replicas = match origin {
        Origin::File => validate_replicas(path, v, errs),
        Origin::Cluster { namespace, .. } => validate_service(path, v, namespace, errs),
    };
    let autoscale = validate_autoscale(path, v, &replicas, errs);
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
        autoscale,
    }
}

fn validate_autoscale(
    path: &str,
    v: &VersionSpec,
    replicas: &ReplicaSource,
    errs: &mut Errors,
) -> Option<Autoscale> {
    let field = |name: &str| format!("{path}.autoscale.{name}");
    let spec = v.autoscale.clone().unwrap_or_default();
    let scalable = match replicas {
        ReplicaSource::Fixed(_) => false,
        ReplicaSource::Command { .. } => v.replica_count.is_none(),
        ReplicaSource::Service(_) => true,
    };
    match (spec.enabled, replicas) {
        (Some(true), ReplicaSource::Fixed(_)) => errs.push(
            field("enabled"),
            "fixed 'replicas' addresses cannot be scaled; give 'command' instead, or remove \
             autoscale",
        ),
        (Some(true), ReplicaSource::Command { .. }) if v.replica_count.is_some() => errs.push(
            field("enabled"),
            format!(
                "a fixed {path}.replicaCount and autoscaling are exclusive (as in azureml); \
                 remove replicaCount or set autoscale.enabled: false"
            ),
        ),
        (Some(false), ReplicaSource::Command { .. }) if v.replica_count.is_none() => errs.push(
            format!("{path}.replicaCount"),
            "is required with 'command' when autoscale.enabled is false",
        ),
        _ => {}
    }
    let min = spec.min_replicas.unwrap_or(1);
    let max = spec.max_replicas.unwrap_or(10);
    let limit = match replicas {
        ReplicaSource::Command { .. } => MAX_REPLICA_COUNT,
        _ => 1000,
    };
    errs.within(field("maxReplicas"), max, 1..=limit);
    if min > max {
        errs.push(
            field("minReplicas"),
            format!("{min} is above maxReplicas ({max})"),
        );
    }
    let target = spec.target_utilization.unwrap_or(70);
    errs.within(field("targetUtilization"), target, 1..=100);
    let refresh = spec.refresh_seconds.unwrap_or(1);
    errs.within(field("refreshSeconds"), refresh, 1..=3600);
    let delay = spec.scale_down_delay_seconds.unwrap_or(60);
    if delay > 86_400 {
        errs.push(
            field("scaleDownDelaySeconds"),
            format!("{delay} is over a day (86400)"),
        );
    }
    spec.enabled.unwrap_or(scalable).then_some(Autoscale {
        min_replicas: min,
        max_replicas: max,
        target_utilization: target,
        refresh: Duration::from_secs(refresh.into()),
        scale_down_delay: Duration::from_secs(delay.into()),
    })
}

/// Placeholder a command template must contain.
pub const PORT_PLACEHOLDER: &str = "{port}";
/// Upper bound of `replicaCount`.
pub const MAX_REPLICA_COUNT: u32 = 100;

fn validate_replicas(path: &str, v: &VersionSpec, errs: &mut Errors) -> ReplicaSource {
    let field = |name: &str| format!("{path}.{name}");
    for (set, name) in [
        (v.service.is_some(), "service"),
        (v.port.is_some(), "port"),
        (v.deployment.is_some(), "deployment"),
    ] {
        if set {
            errs.push(
                field(name),
                "is for a ScoringEndpoint in a cluster; in the endpoints file give 'replicas' \
                 or 'command'",
            );
        }
    }
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
                // Autoscaled: the autoscaler sets the count, from minReplicas.
                None => v
                    .autoscale
                    .as_ref()
                    .and_then(|a| a.min_replicas)
                    .unwrap_or(1),
            };
            ReplicaSource::Command {
                template: template.clone(),
                count,
            }
        }
    }
}

fn validate_service(
    path: &str,
    v: &VersionSpec,
    namespace: &str,
    errs: &mut Errors,
) -> ReplicaSource {
    let field = |name: &str| format!("{path}.{name}");
    for (set, name) in [
        (v.replicas.is_some(), "replicas"),
        (v.command.is_some(), "command"),
        (v.replica_count.is_some(), "replicaCount"),
    ] {
        if set {
            errs.push(
                field(name),
                "is for the endpoints file; in a cluster a version's replicas are the ready \
                 pods of its 'service'",
            );
        }
    }
    let service = match &v.service {
        Some(s) if valid_name(s) => s.clone(),
        Some(s) => {
            errs.push(field("service"), format!("'{s}' {NAME_RULE}"));
            s.clone()
        }
        None => {
            errs.push(
                field("service"),
                "is required: the Service whose ready pods are this version's replicas",
            );
            String::new()
        }
    };
    let port = match &v.port {
        None => None,
        Some(IntOrString::Int(n)) => match u16::try_from(*n) {
            Ok(n) if n > 0 => Some(PortRef::Number(n)),
            _ => {
                errs.push(field("port"), format!("{n} is not within 1..=65535"));
                None
            }
        },
        Some(IntOrString::String(name)) if name.is_empty() => {
            errs.push(field("port"), "is empty; give a port name or number");
            None
        }
        Some(IntOrString::String(name)) => Some(PortRef::Name(name.clone())),
    };
    let deployment = v.deployment.clone().unwrap_or_else(|| service.clone());
    // A deployment defaulted from a missing or bad service is that service's error, said
    // once above; only one the spec names is checked here.
    if v.deployment.is_some() && !valid_name(&deployment) {
        errs.push(field("deployment"), format!("'{deployment}' {NAME_RULE}"));
    }
    ReplicaSource::Service(ServiceRef {
        namespace: namespace.to_owned(),
        service,
        port,
        deployment,
    })
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

    /// Pushes "`value` is not within `lo..=hi`" for `field` when it is not.
    fn within<T: PartialOrd + fmt::Display>(
        &mut self,
        field: String,
        value: T,
        range: RangeInclusive<T>,
    ) {
        if !range.contains(&value) {
            let (lo, hi) = range.into_inner();
            self.push(field, format!("{value} is not within {lo}..={hi}"));
        }
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
        validate_document(&d)
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
        let ep = validate_document(&d).unwrap();
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
        let errs = validate_document(&d).unwrap_err();
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

    fn cluster_spec(yaml: &str) -> EndpointSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn in_cluster(
        spec: &EndpointSpec,
        keys: Result<&KeysSpec, &str>,
    ) -> Result<Endpoint, Vec<String>> {
        let origin = Origin::Cluster {
            namespace: "models",
            keys,
        };
        validate("fraud", spec, origin).map_err(|e| e.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn a_cluster_version_is_a_service_and_keys_come_from_the_secret() {
        let spec = cluster_spec(
            "keysSecret: fraud-keys
versions:
  - {name: blue, service: fraud-blue, port: http, trafficPercentile: 90}
  - {name: green, service: fraud-green, port: 5001, deployment: green-model}
",
        );
        let keys = KeysSpec {
            primary_key: Some("p".repeat(20)),
            secondary_key: Some("s".repeat(20)),
        };
        let ep = in_cluster(&spec, Ok(&keys)).unwrap();
        assert_eq!(
            ep.auth,
            Auth::Key {
                primary: "p".repeat(20),
                secondary: Some("s".repeat(20))
            }
        );
        assert_eq!(
            ep.versions[0].replicas,
            ReplicaSource::Service(ServiceRef {
                namespace: "models".into(),
                service: "fraud-blue".into(),
                port: Some(PortRef::Name("http".into())),
                deployment: "fraud-blue".into(),
            })
        );
        let ReplicaSource::Service(green) = &ep.versions[1].replicas else {
            panic!("{:?}", ep.versions[1].replicas)
        };
        assert_eq!(green.port, Some(PortRef::Number(5001)));
        assert_eq!(green.deployment, "green-model");
    }

    #[test]
    fn file_and_cluster_fields_do_not_mix() {
        let spec = cluster_spec(
            "keys: {primaryKey: aaaaaaaaaaaaaaaaaaaa}
versions:
  - {name: blue, replicas: ['127.0.0.1:1'], port: 0}
",
        );
        let errs = in_cluster(&spec, Err("unused")).unwrap_err();
        for want in [
            "spec.keys: keys never sit in the resource",
            "spec.keysSecret: authMode is key (the default) but no keysSecret",
            "spec.versions[0].replicas: is for the endpoints file",
            "spec.versions[0].service: is required",
            "spec.versions[0].port: 0 is not within 1..=65535",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errs:#?}"
            );
        }
        // The deployment defaults to the missing service: not a second error.
        assert!(!errs.iter().any(|e| e.contains("deployment")), "{errs:#?}");
        let spec = cluster_spec(
            "authMode: none\nversions: [{name: blue, service: s, deployment: Bad_Name}]",
        );
        let errs = in_cluster(&spec, Err("unused")).unwrap_err();
        assert!(
            errs[0].starts_with("spec.versions[0].deployment: 'Bad_Name'"),
            "{errs:?}"
        );
        let d = doc(&format!(
            "{BASE}  - {{name: blue, replicas: ['127.0.0.1:1'], service: s}}\n"
        ));
        let errs = validate_document(&d).unwrap_err();
        assert_eq!(errs[0].field, "spec.versions[0].service", "{errs:?}");
    }

    #[test]
    fn a_missing_or_short_secret_is_named() {
        let spec = cluster_spec("keysSecret: k\nversions: [{name: blue, service: s}]");
        let errs = in_cluster(&spec, Err("Secret 'k' not found")).unwrap_err();
        assert_eq!(errs, ["spec.keysSecret: Secret 'k' not found"]);
        let short = KeysSpec {
            primary_key: Some("short".into()),
            secondary_key: None,
        };
        let errs = in_cluster(&spec, Ok(&short)).unwrap_err();
        assert!(
            errs[0].starts_with("spec.keysSecret: primaryKey: a key must be at least"),
            "{errs:?}"
        );
        let errs = in_cluster(&spec, Ok(&KeysSpec::default())).unwrap_err();
        assert_eq!(errs, ["spec.keysSecret: the Secret has no primaryKey"]);
    }

    #[test]
    fn the_crd_yaml_parses_back_and_names_the_resource() {
        let yaml = crd_yaml();
        let crd: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(crd["metadata"]["name"], "scoringendpoints.scorefront.io");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "se");
        let rules = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["x-kubernetes-validations"];
        assert_eq!(rules.as_array().unwrap().len(), 6, "{rules}");
    }

    #[test]
    fn autoscaling_defaults_and_exclusions() {
        let scaled = |versions: &str| {
            let d = doc(&format!("{BASE}{versions}"));
            validate_document(&d).map(|ep| ep.versions[0].autoscale)
        };
        let a = scaled("  - {name: a, command: 'm {port}'}\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.min_replicas, a.max_replicas, a.target_utilization),
            (1, 10, 70)
        );
        assert_eq!(a.refresh, Duration::from_secs(1));
        assert_eq!(a.scale_down_delay, Duration::from_secs(60));
        let fixed = "  - {name: a, command: 'm {port}', replicaCount: 2}\n";
        assert_eq!(scaled(fixed).unwrap(), None);
        assert_eq!(
            scaled("  - {name: a, replicas: ['127.0.0.1:1']}\n").unwrap(),
            None
        );
        let both =
            "  - {name: a, command: 'm {port}', replicaCount: 2, autoscale: {enabled: true}}\n";
        let errs = errors(both);
        assert!(
            errs[0].starts_with(
                "spec.versions[0].autoscale.enabled: a fixed spec.versions[0].replicaCount"
            ),
            "{errs:?}"
        );
        let errs = errors("  - {name: a, command: 'm {port}', autoscale: {enabled: false}}\n");
        assert!(
            errs[0].starts_with("spec.versions[0].replicaCount: is required"),
            "{errs:?}"
        );
        let errs = errors(
            "  - {name: a, command: 'm {port}', autoscale: {minReplicas: 5, maxReplicas: 2, targetUtilization: 0}}\n",
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
        // azureml's sizing example: the count starts at minReplicas.
        let d = doc(&format!(
            "{BASE}  - {{name: a, command: 'm {{port}}', autoscale: {{minReplicas: 3}}}}\n"
        ));
        let v = &validate_document(&d).unwrap().versions[0];
        assert!(matches!(
            v.replicas,
            ReplicaSource::Command { count: 3, .. }
        ));
    }
}
